"""Class names from a file (``data.class_names_file``).

The file's names replace the ones the data come with: for data sets whose labels carry no names (a Hugging
Face integer label column), and for protocols that fix the class names and their order (CoOp-style splits:
the base classes are the first half in label order). UTF-8, one class a line; blank lines and lines starting
with ``#`` are skipped. Two forms:

- plain: ``name`` lines, in label order; the count must match the data set's classes;
- mapped: ``<the data set's class name> = <name to use>`` lines. The file's order becomes the label order and
  classes the file does not list are dropped with their images, so the same file fixes names, order and the
  base/novel split whatever order (or letter case, ``_`` or space) a copy of the data set uses.

``preset:<file>`` names a file shipped with feddtl (``feddtl/presets/class_names/``, see ``preset_class_names``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feddtl.config.loading import preset_dir

from .dataset import DatasetError, DatasetSplits, ImageDataset

log = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"


def class_names_dir() -> Path:
    """The class-name files shipped as package data (``feddtl/presets/class_names``)."""
    return preset_dir() / "class_names"


def preset_class_names() -> list[str]:
    return sorted(p.name for p in class_names_dir().glob("*.txt"))


def resolve_class_names_path(path: str) -> Path:
    """``preset:<file>`` (".txt" optional) -> the shipped file; anything else is a path (``~`` expanded)."""
    if not path.startswith(PRESET_PREFIX):
        return Path(path).expanduser()
    name = path[len(PRESET_PREFIX) :]
    return class_names_dir() / (name if name.endswith(".txt") else f"{name}.txt")


@dataclass
class ClassNamesFile:
    path: Path
    names: list[str]
    """The names to use, in label order."""
    sources: list[str] | None
    """Mapped files: the data set's class name each line renames (None: a plain file)."""

    @property
    def mapped(self) -> bool:
        return self.sources is not None


def _key(name: str) -> str:
    """How a mapped file's source names are matched: letter case, ``_`` and spaces do not matter."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def load_class_names_file(path: str) -> ClassNamesFile:
    """Read and check ``path`` (plain or mapped, see the module docstring); DatasetError names the problem."""
    file = resolve_class_names_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        hint = ""
        if path.startswith(PRESET_PREFIX):
            hint = f"; files shipped with feddtl: {', '.join(preset_class_names()) or 'none'}"
        raise DatasetError(f"data.class_names_file: cannot read {file}: {err}{hint}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DatasetError(
            f"data.class_names_file: {file} holds no class names; write one name per line, in label order"
        )
    mapped = ["=" in line for line in lines]
    if any(mapped) and not all(mapped):
        plain = next(line for line, m in zip(lines, mapped) if not m)
        raise DatasetError(
            f"data.class_names_file: {file} mixes 'source = name' lines with plain names (e.g. {plain!r}); "
            "write every line one way"
        )
    sources = None
    names = lines
    if all(mapped):
        pairs = [tuple(part.strip() for part in line.split("=", 1)) for line in lines]
        empty = [line for line, (s, n) in zip(lines, pairs) if not s or not n]
        if empty:
            raise DatasetError(f"data.class_names_file: {file}: {empty[0]!r} needs a name on both sides of '='")
        sources = [s for s, _ in pairs]
        names = [n for _, n in pairs]
        repeated = _duplicates([_key(s) for s in sources])
        if repeated:
            raise DatasetError(f"data.class_names_file: {file} maps {repeated[:5]} more than once")
    duplicates = _duplicates(names)
    if duplicates:
        raise DatasetError(
            f"data.class_names_file: {file} names {duplicates[:5]} more than once; each class needs its own name"
        )
    return ClassNamesFile(file, names, sources)


def read_class_names(path: str, num_classes: int | None, dataset: str) -> list[str]:
    """The names of a plain file, in label order.

    ``num_classes``: how many classes ``dataset`` has (None: unknown, the labels are checked later).
    """
    names_file = load_class_names_file(path)
    if names_file.mapped:
        raise DatasetError(
            f"data.class_names_file: {names_file.path} maps the data set's own class names ('source = name'), but "
            f"{dataset} has none; write plain names, one per line, in label order"
        )
    names = names_file.names
    if num_classes is not None and len(names) != num_classes:
        raise DatasetError(
            f"data.class_names_file: {names_file.path} names {len(names)} classes but {dataset} has {num_classes}; "
            "write one name per line, in label order"
        )
    return names


def rename_classes(splits: DatasetSplits, path: str) -> DatasetSplits:
    """``splits`` with the class names of ``path``: a plain file renames (the count must match), a mapped one
    renames, reorders and selects."""
    names_file = load_class_names_file(path)
    if names_file.mapped:
        return remap_classes(splits, names_file)
    names = read_class_names(path, splits.train.num_classes, splits.name)
    splits.train.classnames = list(names)
    splits.test.classnames = list(names)
    return splits


def remap_classes(splits: DatasetSplits, names_file: ClassNamesFile) -> DatasetSplits:
    """Relabel ``splits`` by a mapped file: label i is the file's line i; unlisted classes are dropped."""
    assert names_file.sources is not None
    own = splits.classnames
    by_key: dict[str, int] = {}
    for label, name in enumerate(own):
        by_key.setdefault(_key(name), label)
    unknown = [s for s in names_file.sources if _key(s) not in by_key]
    if unknown:
        raise DatasetError(
            f"data.class_names_file: {names_file.path} maps {len(unknown)} class(es) {splits.name} does not have: "
            f"{unknown[:5]}; its classes: {own[:8]}{' ...' if len(own) > 8 else ''}"
        )
    old = np.array([by_key[_key(s)] for s in names_file.sources], dtype=np.int64)
    lookup = np.full(len(own), -1, dtype=np.int64)
    lookup[old] = np.arange(len(old))
    dropped = [own[c] for c in range(len(own)) if lookup[c] < 0]
    if dropped:
        log.warning(
            "%s: %d class(es) not listed in %s are left out with their images: %s",
            splits.name, len(dropped), names_file.path.name, ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""),
        )

    def relabel(ds: ImageDataset) -> ImageDataset:
        kept = ds.subset(np.flatnonzero(lookup[ds.labels] >= 0))
        kept.labels = lookup[kept.labels]
        kept.classnames = list(names_file.names)
        return kept

    return DatasetSplits(name=splits.name, train=relabel(splits.train), test=relabel(splits.test))
