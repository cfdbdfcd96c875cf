"""Dataset loading: idx parsing, image folders, the registry and its errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feddtl.data import DataConfig, DatasetError, ImageDataset, available_datasets, load_dataset, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    assert array.dtype == np.uint8
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=value).save(path)


# ----------------------------------------------------------------------------- idx


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    out = read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    assert np.array_equal(out, images)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path / "bad.gz", np.zeros((2, 2), np.uint8), magic=b"\x01\x02\x08\x02")
    with pytest.raises(DatasetError, match="bad idx magic number 0x01020802"):
        read_idx(tmp_path / "bad.gz")


def test_read_idx_truncated(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DatasetError, match="10 bytes of data"):
        read_idx(tmp_path / "short.gz")


def _fake_fashion(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_small_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    splits = load_dataset("fashion-mnist", DataConfig(fashion_mnist_dir=str(tmp_path)), seed=0)
    assert (len(splits.train), len(splits.test)) == (20, 10)
    assert splits.train.labels.dtype == np.int64
    assert splits.classnames[0] == "t-shirt" and splits.classnames[9] == "ankle boot"
    img = splits.test.load_images([3])[0]
    assert img.mode == "RGB" and img.size == (28, 28)


def test_fashion_mnist_missing_file_message(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", DataConfig(fashion_mnist_dir=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.fashion_mnist_dir" in msg


def test_fashion_mnist_real_files() -> None:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)")
    splits = load_dataset("fashion-mnist", DataConfig(), seed=0)
    assert splits.train._images.shape == (60000, 28, 28)
    assert splits.test._images.shape == (10000, 28, 28)
    assert len(splits.classnames) == 10
    assert np.array_equal(np.bincount(splits.train.labels), np.full(10, 6000))


def test_test_per_class_caps_test_split(tmp_path: Path) -> None:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        _fake_fashion(tmp_path)
        folder, cap = tmp_path, 1
    else:
        folder, cap = FASHION_DIR, 30
    cfg = DataConfig(fashion_mnist_dir=str(folder), test_per_class=cap)
    a = load_dataset("fashion-mnist", cfg, seed=0)
    b = load_dataset("fashion-mnist", cfg, seed=1)
    assert np.bincount(a.test.labels).tolist() == [cap] * 10
    assert not np.array_equal(a.test._images, b.test._images)


# ----------------------------------------------------------------------------- registry


def test_unknown_name_lists_available() -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar-1000", DataConfig(), seed=0)
    msg = str(err.value)
    for name in available_datasets():
        assert name in msg
    assert "imagefolder:<path>" in msg
    assert {"fashion-mnist", "mnist5k", "digits"} <= set(available_datasets())


def test_digits_stratified_seeded_split() -> None:
    cfg = DataConfig(test_fraction=0.25)
    a = load_dataset("digits", cfg, seed=0)
    b = load_dataset("digits", cfg, seed=0)
    c = load_dataset("digits", cfg, seed=1)
    assert len(a.train) + len(a.test) == 1797
    assert a.classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # Every class contributes ~25 % to test.
    frac = np.bincount(a.test.labels) / (np.bincount(a.test.labels) + np.bincount(a.train.labels))
    assert np.all(np.abs(frac - 0.25) < 0.01)
    assert np.array_equal(a.test._images, b.test._images)
    assert not np.array_equal(a.test._images, c.test._images)
    assert a.train._images.dtype == np.uint8 and a.train._images.max() == 255


def test_mnist5k_loads() -> None:
    splits = load_dataset("mnist5k", DataConfig(), seed=0)
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    assert splits.train.load_images([0])[0].size == (28, 28)
    assert np.bincount(splits.test.labels).tolist() == [100] * 10


def test_config_validate_names_key() -> None:
    with pytest.raises(ValueError, match=r"data\.test_fraction.*\(0, 1\)"):
        DataConfig(test_fraction=1.0).validate()
    with pytest.raises(ValueError, match=r"data\.image_size"):
        DataConfig(image_size=0).validate()
    with pytest.raises(ValueError, match=r"data\.test_per_class"):
        DataConfig(test_per_class=0).validate()
    DataConfig().validate()


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder_train_test_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("golden_retriever", "tabby_cat")):
            for k in range(n):
                ext = ".PNG" if k == 0 else ".png"  # extensions are case-insensitive
                _write_png(tmp_path / split / cls / f"{k}{ext}", value=50 + 100 * c)
    (tmp_path / "train" / "tabby_cat" / "notes.txt").write_text("not an image")

    splits = load_dataset(f"imagefolder:{tmp_path}", DataConfig(), seed=0)

    assert splits.classnames == ["golden retriever", "tabby cat"]
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.test.labels.tolist() == [0, 0, 1, 1]
    imgs = splits.test.load_images([0, 3])
    assert [im.mode for im in imgs] == ["RGB", "RGB"] and imgs[0].size == (6, 4)
    assert imgs[0].getpixel((0, 0)) == (50, 50, 50) and imgs[1].getpixel((0, 0)) == (150, 150, 150)


def test_imagefolder_split_layout(tmp_path: Path) -> None:
    for c, cls in enumerate(("a", "b", "c")):
        for k in range(10):
            _write_png(tmp_path / cls / f"{k}.png", value=10 * c)
    cfg = DataConfig(test_fraction=0.3)

    s0 = load_dataset(f"imagefolder:{tmp_path}", cfg, seed=0)
    s1 = load_dataset(f"imagefolder:{tmp_path}", cfg, seed=1)

    assert np.bincount(s0.test.labels).tolist() == [3, 3, 3]
    assert np.bincount(s0.train.labels).tolist() == [7, 7, 7]
    assert s0.test._paths != s1.test._paths
    assert not set(s0.test._paths) & set(s0.train._paths)
    sub = s0.train.subset([0, 20])
    assert isinstance(sub, ImageDataset) and sub.labels.tolist() == [0, 2]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", DataConfig(), seed=0)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", DataConfig(), seed=0)

    _write_png(tmp_path / "oneclass" / "dog" / "0.png", 1)
    (tmp_path / "oneclass" / "cat").mkdir()
    with pytest.raises(DatasetError, match=r"cat holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'oneclass'}", DataConfig(), seed=0)

    _write_png(tmp_path / "tt" / "train" / "dog" / "0.png", 1)
    _write_png(tmp_path / "tt" / "train" / "cat" / "0.png", 1)
    _write_png(tmp_path / "tt" / "test" / "dog" / "0.png", 1)
    _write_png(tmp_path / "tt" / "test" / "cow" / "0.png", 1)
    with pytest.raises(DatasetError, match=r"differ.*only in train \['cat'\], only in test \['cow'\]"):
        load_dataset(f"imagefolder:{tmp_path / 'tt'}", DataConfig(), seed=0)
