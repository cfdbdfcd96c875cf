"""Hugging Face datasets: ``hf:<hub id>`` (``datasets.load_dataset``) or ``hf:<local path>``, a folder
written by ``save_to_disk`` or a folder of parquet files (a local clone of a hub data set), so it works
offline too.

The image column is the dataset's ``Image`` feature and the label column its ``ClassLabel`` feature, whose
names become the class names (``_`` shown as a space); ``data.hf_image_column``, ``data.hf_label_column``
and ``data.class_names_file`` override them. Without a test split the train split is divided by a seeded
stratified split, as for image folders. Only the label column is read at load time: an image is decoded
when a client (or the evaluation) asks for it, so a large data set costs no decoding at start-up.

``datasets`` is imported only here, inside the loader: it takes about a second to import and most runs
never need it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from feddtl.config.data_config import DataConfig

from .class_names import read_class_names
from .dataset import DatasetError, DatasetSplits, ImageDataset, with_test_cap
from .partition import stratified_split

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"

# Integer dtypes an unnamed label column may have (datasets.Value's dtype names).
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
# Integer columns taken as labels when no column is a ClassLabel (their names then come from a file).
_LABEL_NAMES = ("label", "labels")


class HFImages:
    """The image column of one split of a Hugging Face dataset, decoded a row at a time on demand."""

    def __init__(self, dataset: Any, column: str, where: str) -> None:
        import datasets

        # Only this column (a second image column is never decoded), and plain Python rows: a format saved with
        # the dataset (set_format("torch"), say) would hand out tensors instead of PIL images.
        dataset = dataset.select_columns([column]).with_format(None)
        if not dataset.features[column].decode:  # stored with decode=False: decode here all the same
            dataset = dataset.cast_column(column, datasets.Image())
        self._dataset = dataset
        self._column = column
        self._where = where

    def __len__(self) -> int:
        return len(self._dataset)

    def load(self, rows: np.ndarray) -> list[Image.Image]:
        out: list[Image.Image] = []
        for row in np.asarray(rows, dtype=np.int64).reshape(-1):
            try:
                image = self._dataset[int(row)][self._column]
            except Exception as err:  # decoding errors of PIL and of datasets alike: name the row
                raise DatasetError(
                    f"{self._where}: cannot decode the image of row {row}: {_first_line(err)}"
                ) from err
            if image is None:
                raise DatasetError(f"{self._where}: row {row} has no image (column {self._column!r} is empty there)")
            out.append(image)
        return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _describe(features: Any) -> str:
    """"image (Image), label (ClassLabel, 10 names), id (Value int64)": what the columns hold."""
    import datasets

    parts = []
    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            kind = f"ClassLabel, {feature.num_classes} names"
        elif isinstance(feature, datasets.Value):
            kind = f"Value {feature.dtype}"
        else:
            kind = type(feature).__name__
        parts.append(f"{column} ({kind})")
    return ", ".join(parts) or "none"


def _is_saved(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a DatasetDict or a single Dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def local_hf_format(path: Path) -> str | None:
    """What a local path holds that ``hf:<path>`` reads: "save_to_disk", "parquet" (one file, or a folder with
    .parquet files anywhere below, as a clone of a hub repository has them), or None (neither)."""
    if path.is_file():
        return "parquet" if path.suffix == ".parquet" else None
    if not path.is_dir():
        return None
    if _is_saved(path):
        return "save_to_disk"
    return "parquet" if next(path.rglob("*.parquet"), None) is not None else None


def _open(name: str, spec: str, config: DataConfig) -> dict[str, Any]:
    """The splits of ``spec`` (a local path or a hub id) by name."""
    import datasets

    path = Path(spec).expanduser()
    local = path.exists()
    if not local and (spec.startswith(("/", ".", "~")) or "\\" in spec):
        raise DatasetError(
            f"{name}: {path} does not exist; give a folder written by save_to_disk, a folder of parquet files, "
            "or a Hugging Face Hub id"
        )
    if local and _is_saved(path) and config.hf_subset is not None:
        raise DatasetError(
            f"{name}: data.hf_subset={config.hf_subset!r}, but a dataset written by save_to_disk has no subsets; "
            "unset data.hf_subset"
        )
    was_enabled = datasets.is_progress_bar_enabled()
    # datasets' own bars ("Generating train split", "Loading dataset shards") are noise next to the run's; a
    # download's bars are huggingface_hub's and stay (`feddtl run --quiet` turns those off).
    datasets.disable_progress_bars()
    try:
        if local and _is_saved(path):
            loaded = datasets.load_from_disk(str(path))
        elif local and path.is_file():
            if path.suffix != ".parquet":
                raise DatasetError(
                    f"{name}: {path} is a file but not a .parquet file; give a folder written by save_to_disk, a "
                    "folder of parquet files, or one .parquet file"
                )
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
        else:
            # A folder of data files (parquet, as a clone of a hub repository holds them) or a hub id; the
            # file names give the splits (train-*.parquet, test-*.parquet, ...).
            loaded = datasets.load_dataset(str(path) if local else spec, name=config.hf_subset)
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, its own ...)
        where = f"cannot read {path}" if local else f"cannot load {spec!r} from the Hugging Face Hub"
        hint = "" if local else (
            "; without network, give a local path: a folder written by save_to_disk or a folder of parquet files"
        )
        raise DatasetError(f"{name}: {where}: {_first_line(err)}{hint}") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}  # save_to_disk of a single Dataset, or one parquet file: one split, "train"
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    raise DatasetError(f"{name}: expected a Dataset or a DatasetDict, got {type(loaded).__name__}")


def _pick_split(name: str, splits: dict[str, Any], split: str, key: str) -> Any:
    if split not in splits:
        raise DatasetError(f"{name}: no split {split!r} ({key}); its splits: {', '.join(splits)}")
    return splits[split]


def _image_column(name: str, split: str, features: Any, column: str | None) -> str:
    """``column`` (checked: it exists and holds images), or the one Image column when it is None."""
    import datasets

    if column is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) == 1:
            return images[0]
        if not images:
            raise DatasetError(f"{name}: split {split!r} has no Image column; its columns: {_describe(features)}")
        raise DatasetError(
            f"{name}: split {split!r} has several Image columns ({', '.join(images)}); choose one with "
            "data.hf_image_column"
        )
    if column not in features:
        raise DatasetError(
            f"{name}: split {split!r} has no column {column!r} (data.hf_image_column); its columns: "
            f"{_describe(features)}"
        )
    if not isinstance(features[column], datasets.Image):
        raise DatasetError(
            f"{name}: column {column!r} of split {split!r} (data.hf_image_column) is not an Image column; its "
            f"columns: {_describe(features)}"
        )
    return column


def _label_column(name: str, split: str, features: Any, column: str | None) -> str:
    """``column`` (checked: it exists and holds integer labels), or the one ClassLabel column when it is None
    (failing that, an integer column named label or labels)."""
    import datasets

    if column is None:
        named = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(named) > 1:
            raise DatasetError(
                f"{name}: split {split!r} has several ClassLabel columns ({', '.join(named)}); choose one with "
                "data.hf_label_column"
            )
        unnamed = [c for c in _LABEL_NAMES if c in features and _is_int(features[c])]
        if named or unnamed:
            return (named or unnamed)[0]
        raise DatasetError(
            f"{name}: split {split!r} has no ClassLabel column (nor an integer 'label' column); its columns: "
            f"{_describe(features)}; choose one with data.hf_label_column"
        )
    if column not in features:
        raise DatasetError(
            f"{name}: split {split!r} has no column {column!r} (data.hf_label_column); its columns: "
            f"{_describe(features)}"
        )
    if not (isinstance(features[column], datasets.ClassLabel) or _is_int(features[column])):
        raise DatasetError(
            f"{name}: column {column!r} of split {split!r} (data.hf_label_column) holds no labels (a ClassLabel or "
            f"integers); its columns: {_describe(features)}; Dataset.class_encode_column turns strings into a "
            "ClassLabel"
        )
    return column


def _is_int(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in _INT_DTYPES


def _class_names(name: str, features: Any, column: str, class_names_file: str | None) -> list[str]:
    """The ClassLabel's names (``_`` shown as a space), or those of ``class_names_file`` when it is set."""
    import datasets

    feature = features[column]
    num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    if class_names_file is not None:
        return read_class_names(class_names_file, num_classes, f"{name} (column {column!r})")
    if num_classes is None:
        raise DatasetError(
            f"{name}: column {column!r} holds integer labels without names ({_describe({column: feature})}); "
            "give them in data.class_names_file, one name per line, in label order"
        )
    return [n.replace("_", " ") for n in feature.names]


def _raw_labels(name: str, split: str, dataset: Any, column: str) -> np.ndarray:
    """The label column as int64, read through Arrow: no image is decoded."""
    values = dataset.select_columns([column]).with_format("arrow")[:].column(column)
    if values.null_count:
        raise DatasetError(f"{name}: split {split!r} has {values.null_count} rows without a label (column {column!r})")
    return np.asarray(values.to_numpy(), dtype=np.int64)


def _check_labels(name: str, split: str, labels: np.ndarray, column: str, num_classes: int) -> np.ndarray:
    unlabelled = int(np.count_nonzero(labels < 0))
    if unlabelled:
        raise DatasetError(
            f"{name}: {unlabelled} of {len(labels)} rows of split {split!r} are unlabelled (label -1 in column "
            f"{column!r}); choose a labelled split"
        )
    if len(labels) and labels.max() >= num_classes:
        raise DatasetError(
            f"{name}: split {split!r} has label {labels.max()} in column {column!r}, but there are only "
            f"{num_classes} class names"
        )
    return labels


def _lazy(name: str, split: str, dataset: Any, labels: np.ndarray, image_col: str, names: list[str]) -> ImageDataset:
    source = HFImages(dataset, image_col, f"{name} split {split!r}")
    return ImageDataset(labels, names, source=source, rows=np.arange(len(labels)))


def load_hf(name: str, spec: str, config: DataConfig, seed: int) -> DatasetSplits:
    """``hf:<spec>``: the train split (``data.hf_train_split``) and the test split (``data.hf_test_split``;
    unset: "test" when there is one with labels, else a seeded stratified split of the train split)."""
    if not spec:
        raise DatasetError(f"{name!r}: give a Hugging Face Hub id or a local path after {HF_PREFIX}")
    splits = _open(name, spec, config)
    train_split = config.hf_train_split
    train_ds = _pick_split(name, splits, train_split, "data.hf_train_split")
    image_col = _image_column(name, train_split, train_ds.features, config.hf_image_column)
    label_col = _label_column(name, train_split, train_ds.features, config.hf_label_column)
    classnames = _class_names(name, train_ds.features, label_col, config.class_names_file)
    train_labels = _check_labels(
        name, train_split, _raw_labels(name, train_split, train_ds, label_col), label_col, len(classnames)
    )
    train = _lazy(name, train_split, train_ds, train_labels, image_col, classnames)

    test_split = config.hf_test_split
    auto = test_split is None and "test" in splits and train_split != "test"
    test_ds = None
    if test_split is not None or auto:
        test_split = test_split or "test"
        test_ds = _pick_split(name, splits, test_split, "data.hf_test_split")
        _image_column(name, test_split, test_ds.features, image_col)
        if label_col not in test_ds.features or test_ds.features[label_col] != train_ds.features[label_col]:
            raise DatasetError(
                f"{name}: the label column {label_col!r} of split {test_split!r} is not the train split's "
                f"({_describe({label_col: train_ds.features[label_col]})}); its columns: "
                f"{_describe(test_ds.features)}"
            )
        test_labels = _raw_labels(name, test_split, test_ds, label_col)
        if auto and len(test_labels) and np.all(test_labels < 0):
            # Hub test splits often come without labels (-1 throughout): as if there were no test split.
            log.warning(
                "%s: split 'test' has no labels; the test images are a stratified split of %r instead",
                name, train_split,
            )
            test_ds = None
    if test_ds is None:
        train_idx, test_idx = stratified_split(train_labels, config.test_fraction, seed)
        return with_test_cap(name, train.subset(train_idx), train.subset(test_idx), config, seed)
    test_labels = _check_labels(name, test_split, test_labels, label_col, len(classnames))
    test = _lazy(name, test_split, test_ds, test_labels, image_col, classnames)
    return with_test_cap(name, train, test, config, seed)
