"""The frozen-trunk cache: in-memory, memmap and uncached stores return the same trunk features."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import numpy as np
import pytest
import torch

from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cache import CacheConfig, MemmapStore, PixelStore, TensorStore, TrunkCache
from feddtl.config import ConfigError, load_config
from feddtl.data import ImageDataset

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=IMAGE_SIZE, num_layers=4)
    return HFClipBackbone(str(path))


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 20, 20), dtype=np.uint8)
    return ImageDataset(rng.integers(0, 3, size=40), ["a", "b", "c"], images=images)


def _cache(backbone, tmp_path, **kwargs) -> TrunkCache:
    return TrunkCache(CacheConfig(batch_size=16, **kwargs), backbone, IMAGE_SIZE, run_dir=tmp_path, log_fn=lambda s: None)


INDICES = np.array([3, 7, 1, 30, 12, 5, 22, 39, 0, 17, 8])
QUERY = torch.tensor([4, 0, 10, 4, 2, 9])  # unsorted, with a repeat


def test_memmap_store_returns_exactly_the_in_memory_features(backbone, dataset, tmp_path):
    # prepare: one cache with room for everything, one with no memory budget at all
    in_memory = _cache(backbone, tmp_path / "a").store("s", dataset, INDICES)
    on_disk = _cache(backbone, tmp_path / "b", memory_budget_mb=0).store("s", dataset, INDICES)
    # execute
    a, b = in_memory[QUERY], on_disk[QUERY]
    # assert
    assert isinstance(in_memory, TensorStore) and isinstance(on_disk, MemmapStore)
    assert len(on_disk) == len(INDICES)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert torch.equal(a, b)


def test_stores_hold_the_trunk_output_of_the_indexed_images(backbone, dataset, tmp_path):
    # prepare: the trunk run directly on the images the query picks
    from feddtl.data import images_to_tensor

    pixels = images_to_tensor(
        dataset.load_images(INDICES[QUERY.numpy()]), IMAGE_SIZE, backbone.image_mean, backbone.image_std
    )
    with torch.no_grad():
        expected = backbone.image_trunk(pixels)
    # execute
    cached = _cache(backbone, tmp_path)
    got_cached = cached.store("s", dataset, INDICES)[QUERY]
    got_pixels = _cache(backbone, tmp_path / "off", enabled=False).store("s", dataset, INDICES)[QUERY]
    # assert: batch composition differs, so allow float32 round-off only
    torch.testing.assert_close(got_cached, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pixels, expected, rtol=1e-5, atol=1e-5)


def test_disabled_cache_recomputes_and_keeps_nothing(backbone, dataset, tmp_path):
    cache = _cache(backbone, tmp_path, enabled=False)
    store = cache.store("s", dataset, INDICES)
    assert isinstance(store, PixelStore) and len(store) == len(INDICES)
    assert cache.summary()["memory_mb"] == 0 and cache.summary()["disk_mb"] == 0
    assert not (tmp_path / "cache").exists()


def test_float16_storage_is_within_half_precision_and_half_the_bytes(backbone, dataset, tmp_path):
    # prepare
    full = _cache(backbone, tmp_path / "a")
    half = _cache(backbone, tmp_path / "b", dtype="float16")
    half_disk = _cache(backbone, tmp_path / "c", dtype="float16", memory_budget_mb=0)
    # execute
    f32 = full.store("s", dataset, INDICES)
    f16 = half.store("s", dataset, INDICES)
    f16_disk = half_disk.store("s", dataset, INDICES)
    # assert
    assert f16[QUERY].dtype == torch.float32
    torch.testing.assert_close(f16[QUERY], f32[QUERY], rtol=1e-3, atol=1e-3)
    assert torch.equal(f16_disk[QUERY], f16[QUERY])
    assert f16.nbytes * 2 == f32.nbytes
    assert half.summary()["memory_mb"] * 2 == full.summary()["memory_mb"]


def test_budget_spills_later_stores_to_disk_under_the_run_dir_and_close_deletes_them(backbone, dataset, tmp_path):
    # prepare: trunk output per image is (tokens, hidden) float32; budget for exactly one store of 11 images
    probe = _cache(backbone, tmp_path / "probe").store("s", dataset, INDICES)
    budget_mb = probe.nbytes / 2**20
    cache = _cache(backbone, tmp_path / "run", memory_budget_mb=budget_mb)
    # execute
    first = cache.store("client0-train", dataset, INDICES)
    second = cache.store("client1-train", dataset, INDICES[:5])
    # assert
    assert isinstance(first, TensorStore) and isinstance(second, MemmapStore)
    assert second.path.parent.parent == tmp_path / "run" / "cache"
    assert second.path.name == "client1-train.npy" and second.path.exists()
    assert torch.equal(second[torch.arange(5)], first[torch.arange(5)])
    assert cache.summary()["stores_on_disk"] == 1
    cache.close()
    assert not second.path.exists()
    assert not (tmp_path / "run" / "cache").exists()


def test_store_names_are_unique_and_indexes_are_checked(backbone, dataset, tmp_path):
    cache = _cache(backbone, tmp_path)
    store = cache.store("s", dataset, INDICES)
    with pytest.raises(ValueError, match="exists already"):
        cache.store("s", dataset, INDICES)
    with pytest.raises(ValueError, match="no images"):
        cache.store("empty", dataset, np.array([], dtype=np.int64))
    with pytest.raises(IndexError, match="out of range"):
        store[torch.tensor([0, len(INDICES)])]
    with pytest.raises(TypeError, match="1-D integer"):
        store[torch.tensor([0.5])]
    assert torch.equal(store[torch.tensor([-1])], store[torch.tensor([len(INDICES) - 1])])


@pytest.mark.parametrize(
    "override,message",
    [
        ("cache.dtype=bfloat16", "cache.dtype"),
        ("cache.memory_budget_mb=-1", "cache.memory_budget_mb"),
        ("cache.batch_size=0", "cache.batch_size"),
        ("cache.enabled=3", "cache.enabled"),
    ],
)
def test_bad_cache_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])
