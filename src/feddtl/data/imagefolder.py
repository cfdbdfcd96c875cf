"""Image folders: one sub-folder of images per class (optionally under train/ and test/).

A folder name becomes the class name with underscores shown as spaces (``pull_over`` -> "pull over"),
in tables and in the prompts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from feddtl.config.data_config import DataConfig

from .dataset import DatasetError, DatasetSplits, ImageDataset, with_test_cap
from .partition import stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGEFOLDER_PREFIX = "imagefolder:"


def class_folders(root: Path) -> list[Path]:
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


def scan_imagefolder(
    root: Path, classes: list[str] | None = None, verify: bool = True
) -> tuple[list[str], list[str], np.ndarray]:
    """(folder names, file paths, labels) of one class-per-folder tree; with ``verify`` every image is
    decoded once and unreadable files are skipped with a warning (an error if a class is left empty)."""
    folders = class_folders(root)
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


def load_imagefolder(name: str, path: str, config: DataConfig, seed: int) -> DatasetSplits:
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise DatasetError(
            f"imagefolder: {root} is not a folder; give {IMAGEFOLDER_PREFIX}<path> with one "
            f"sub-folder of images per class (optionally under <path>/train and <path>/test)"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        names, train_paths, train_labels = scan_imagefolder(root / "train", verify=config.verify_images)
        _, test_paths, test_labels = scan_imagefolder(root / "test", classes=names, verify=config.verify_images)
        classnames = [n.replace("_", " ") for n in names]
        train = ImageDataset(train_labels, classnames, paths=train_paths)
        test = ImageDataset(test_labels, classnames, paths=test_paths)
        return with_test_cap(name, train, test, config, seed)
    names, paths, labels = scan_imagefolder(root, verify=config.verify_images)
    full = ImageDataset(labels, [n.replace("_", " ") for n in names], paths=paths)
    train_idx, test_idx = stratified_split(labels, config.test_fraction, seed)
    return with_test_cap(name, full.subset(train_idx), full.subset(test_idx), config, seed)
