"""Three implementations of the algorithm's ``TrunkFeatures`` protocol (``len()`` and ``store[index]``).

- ``TensorStore``: trunk outputs in a tensor in RAM or on the accelerator (float32 or float16 storage).
- ``MemmapStore``: trunk outputs in a ``.npy`` file read through a numpy memmap, for sets that do not
  fit the memory budget.
- ``PixelStore``: no cache: every read loads the images, transforms them and runs the frozen trunk.

Reads always return float32 tensors whose first dimension follows the index, so the algorithm
cannot tell the three apart except by speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddtl.backbones.base import Backbone
from feddtl.data import ImageDataset, images_to_tensor


def positions(index: Any, n: int) -> np.ndarray:
    """A 1-D int64 array of positions in ``0..n-1`` from an index tensor, array, list or slice."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.int64)[index]
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    arr = np.asarray(index)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"trunk features are indexed by a 1-D integer index, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"index out of range for {n} trunk features: [{arr.min()}, {arr.max()}]")
    return np.where(arr < 0, arr + n, arr)


class TensorStore:
    """Trunk outputs held in memory (RAM, or the accelerator's on a CUDA run); float16 storage is widened to
    float32 on read, on the tensor's device."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> torch.Tensor:
        pos = torch.from_numpy(positions(index, len(self.data))).to(self.data.device)
        return self.data[pos].to(torch.float32)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class MemmapStore:
    """Trunk outputs in a file on disk, memory-mapped read-only: a ``.npy`` file by path, or an array
    already mapped (a node-cache entry's safetensors file)."""

    def __init__(self, source: str | Path | np.ndarray) -> None:
        if isinstance(source, np.ndarray):
            self.array = source
            self.path = Path(source.filename) if getattr(source, "filename", None) else None
        else:
            self.path = Path(source)
            self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: Any) -> torch.Tensor:
        pos = positions(index, len(self.array))
        # Fancy indexing copies the rows out of the map; the page cache keeps hot rows in RAM.
        return torch.from_numpy(np.asarray(self.array[pos], dtype=np.float32))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class PixelStore:
    """The uncached path: each read runs load -> transform -> frozen trunk for the requested images.

    Returns float32 trunk outputs on the backbone's device.
    """

    def __init__(
        self,
        backbone: Backbone,
        dataset: ImageDataset,
        indices: np.ndarray,
        image_size: int,
        invert: bool = False,
    ) -> None:
        self.backbone = backbone
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.image_size = image_size
        self.invert = invert

    def __len__(self) -> int:
        return len(self.indices)

    @torch.no_grad()
    def __getitem__(self, index: Any) -> torch.Tensor:
        pos = positions(index, len(self.indices))
        images = self.dataset.load_images(self.indices[pos])
        pixels = images_to_tensor(
            images, self.image_size, self.backbone.image_mean, self.backbone.image_std, invert=self.invert
        )
        device = next(self.backbone.parameters()).device
        return self.backbone.image_trunk(pixels.to(device)).to(torch.float32)

    nbytes = 0
