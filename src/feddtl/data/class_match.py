"""A SuperNode's own classes matched onto the run's class list, by name.

Organisations name their folders their own way ("Ankle_boot", "ankle boot", "ANKLE  BOOT"), so names are
compared after ``normalise``: case folded, ``_`` read as a space, runs of spaces collapsed, ends trimmed.
A node class whose name the run does not know is excluded (its images are not used); the caller reports
it. A node left with no known class is an error naming both lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dataset import DatasetError


def normalise(name: str) -> str:
    """The form two class names are compared in: ``"Ankle_Boot "`` -> ``"ankle boot"``."""
    return " ".join(name.replace("_", " ").casefold().split())


def check_run_classes(names: Sequence[str], where: str) -> None:
    """DatasetError if two of the run's class names are one name once normalised (a node's class could not
    be told which it is)."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(normalise(name), name)
        if other != name:
            raise DatasetError(
                f"{where}: class names {other!r} and {name!r} are the same name once case, '_' and spaces are "
                "ignored; give each class a name of its own"
            )


@dataclass(frozen=True)
class ClassMatch:
    """Where each of a node's classes sits in the run's class list."""

    run_label: np.ndarray
    """(node classes,) int64: the run's label of each node class, -1 for an excluded one."""
    excluded: list[str]
    """The node's class names the run does not know, in the node's order."""

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        """Node labels -> run labels (-1 where excluded)."""
        return self.run_label[np.asarray(labels, dtype=np.int64)]


def match_classes(node_names: Sequence[str], run_names: Sequence[str], where: str) -> ClassMatch:
    """Match ``node_names`` onto ``run_names``; DatasetError when none matches (``where`` names the node's data)."""
    check_run_classes(run_names, "the run's class list")
    lookup = {normalise(name): label for label, name in enumerate(run_names)}
    run_label = np.array([lookup.get(normalise(name), -1) for name in node_names], dtype=np.int64)
    matched = run_label[run_label >= 0]
    if len(set(matched.tolist())) != len(matched):
        twice = sorted({run_names[c] for c in matched.tolist() if (matched == c).sum() > 1})
        raise DatasetError(f"{where}: several of its classes match the run's {twice}; merge them into one folder")
    if not len(matched):
        raise DatasetError(
            f"{where}: none of its classes {list(node_names)} is in the run's class list {list(run_names)} "
            "(compared ignoring case, '_' and spaces); rename its class folders or fix the run's class list"
        )
    excluded = [name for name, label in zip(node_names, run_label.tolist()) if label < 0]
    return ClassMatch(run_label=run_label, excluded=excluded)
