"""Datasets, image transforms and federated partitions."""

from feddtl.config.data_config import DataConfig
from .dataset import DatasetError, DatasetSplits, ImageDataset
from .datasets import (
    DATASETS,
    available_datasets,
    load_dataset,
    read_idx,
)
from .partition import (
    PARTITION_SCHEMES,
    cap_per_class,
    few_shot,
    holdout_per_class,
    partition,
    split_base_novel,
    stratified_split,
)
from .transforms import dataset_to_tensor, images_to_tensor

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "DataConfig",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "available_datasets",
    "cap_per_class",
    "dataset_to_tensor",
    "few_shot",
    "holdout_per_class",
    "images_to_tensor",
    "load_dataset",
    "partition",
    "read_idx",
    "split_base_novel",
    "stratified_split",
]
