"""images_to_tensor / dataset_to_tensor on images with known pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from feddtl.data import ImageDataset, dataset_to_tensor, images_to_tensor


def test_constant_image_normalisation() -> None:
    # prepare: one RGB image of constant (51, 102, 204) = (0.2, 0.4, 0.8) in [0, 1]
    img = Image.new("RGB", (7, 5), color=(51, 102, 204))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.1)
    # execute
    out = images_to_tensor([img, img], size=12, mean=mean, std=std)
    # assert
    assert out.shape == (2, 3, 12, 12) and out.dtype == torch.float32
    expected = torch.tensor([(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 0.1])
    assert torch.allclose(out[0].mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.amax(dim=(0, 2, 3)), out.amin(dim=(0, 2, 3)), atol=1e-5)  # still constant


def test_grey_image_becomes_three_channels_and_inverts() -> None:
    img = Image.new("L", (4, 4), color=51)
    plain = images_to_tensor([img], 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    inv = images_to_tensor([img], 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), invert=True)
    assert torch.allclose(plain, torch.full((1, 3, 4, 4), 0.2))
    assert torch.allclose(inv, torch.full((1, 3, 4, 4), 0.8))


def test_resize_keeps_layout() -> None:
    # Left half black, right half white: after resizing, the left columns stay dark.
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[:, 4:] = 255
    out = images_to_tensor([Image.fromarray(arr)], 16, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert out[0, 0, :, 0].max() < 0.05 and out[0, 0, :, -1].min() > 0.95


def test_bad_std_raises() -> None:
    with pytest.raises(ValueError, match="std"):
        images_to_tensor([Image.new("RGB", (2, 2))], 2, mean=(0.0,) * 3, std=(1.0, 0.0, 1.0))


def test_dataset_to_tensor_batches_in_order() -> None:
    images = np.stack([np.full((3, 3), v, dtype=np.uint8) for v in range(0, 250, 10)])  # 25 images
    ds = ImageDataset(np.zeros(25, dtype=np.int64), ["x"], images=images)
    indices = [24, 0, 5, 7, 3]

    batches = list(dataset_to_tensor(ds, indices, size=3, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=2))

    assert [b.shape[0] for b in batches] == [2, 2, 1]
    got = torch.cat(batches)[:, 0, 0, 0]
    assert torch.allclose(got, torch.tensor([240, 0, 50, 70, 30]) / 255.0)
