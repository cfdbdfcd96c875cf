"""Class names from a file (``data.class_names_file``): one name per line, in label order.

The file's names replace the ones the data come with: for data sets whose labels carry no names (a Hugging
Face integer label column), and for protocols that fix the class names (CoOp-style splits).
"""

from __future__ import annotations

from pathlib import Path

from .dataset import DatasetError, DatasetSplits


def read_class_names(path: str, num_classes: int | None, dataset: str) -> list[str]:
    """The names in ``path`` (UTF-8, one per line, surrounding spaces and blank lines dropped).

    ``num_classes``: how many classes ``dataset`` has (None: unknown, the labels are checked later).
    """
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"data.class_names_file: cannot read {file}: {err}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DatasetError(
            f"data.class_names_file: {file} holds no class names; write one name per line, in label order"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(
            f"data.class_names_file: {file} names {duplicates[:5]} more than once; each class needs its own name"
        )
    if num_classes is not None and len(names) != num_classes:
        raise DatasetError(
            f"data.class_names_file: {file} names {len(names)} classes but {dataset} has {num_classes}; "
            "write one name per line, in label order"
        )
    return names


def rename_classes(splits: DatasetSplits, path: str) -> DatasetSplits:
    """``splits`` with the class names of ``path`` (the count must match the data set's classes)."""
    names = read_class_names(path, splits.train.num_classes, splits.name)
    splits.train.classnames = list(names)
    splits.test.classnames = list(names)
    return splits
