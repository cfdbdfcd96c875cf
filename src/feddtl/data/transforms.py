"""PIL images -> normalised float tensors for the image encoder (numpy/PIL/torch only)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .dataset import ImageDataset


def images_to_tensor(
    images: list[Image.Image],
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    invert: bool = False,
) -> torch.Tensor:
    """Float32 (N, 3, size, size): RGB, optional inversion, bilinear resize, [0, 1], (x - mean) / std."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    if mean_arr.size != 3 or std_arr.size != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got {mean} and {std}")
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be > 0 per channel, got {std}")
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for k, image in enumerate(images):
        im = image.convert("RGB")
        if invert:
            im = ImageOps.invert(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(im, dtype=np.float32) / 255.0
        out[k] = ((x - mean_arr) / std_arr).transpose(2, 0, 1)
    return torch.from_numpy(out)


def dataset_to_tensor(
    ds: ImageDataset,
    indices: Sequence[int] | np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    invert: bool = False,
    batch_size: int = 512,
) -> Iterator[torch.Tensor]:
    """Yield `images_to_tensor` batches of ds[indices] in order, so a large dataset can stream
    through a model without all its pixels in memory at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    for start in range(0, len(idx), batch_size):
        batch = idx[start : start + batch_size]
        yield images_to_tensor(ds.load_images(batch), size, mean, std, invert=invert)
