"""The frozen-trunk activation cache of one run: one store per image set, within one memory budget.

``TrunkCache.store(name, dataset, indices)`` runs the frozen image trunk once over the images and
keeps the outputs in RAM while the run's budget allows, else in a memmap file under the run
directory. On a CUDA run a store that fits ``cache.device_budget_mb`` stays on the device instead, so the
training steps read their batches there. With ``cache.enabled = false`` it returns a ``PixelStore`` that recomputes on every read.
Each client gets its own store (a client only ever encodes its own images); so do the test sets.

``TrunkCache.persistent_store`` keeps a store in a ``NodeCache`` instead (a Flower SuperNode's node cache),
so the next process with the same inputs loads the features rather than running the trunk again.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddtl.backbones.base import Backbone
from feddtl.config.cache_config import CacheConfig
from feddtl.cache.node_cache import NodeCache, write_tensor_stream
from feddtl.cache.stores import MemmapStore, PixelStore, TensorStore
from feddtl.data import ImageDataset, dataset_to_tensor

MB = 2**20
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


@torch.no_grad()
def trunk_batches(
    backbone: Backbone,
    dataset: ImageDataset,
    indices: np.ndarray,
    image_size: int,
    invert: bool,
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """The frozen image trunk's outputs for ``dataset[indices]``, in order, one CPU float32 batch at a time."""
    device = next(backbone.parameters()).device
    for pixels in dataset_to_tensor(
        dataset, indices, image_size, backbone.image_mean, backbone.image_std, invert=invert, batch_size=batch_size
    ):
        yield backbone.image_trunk(pixels.to(device)).to(device="cpu", dtype=torch.float32)


@dataclass
class StoreInfo:
    name: str
    images: int
    kind: str
    """"device" (accelerator memory), "memory", "disk" or "pixels" (uncached)."""
    nbytes: int


class TrunkCache:
    """Builds and owns the trunk-feature stores of one run (see module docstring)."""

    def __init__(
        self,
        config: CacheConfig,
        backbone: Backbone,
        image_size: int,
        invert: bool = False,
        run_dir: str | Path | None = None,
        log_fn: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.backbone = backbone
        self.image_size = image_size
        self.invert = invert
        self.log_fn = log_fn
        self._base_dir = Path(config.dir) if config.dir is not None else (
            Path(run_dir) / "cache" if run_dir is not None else None
        )
        self._disk_dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.infos: list[StoreInfo] = []
        self.build_s = 0.0
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.device_bytes = 0
        self.device = next(backbone.parameters()).device
        self.device_budget = _device_budget(config, self.device)
        self.torch_dtype, self.numpy_dtype = _DTYPES[config.dtype]
        if not config.enabled:
            log_fn(
                "trunk cache disabled (cache.enabled=false): the image trunk reruns on pixels for every batch "
                "of every epoch, round and evaluation"
            )

    @property
    def budget_bytes(self) -> int:
        return int(self.config.memory_budget_mb * MB)

    def store(self, name: str, dataset: ImageDataset, indices: np.ndarray) -> TensorStore | MemmapStore | PixelStore:
        """Trunk features of ``dataset[indices]`` under a run-unique ``name`` (used for the disk file)."""
        if any(info.name == name for info in self.infos):
            raise ValueError(f"trunk cache: a store named {name!r} exists already")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            raise ValueError(f"trunk cache: no images to encode for {name!r}")
        if not self.config.enabled:
            self.infos.append(StoreInfo(name, len(indices), "pixels", 0))
            return PixelStore(self.backbone, dataset, indices, self.image_size, self.invert)
        started = time.perf_counter()
        batches = trunk_batches(
            self.backbone, dataset, indices, self.image_size, self.invert, self.config.batch_size
        )
        first = next(batches)
        shape = (len(indices), *first.shape[1:])
        nbytes = int(np.prod(shape)) * np.dtype(self.numpy_dtype).itemsize
        if self.device_bytes + nbytes <= self.device_budget:
            out = self._fill_memory(shape, first, batches, self.device)
            self.device_bytes += nbytes
            kind = "device"
        elif self.memory_bytes + nbytes <= self.budget_bytes:
            out = self._fill_memory(shape, first, batches)
            self.memory_bytes += nbytes
            kind = "memory"
        else:
            out = self._fill_disk(name, shape, first, batches)
            self.disk_bytes += nbytes
            kind = "disk"
        self.build_s += time.perf_counter() - started
        self.infos.append(StoreInfo(name, len(indices), kind, nbytes))
        return out

    def persistent_store(
        self,
        name: str,
        node: NodeCache,
        key: Mapping[str, Any],
        images: Callable[[], tuple[ImageDataset, np.ndarray]],
    ) -> TensorStore | MemmapStore | PixelStore:
        """Trunk features of the images ``images()`` returns, kept in ``node`` under ``key`` (what the images
        are: dataset, indices, backbone and its split; this cache adds its dtype, batch size, image size and
        inversion). Loaded when a valid entry exists, else computed once and published; then held in memory
        while the budget allows, else read through a memmap of the entry. ``images`` is called only when
        the features are computed (a node that has them never loads its dataset)."""
        if any(info.name == name for info in self.infos):
            raise ValueError(f"trunk cache: a store named {name!r} exists already")
        if not self.config.enabled:
            return self.store(name, *images())
        key = {
            **key,
            "trunk_cache": {
                "dtype": self.config.dtype, "batch_size": self.config.batch_size,
                "image_size": self.image_size, "invert": self.invert,
            },
        }

        def build(path) -> None:
            dataset, indices = images()
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(indices) == 0:
                raise ValueError(f"trunk cache: no images to encode for {name!r}")
            batches = trunk_batches(
                self.backbone, dataset, indices, self.image_size, self.invert, self.config.batch_size
            )
            first = next(batches)
            shape = (len(indices), *first.shape[1:])
            write_tensor_stream(path, "features", shape, self.torch_dtype, _chain(first, batches))

        started = time.perf_counter()
        entry = node.get_or_build("trunk", key, build, keep_bytes=False)
        try:
            array = entry.memmap("features")
        finally:
            entry.close()  # the map holds the file open itself
        nbytes = int(array.nbytes)
        if self.device_bytes + nbytes <= self.device_budget:
            out: TensorStore | MemmapStore = TensorStore(torch.from_numpy(np.array(array)).to(self.device))
            self.device_bytes += nbytes
            kind = "device"
        elif self.memory_bytes + nbytes <= self.budget_bytes:
            out = TensorStore(torch.from_numpy(np.array(array)))
            self.memory_bytes += nbytes
            kind = "memory"
        else:
            out = MemmapStore(array)
            self.disk_bytes += nbytes
            kind = "disk"
        if entry.built:
            self.build_s += time.perf_counter() - started
        self.infos.append(StoreInfo(name, len(array), kind, nbytes))
        return out

    def _fill_memory(
        self, shape: tuple[int, ...], first: torch.Tensor, rest: Iterator[torch.Tensor], device: torch.device | None = None
    ) -> TensorStore:
        data = torch.empty(shape, dtype=self.torch_dtype, device=device)
        start = 0
        for batch in _chain(first, rest):
            data[start : start + len(batch)] = batch.to(self.torch_dtype).to(data.device)
            start += len(batch)
        return TensorStore(data)

    def _fill_disk(
        self, name: str, shape: tuple[int, ...], first: torch.Tensor, rest: Iterator[torch.Tensor]
    ) -> MemmapStore:
        path = self._ensure_disk_dir() / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=self.numpy_dtype, shape=shape)
        start = 0
        for batch in _chain(first, rest):
            array[start : start + len(batch)] = batch.numpy().astype(self.numpy_dtype, copy=False)
            start += len(batch)
        array.flush()
        del array
        return MemmapStore(path)

    def _ensure_disk_dir(self) -> Path:
        if self._disk_dir is None:
            base = self._base_dir
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            # A fresh folder per run, so two runs pointed at one cache.dir never share files.
            self._disk_dir = Path(tempfile.mkdtemp(prefix="trunk-", dir=base))
            # Delete the files when the cache is closed, collected, or the interpreter exits.
            self._finalizer = weakref.finalize(self, _remove, self._disk_dir, base if self.config.dir is None else None)
        return self._disk_dir

    @property
    def disk_dir(self) -> Path | None:
        """Folder of this run's memmap files (None while everything fits in memory)."""
        return self._disk_dir

    def close(self) -> None:
        """Delete the disk store's files (stores that read them must not be used afterwards)."""
        if self._finalizer is not None:
            self._finalizer()

    def summary(self) -> dict[str, Any]:
        """What results.json records about the cache."""
        return {
            "enabled": self.config.enabled,
            "dtype": self.config.dtype,
            "memory_budget_mb": self.config.memory_budget_mb,
            "stores": len(self.infos),
            "images": sum(i.images for i in self.infos),
            "memory_mb": self.memory_bytes / MB,
            "disk_mb": self.disk_bytes / MB,
            "stores_on_disk": sum(i.kind == "disk" for i in self.infos),
            "device_mb": self.device_bytes / MB,
            "stores_on_device": sum(i.kind == "device" for i in self.infos),
        }  # build time is reported apart (results.json's time_cache_build_s): it is not a result

    def describe(self) -> str:
        """One log line about where the trunk features went."""
        if not self.config.enabled:
            return f"trunk cache disabled: {sum(i.images for i in self.infos)} images are re-encoded on every use"
        s = self.summary()
        where = f"; {s['stores_on_disk']} stores on disk ({s['disk_mb']:.1f} MB) under {self._disk_dir}" if (
            s["stores_on_disk"]
        ) else ""
        if s["stores_on_device"]:
            where = f"; {s['stores_on_device']} stores ({s['device_mb']:.1f} MB) on {self.device}" + where
        return (
            f"trunk cache: {s['images']} images in {s['stores']} stores, {s['memory_mb']:.1f} MB in memory "
            f"(budget {self.config.memory_budget_mb:g} MB, {self.config.dtype}){where}, built in {self.build_s:.1f} s"
        )


def _device_budget(config: CacheConfig, device: torch.device) -> int:
    """Bytes of accelerator memory the stores may take: 0 on a CPU run (RAM is the memory budget's)."""
    if device.type != "cuda" or not config.enabled:
        return 0
    if config.device_budget_mb is not None:
        return int(config.device_budget_mb * MB)
    free, _total = torch.cuda.mem_get_info(device)
    return int(free // 2)  # the other half: the towers' activations and the optimiser during training


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def _remove(path: Path, parent: Path | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if parent is not None:
        try:
            parent.rmdir()  # the default <run dir>/cache folder, when nothing else is in it
        except OSError:
            pass
