"""Build a federation from a config: backbone, base/novel split, client partitions, cached trunks.

Shared by the in-process simulator and the Flower app, so both see the same clients for a seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddtl.algorithm.client import ClientData
from feddtl.backbones import Backbone, TextFeatures, build_backbone, min_image_size
from feddtl.cache import TrunkCache, trunk_batches
from feddtl.config import ConfigError, ExperimentConfig
from feddtl.config.node_data_config import NODE_LOCAL
from feddtl.data import DatasetSplits, ImageDataset, cap_per_class, few_shot, holdout_per_class, load_dataset
from feddtl.data import partition as partition_indices
from feddtl.data import split_base_novel
from feddtl.data.class_match import check_run_classes
from feddtl.data.class_names import read_class_names
from feddtl.evaluation import EvalSet

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(name)


def autocast_dtype(config: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The towers' mixed-precision dtype for ``config.precision`` on ``device``; None: float32.

    bfloat16 autocast is for CUDA: on a CPU (device = "cpu", or "auto" without CUDA) or a GPU without bfloat16
    the run keeps float32 and says so in a warning (results.json records the precision used), so one config
    runs on both kinds of machine."""
    if config.precision == "float32":
        return None
    if device.type != "cuda":
        log.warning(
            "precision=%r is mixed precision for CUDA; this run is on %s: it runs in float32 "
            "(results.json: precision float32)", config.precision, device.type,
        )
        return None
    if not torch.cuda.is_bf16_supported():
        log.warning(
            "precision=%r: %s has no bfloat16 support: the run is in float32 (results.json: precision float32)",
            config.precision, torch.cuda.get_device_name(device),
        )
        return None
    return torch.bfloat16


def refuse_node_local(config: ExperimentConfig) -> None:
    """ConfigError for a ``node-local`` run where the clients would be built here (in process, the
    Simulation Engine): its data exist only on the SuperNodes of a deployment."""
    if config.dataset == NODE_LOCAL:
        raise ConfigError(
            f"dataset={NODE_LOCAL!r}: the server holds no data, each Flower SuperNode brings its own; run it on "
            "the Deployment Engine (docs/flower.md, 'Each organisation brings its own data')"
        )


def check_image_size(config: ExperimentConfig) -> None:
    """ConfigError if ``data.image_size`` is below what the backbone needs (an empty feature map or patch
    grid); cheap (no weights load), so callers run it before any setup."""
    minimum = min_image_size(config.backbone)
    if minimum is not None and config.data.image_size < minimum:
        why = (
            f"EfficientNet-Lite0 downsamples by {minimum}" if config.backbone == "lite"
            else f"the vision tower cuts {minimum} x {minimum} px patches"
        )
        raise ConfigError(
            f"data.image_size={config.data.image_size} is too small for backbone {config.backbone}: "
            f"the minimum is {minimum} ({why})"
        )


def make_backbone(
    config: ExperimentConfig, derived: dict[str, torch.Tensor] | None = None, text_tower: bool = True
) -> Backbone:
    """The configured backbone with LoRA on both tails, on the configured device.

    ``derived``, ``text_tower``: see ``build_backbone`` (a node's cached bridge; an image-only build)."""
    check_image_size(config)
    torch.manual_seed(config.seed)
    backbone = build_backbone(
        config.backbone, config.data.image_size, config.backbone_options, derived=derived, text_tower=text_tower
    )
    try:
        backbone.add_lora(config.lora)
    except ValueError as exc:  # lora.*_start_block out of range for this backbone
        raise ConfigError(str(exc)) from None
    device = resolve_device(config.device)
    backbone = backbone.to(device)
    backbone.set_precision(autocast_dtype(config, device))
    return backbone


@torch.no_grad()
def trunk_features(
    backbone: Backbone, dataset: ImageDataset, indices: np.ndarray, config: ExperimentConfig
) -> torch.Tensor:
    """The frozen image trunk's output for ``dataset[indices]`` in one CPU float32 tensor.

    Runs use a ``TrunkCache`` instead (memory budget, disk store, uncached mode); this is for callers
    that want a plain tensor.
    """
    chunks = list(
        trunk_batches(backbone, dataset, indices, config.data.image_size, config.data.invert, config.cache.batch_size)
    )
    if not chunks:
        raise ValueError("no images to encode")
    return torch.cat(chunks)


@torch.no_grad()
def prompt_features(backbone: Backbone, classnames: list[str], template: str) -> TextFeatures:
    """Cached text-trunk features of "a photo of a {class}." for each class."""
    device = next(backbone.parameters()).device
    tokens = backbone.tokenize([template.format(c) for c in classnames])
    return {k: v.cpu() for k, v in backbone.text_trunk({k: v.to(device) for k, v in tokens.items()}).items()}


@dataclass
class ClassSplit:
    """Base (trained) and novel (held-out) classes of the dataset, by original label."""

    base: list[int]
    novel: list[int]
    classnames: list[str]

    @property
    def base_names(self) -> list[str]:
        return [self.classnames[c] for c in self.base]

    @property
    def novel_names(self) -> list[str]:
        return [self.classnames[c] for c in self.novel]


def class_split(config: ExperimentConfig, splits: DatasetSplits) -> ClassSplit:
    return split_classes(config, splits.train.classnames)


def split_classes(config: ExperimentConfig, names: list[str]) -> ClassSplit:
    """The run's classes ``names`` split into base and novel (``base_novel``, its seed)."""
    seed = config.seed if config.base_novel_seed is None else config.base_novel_seed
    base, novel = split_base_novel(len(names), mode=config.base_novel, seed=seed)
    return ClassSplit(base=list(base), novel=list(novel), classnames=list(names))


VALIDATION_SEED_OFFSET = 4000
"""The validation hold-out's seed is ``seed + 4000`` (shots use +1000, full-data caps +2000, test caps +3000)."""


def validation_indices(config: ExperimentConfig, splits: DatasetSplits) -> np.ndarray | None:
    """Positions in ``splits.train`` of the validation hold-out (eval.on = "validation"), else None.

    ``eval.validation_per_class`` images of every class, base and novel, stratified over domains when the
    data have them, seeded by the run's seed. Carved from the whole training pool before the partition
    and the shots (``client_indices`` leaves them out), so no client ever holds one, and the test split
    plays no part in it.
    """
    if config.eval.on != "validation":
        return None
    train = splits.train
    try:
        return holdout_per_class(
            train.labels, config.eval.validation_per_class, config.seed + VALIDATION_SEED_OFFSET, train.domains
        )
    except ValueError as exc:
        raise ConfigError(f"eval.validation_per_class={config.eval.validation_per_class} is too many for {config.dataset}: {exc}") from None


def run_class_names(config: ExperimentConfig) -> list[str]:
    """The class list of a ``node-local`` run (``data.class_names_file``, read here on the server), checked:
    no two names that a node's class could both match."""
    assert config.data.class_names_file is not None  # ExperimentConfig.validate requires it
    names = read_class_names(config.data.class_names_file, None, NODE_LOCAL)
    check_run_classes(names, f"data.class_names_file {config.data.class_names_file}")
    return names


def client_indices(config: ExperimentConfig, splits: DatasetSplits, classes: ClassSplit) -> list[np.ndarray]:
    """Training-image indices of each client: base classes only, less the validation hold-out (if any),
    partitioned, then few-shot or capped."""
    labels = splits.train.labels
    pool = np.flatnonzero(np.isin(labels, classes.base))
    held = validation_indices(config, splits)
    if held is not None:
        pool = np.setdiff1d(pool, held)
    if config.partition == "pathological":
        if config.num_clients > len(classes.base):
            raise ConfigError(
                f"num_clients={config.num_clients} is more than the {len(classes.base)} base classes: "
                "not allowed with partition='pathological'"
            )
        if config.classes_per_client > len(classes.base):
            raise ConfigError(
                f"classes_per_client={config.classes_per_client} exceeds the {len(classes.base)} base classes"
            )
    try:
        if config.partition.startswith("domain"):
            parts = _domain_parts(config, splits, pool)
        else:
            parts = partition_indices(
                labels[pool],
                config.num_clients,
                config.partition,
                seed=config.seed,
                alpha=config.alpha,
                classes_per_client=config.classes_per_client,
                min_partition_size=config.min_partition_size,
            )
    except ValueError as exc:  # e.g. no Dirichlet draw gives every client an image: a config problem
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"cannot partition {len(pool)} base-class images among {config.num_clients} clients: {exc}"
        ) from None
    out = []
    for k, part in enumerate(parts):
        idx = subsample_client(config, labels, pool[part], k)
        if len(idx) == 0:
            raise ConfigError(
                f"client {k} has no training images (partition={config.partition!r}, alpha={config.alpha}); "
                "use fewer clients, a larger alpha, or another partition"
            )
        out.append(idx)
    return out


def subsample_client(config: ExperimentConfig, labels: np.ndarray, idx: np.ndarray, client_id: int) -> np.ndarray:
    """Client ``client_id``'s training images among ``idx`` (indices into ``labels``): ``shots`` per class, or
    at most ``max_train_per_client`` (seeded per client). The one rule for a partition of the run's dataset
    and for a SuperNode's own data."""
    if config.shots is not None:
        return few_shot(labels, idx, config.shots, seed=config.seed + 1000 + client_id)
    if config.max_train_per_client is not None and len(idx) > config.max_train_per_client:
        rng = np.random.default_rng(config.seed + 2000 + client_id)
        return np.sort(rng.choice(idx, config.max_train_per_client, replace=False))
    return idx


def _domain_parts(config: ExperimentConfig, splits: DatasetSplits, pool: np.ndarray) -> list[np.ndarray]:
    """Feature-shift partition of the base-class pool (positions into ``pool``)."""
    from feddtl.data.domains import domain_partition

    train = splits.train
    if train.domains is None or train.domain_names is None:
        raise ConfigError(
            f"partition={config.partition!r} needs a dataset with domains (e.g. digits-domains); "
            f"{config.dataset!r} has none"
        )
    try:
        return domain_partition(
            train.labels[pool], train.domains[pool], len(train.domain_names), config.num_clients,
            config.partition, seed=config.seed, alpha=config.alpha, min_partition_size=config.min_partition_size,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def to_base_index(labels: np.ndarray, classes: list[int]) -> torch.Tensor:
    lookup = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lookup[int(y)] for y in labels], dtype=torch.long)


def build_client_data(
    backbone: Backbone, config: ExperimentConfig, splits: DatasetSplits, classes: ClassSplit, client_id: int,
    indices: np.ndarray, cache: TrunkCache | None = None,
) -> ClientData:
    """One client's data with its trunk features cached (each client only ever encodes its own images).

    ``cache``: the run's trunk cache (None: a plain in-memory tensor)."""
    labels = splits.train.labels[indices]
    features = (
        trunk_features(backbone, splits.train, indices, config)
        if cache is None
        else cache.store(f"client{client_id}-train", splits.train, indices)
    )
    return ClientData(client_id=client_id, features=features, labels=to_base_index(labels, classes.base))


def build_eval_set(
    backbone: Backbone, config: ExperimentConfig, splits: DatasetSplits, classes: ClassSplit,
    client_classes: list[list[int]], cache: TrunkCache | None = None,
) -> EvalSet:
    """The evaluation images: the test split (capped at data.test_per_class), or with eval.on =
    "validation" the validation hold-out of the training split, and then no test image is touched."""
    held = validation_indices(config, splits)
    source, prefix = (splits.test, "test") if held is None else (splits.train, "validation")
    labels = source.labels
    sets = []
    domain_ids = []
    for name, group in ((f"{prefix}-base", classes.base), (f"{prefix}-novel", classes.novel)):
        if held is None:
            idx = np.flatnonzero(np.isin(labels, group))
            if config.data.test_per_class is not None:
                idx = cap_per_class(labels, idx, config.data.test_per_class, seed=config.seed + 3000)
        else:
            idx = held[np.isin(labels[held], group)]
        features = trunk_features(backbone, source, idx, config) if cache is None else cache.store(name, source, idx)
        sets.append((features, to_base_index(labels[idx], group)))
        if source.domains is not None:
            domain_ids.append(torch.from_numpy(source.domains[idx]))
    (bf, bl), (nf, nl) = sets
    domains = {}
    if domain_ids:
        domains = {"domain_names": source.domain_names, "base_domains": domain_ids[0], "novel_domains": domain_ids[1]}
    return EvalSet(
        base_features=bf, base_labels=bl, novel_features=nf, novel_labels=nl, client_classes=client_classes, **domains
    )


Evaluator = Callable[[torch.Tensor, torch.Tensor, "list[torch.Tensor] | None"], dict[str, Any]]
"""(base text embeddings, novel text embeddings, per-client base embeddings or None) -> the metrics of
``evaluation.evaluate`` for the model loaded in the federation's backbone."""


@dataclass
class Federation:
    """Everything a run needs, built once."""

    config: ExperimentConfig
    backbone: Backbone
    classes: ClassSplit
    clients: list[ClientData]
    eval_set: EvalSet
    base_text: TextFeatures
    novel_text: TextFeatures
    cache: TrunkCache | None = None
    """The trunk cache behind the clients' and test sets' features (close() deletes its disk files)."""
    client_sizes: list[int] | None = None
    """Training images per client when the clients are remote (the Flower server, which holds no client
    data and learns them in its handshake); None: ``len(clients[k])``."""
    evaluator: Evaluator | None = None
    """Evaluation that runs elsewhere: the SuperNodes of a ``node-local`` run, where the server holds no
    test images (``eval_set`` is then empty). None: ``evaluation.evaluate`` on ``eval_set`` here."""

    def partition_counts(self) -> np.ndarray | None:
        """Training images per client (rows) and base class (columns, ``classes.base`` order), as the
        clients hold them (after shots); None when the clients are remote and their data are not here."""
        if not self.clients:
            return None
        return np.stack([np.bincount(c.labels.cpu().numpy(), minlength=len(self.classes.base)) for c in self.clients])


def client_partition(config: ExperimentConfig, splits: DatasetSplits, client_id: int) -> tuple[ClassSplit, np.ndarray]:
    """The class split and one client's training-image indices (same partitioner and seed as every engine)."""
    if not 0 <= client_id < config.num_clients:
        raise ConfigError(f"client id {client_id} is out of range for num_clients={config.num_clients}")
    classes = class_split(config, splits)
    return classes, client_indices(config, splits, classes)[client_id]


def build_client(
    config: ExperimentConfig, client_id: int, backbone: Backbone, splits: DatasetSplits | None = None,
    cache: TrunkCache | None = None,
) -> ClientData:
    """Only client ``client_id``'s data, as one node of a distributed run builds it for itself
    (``cache``: the node's own trunk cache, as in process: clients never share one)."""
    if splits is None:
        splits = load_dataset(config.dataset, config.data, seed=config.seed)
    classes, indices = client_partition(config, splits, client_id)
    return build_client_data(backbone, config, splits, classes, client_id, indices, cache)


def build_federation(
    config: ExperimentConfig, log_fn=print, run_dir: str | Path | None = None, with_clients: bool = True
) -> Federation:
    """Load data, split classes, partition clients, build the backbone and cache trunk features.

    ``run_dir``: where the trunk cache's disk store goes (``<run_dir>/cache`` unless cache.dir is set).
    ``with_clients=False`` builds the server side of a distributed run: no client data, and empty
    ``eval_set.client_classes`` / ``client_sizes`` that the caller fills with what the clients report.
    """
    check_image_size(config)  # before the dataset and the model load: a too-small size fails at once
    if config.dataset == NODE_LOCAL:
        if with_clients:
            refuse_node_local(config)
        return _federation_without_data(config, log_fn)
    splits = load_dataset(config.dataset, config.data, seed=config.seed)
    classes = class_split(config, splits)
    parts = client_indices(config, splits, classes) if with_clients else []
    backbone = make_backbone(config)
    held = f"; clients hold {[len(p) for p in parts]} training images" if with_clients else ""
    log_fn(
        f"{config.dataset}: {len(classes.base)} base classes {classes.base_names}, "
        f"{len(classes.novel)} novel {classes.novel_names}{held}"
    )
    template = config.backbone_options.template
    base_text = prompt_features(backbone, classes.base_names, template)
    cache = TrunkCache(
        config.cache, backbone, config.data.image_size, config.data.invert, run_dir=run_dir, log_fn=log_fn
    )
    clients = [
        build_client_data(backbone, config, splits, classes, k, idx, cache) for k, idx in enumerate(parts)
    ]
    client_classes = [sorted(set(c.labels.tolist())) for c in clients]
    eval_set = build_eval_set(backbone, config, splits, classes, client_classes, cache)
    log_fn(cache.describe())
    return Federation(
        config=config,
        backbone=backbone,
        classes=classes,
        clients=clients,
        eval_set=eval_set,
        base_text=base_text,
        novel_text=prompt_features(backbone, classes.novel_names, template),
        cache=cache,
    )


def _federation_without_data(config: ExperimentConfig, log_fn) -> Federation:
    """The server side of a ``node-local`` run: the run's classes, the backbone and the class prompts; no
    image at all (clients and test images live on the SuperNodes, which the caller connects)."""
    classes = split_classes(config, run_class_names(config))
    backbone = make_backbone(config)
    log_fn(
        f"{NODE_LOCAL}: {len(classes.base)} base classes {classes.base_names}, {len(classes.novel)} novel "
        f"{classes.novel_names}; the SuperNodes bring the images and evaluate"
    )
    template = config.backbone_options.template
    empty = torch.zeros((0, 0))
    no_labels = torch.zeros(0, dtype=torch.long)
    return Federation(
        config=config,
        backbone=backbone,
        classes=classes,
        clients=[],
        eval_set=EvalSet(empty, no_labels, empty, no_labels, client_classes=[]),
        base_text=prompt_features(backbone, classes.base_names, template),
        novel_text=prompt_features(backbone, classes.novel_names, template),
    )
