"""A SuperNode's own data (node-config ``data``) as the run's client: its classes matched onto the run's,
its training images and its held-out test images.

The node partitions nothing: its data are its partition. The same rules as a partition of a shared dataset
apply otherwise: training uses the images of the run's base classes only, at most ``shots`` per class (or
``max_train_per_client``), drawn with the in-process seed of its partition id (``subsample_client``); the
test images are its data's test split, or a seeded stratified split (``data.test_fraction``) when it has
none, capped as the server caps its own (``data.test_per_class``). The node's data are read with the run's
``[data]`` settings (image size, test fraction, hf columns) but never the server's ``class_names_file``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from feddtl.config import ExperimentConfig
from feddtl.data import DatasetError, DatasetSplits, cap_per_class, load_dataset
from feddtl.data.class_match import match_classes
from feddtl.federation import ClassSplit, split_classes, subsample_client, to_base_index


@dataclass
class Holdout:
    """A node's test images of the run's classes, for evaluation on the node."""

    base_indices: np.ndarray
    """Indices into the node's test split of its base-class images (int64)."""
    base_labels: torch.Tensor
    """(N_b,) base-class indices."""
    novel_indices: np.ndarray
    novel_labels: torch.Tensor
    """(N_n,) novel-class indices."""


@dataclass
class OwnData:
    """What a node's own data give the run: its training images, its held-out images, what was left out."""

    classes: ClassSplit
    """The run's classes (not the node's)."""
    indices: np.ndarray
    """Training-image indices into the node's train split (int64)."""
    labels: torch.Tensor
    """(N,) base-class indices of those images."""
    holdout: Holdout
    excluded: list[str]
    """The node's class names the run does not know (their images are unused)."""


def load_own(source: str, config: ExperimentConfig) -> DatasetSplits:
    """The node's data with the run's [data] settings, without the server's class-names file."""
    return load_dataset(source, replace(config.data, class_names_file=None), seed=config.seed)


def own_data(config: ExperimentConfig, splits: DatasetSplits, run_names: list[str], client_id: int) -> OwnData:
    """``splits`` (the node's data, ``load_own``) as client ``client_id`` of a run whose classes are ``run_names``."""
    where = f"this SuperNode's data {splits.name}"
    match = match_classes(splits.classnames, run_names, where)
    classes = split_classes(config, run_names)
    train = match.map_labels(splits.train.labels)
    pool = np.flatnonzero(np.isin(train, classes.base))
    if not len(pool):
        known = [run_names[c] for c in sorted(set(train[train >= 0].tolist()))]
        raise DatasetError(
            f"{where}: none of its training images is of a base class of the run {classes.base_names} (it holds "
            f"{known}); a SuperNode trains on base classes only and needs images of at least one"
        )
    indices = np.asarray(subsample_client(config, train, pool, client_id), dtype=np.int64)
    test = match.map_labels(splits.test.labels)
    groups = []
    for group in (classes.base, classes.novel):
        idx = np.flatnonzero(np.isin(test, group))
        if config.data.test_per_class is not None:  # as the server's build_eval_set caps its test sets
            idx = cap_per_class(test, idx, config.data.test_per_class, seed=config.seed + 3000)
        groups.append((np.asarray(idx, dtype=np.int64), to_base_index(test[idx], group)))
    (bi, bl), (ni, nl) = groups
    return OwnData(
        classes=classes,
        indices=indices,
        labels=to_base_index(train[indices], classes.base),
        holdout=Holdout(bi, bl, ni, nl),
        excluded=match.excluded,
    )
