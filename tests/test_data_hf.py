"""Hugging Face datasets as a source (`dataset = "hf:<hub id or local path>"`): folders written by save_to_disk,
folders of parquet files, the Hub (faked), lazy decoding, column and class-name overrides, and the one-line
errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from feddtl.cli import main
from feddtl.data import DataConfig, DatasetError, ImageDataset, load_dataset

NAMES = [f"digit_{i}" for i in range(10)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' cache (parquet folders are converted to Arrow there) in the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def digits(n_per_class: int, offset: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """scikit-learn's 8x8 digits, n per class (taken from `offset` on), as uint8 images and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)
    idx = np.concatenate([np.flatnonzero(bunch.target == c)[offset : offset + n_per_class] for c in range(10)])
    return list(images[idx]), [int(y) for y in bunch.target[idx]]


def hf_split(n_per_class: int, offset: int = 0, label: object = None, **extra: tuple[list, object]) -> Dataset:
    """A Dataset with an Image column "image" and a label column "label" (a ClassLabel by default)."""
    images, labels = digits(n_per_class, offset)
    columns = {"image": images, "label": labels}
    features = {"image": Image(), "label": label if label is not None else ClassLabel(names=NAMES)}
    for name, (values, feature) in extra.items():
        columns[name] = values
        features[name] = feature
    return Dataset.from_dict(columns, features=Features(features))


def saved(tmp_path: Path, **splits: Dataset) -> str:
    """``splits`` written by save_to_disk; returns the dataset name ``hf:<folder>``."""
    folder = tmp_path / "saved"
    DatasetDict(splits).save_to_disk(str(folder))
    return f"hf:{folder}"


def one_line_error(name: str, config: DataConfig) -> str:
    with pytest.raises(DatasetError) as err:
        load_dataset(name, config, seed=0)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- loading


def test_saved_dataset_dict_loads_train_and_test_with_class_names(tmp_path: Path) -> None:
    # prepare
    name = saved(tmp_path, train=hf_split(6), test=hf_split(2, offset=6))
    # execute
    splits = load_dataset(name, DataConfig(), seed=0)
    # assert: the official splits, ClassLabel names with "_" shown as a space, images as RGB
    assert (len(splits.train), len(splits.test)) == (60, 20)
    assert splits.classnames == [f"digit {i}" for i in range(10)] == splits.test.classnames
    assert splits.train.labels.dtype == np.int64 and np.bincount(splits.test.labels).tolist() == [2] * 10
    image = splits.test.load_images([3])[0]
    assert image.mode == "RGB" and image.size == (8, 8)
    expected = digits(2, offset=6)[0][3]
    assert np.array_equal(np.asarray(image)[..., 0], expected)


def test_parquet_folder_without_test_split_gets_a_seeded_stratified_split(tmp_path: Path) -> None:
    # prepare: a folder of parquet files as a clone of a hub repository holds them, train split only
    (tmp_path / "pq" / "data").mkdir(parents=True)
    hf_split(5).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    config = DataConfig(test_fraction=0.4)
    # execute
    a = load_dataset(f"hf:{tmp_path / 'pq'}", config, seed=3)
    b = load_dataset(f"hf:{tmp_path / 'pq'}", config, seed=3)
    # assert: 2 of each class's 5 images held out, the same ones for the same seed
    assert np.bincount(a.test.labels).tolist() == [2] * 10 and np.bincount(a.train.labels).tolist() == [3] * 10
    pixels = [np.asarray(im) for im in a.test.load_images(range(len(a.test)))]
    again = [np.asarray(im) for im in b.test.load_images(range(len(b.test)))]
    assert all(np.array_equal(x, y) for x, y in zip(pixels, again))
    assert a.classnames[0] == "digit 0"


def test_single_saved_dataset_is_the_train_split_and_test_per_class_caps(tmp_path: Path) -> None:
    # prepare
    hf_split(6).save_to_disk(str(tmp_path / "single"))
    # execute
    splits = load_dataset(f"hf:{tmp_path / 'single'}", DataConfig(test_per_class=1), seed=0)
    # assert
    assert len(splits.train) == 50 and np.bincount(splits.test.labels).tolist() == [1] * 10


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Grows by one for every image datasets decodes."""
    count: list[int] = []
    original = Image.decode_example

    def counting(self: Image, value: dict, **kwargs: object) -> object:
        count.append(1)
        return original(self, value, **kwargs)

    monkeypatch.setattr(Image, "decode_example", counting)
    return count


def test_images_are_decoded_only_when_asked(tmp_path: Path, decoded: list[int]) -> None:
    # prepare
    name = saved(tmp_path, train=hf_split(6), test=hf_split(2, offset=6))
    # execute: load, split, subset (what the federation does before a client encodes its images)
    splits = load_dataset(name, DataConfig(), seed=0)
    client = splits.train.subset([5, 17, 42])
    after_load = len(decoded)
    images = client.load_images([0, 2])
    # assert: nothing decoded at start-up; then exactly the two images asked for
    assert after_load == 0 and "lazy" in repr(client)
    assert len(decoded) == 2 and len(images) == 2


def test_a_format_saved_with_the_dataset_still_gives_pil_images(tmp_path: Path) -> None:
    name = saved(tmp_path, train=hf_split(3).with_format("numpy"))
    splits = load_dataset(name, DataConfig(test_fraction=0.34), seed=0)
    assert splits.train.load_images([0])[0].mode == "RGB"


def test_column_overrides_pick_among_several_columns(tmp_path: Path) -> None:
    # prepare: two image columns and two label columns, so nothing can be guessed
    images, labels = digits(4)
    parity = ClassLabel(names=["even", "odd"])
    extra = {"flipped": ([im[:, ::-1] for im in images], Image()), "parity": ([y % 2 for y in labels], parity)}
    name = saved(tmp_path, train=hf_split(4, **extra))
    # execute
    ambiguous = one_line_error(name, DataConfig())
    splits = load_dataset(
        name, DataConfig(hf_image_column="flipped", hf_label_column="parity", test_fraction=0.5), seed=0
    )
    # assert
    assert "several Image columns (image, flipped)" in ambiguous and "data.hf_image_column" in ambiguous
    assert splits.classnames == ["even", "odd"]
    first = splits.train.load_images([0])[0]
    assert np.asarray(first).shape == (8, 8, 3)


def test_class_names_file_names_integer_labels(tmp_path: Path) -> None:
    # prepare: integer labels without names, and a file with one name per line
    name = saved(tmp_path, train=hf_split(4, label=Value("int64")))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"number {i}" for i in range(10)) + "\n\n")
    # execute
    splits = load_dataset(name, DataConfig(class_names_file=str(names)), seed=0)
    # assert
    assert splits.classnames == [f"number {i}" for i in range(10)]


def test_class_names_file_replaces_classlabel_names_and_other_datasets_names(tmp_path: Path) -> None:
    # prepare
    name = saved(tmp_path, train=hf_split(4))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join("zero one two three four five six seven eight nine".split()))
    # execute
    hf = load_dataset(name, DataConfig(class_names_file=str(names)), seed=0)
    sk = load_dataset("digits", DataConfig(class_names_file=str(names)), seed=0)
    # assert
    assert hf.classnames[:2] == ["zero", "one"] and hf.test.classnames == hf.classnames
    assert sk.classnames[9] == "nine"


def test_mapped_class_names_file_renames_orders_and_selects(tmp_path: Path) -> None:
    # prepare: "<dataset's name> = <name>" lines, in another order, another letter case and "_"/space, 4 of 10
    name = saved(tmp_path, train=hf_split(4), test=hf_split(2, offset=4))
    names = tmp_path / "coop.txt"
    names.write_text("# a comment line\nDIGIT 7 = seven\ndigit_2 = two\n\ndigit 0 = zero\ndigit_5 = five\n")
    # execute
    splits = load_dataset(name, DataConfig(class_names_file=str(names)), seed=0)
    # assert: the file's order is the label order (hence the base/novel split); the other classes are gone
    assert splits.classnames == ["seven", "two", "zero", "five"] == splits.test.classnames
    assert (len(splits.train), len(splits.test)) == (16, 8)
    image = splits.train.load_images([int(np.flatnonzero(splits.train.labels == 0)[0])])[0]
    assert np.array_equal(np.asarray(image)[..., 0], digits(4)[0][7 * 4])  # label 0 is the dataset's digit 7
    # the same file works on any source with those names (here an image folder would too: sklearn digits are
    # named "zero".."nine", so a file mapping them is read the same way)
    sk_names = tmp_path / "sk.txt"
    sk_names.write_text("nine = 9\none = 1\n")
    assert load_dataset("digits", DataConfig(class_names_file=str(sk_names)), seed=0).classnames == ["9", "1"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("digit 1 = one\ntwo\n", "mixes 'source = name' lines with plain names"),
        ("digit 1 = one\ndigit_1 = uno\n", "maps ['digit 1'] more than once"),
        ("digit 1 = one\ncat = two\n", "maps 1 class(es)"),
        ("digit 1 = \n", "needs a name on both sides"),
    ],
)
def test_mapped_class_names_file_errors(tmp_path: Path, text: str, message: str) -> None:
    name = saved(tmp_path, train=hf_split(2))
    names = tmp_path / "classes.txt"
    names.write_text(text)
    assert message in one_line_error(name, DataConfig(class_names_file=str(names)))


def test_shipped_class_names_files_by_preset_name(tmp_path: Path) -> None:
    # prepare: EuroSAT's folder names as the labels of a small copy
    eurosat = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
               "Residential", "River", "SeaLake"]
    name = saved(tmp_path, train=hf_split(3, label=ClassLabel(names=eurosat)))
    # execute
    splits = load_dataset(name, DataConfig(class_names_file="preset:eurosat"), seed=0)
    # assert: CoOp's names; an unknown preset names the shipped files
    assert splits.classnames[:3] == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]
    message = one_line_error(name, DataConfig(class_names_file="preset:nope.txt"))
    assert "cannot read" in message and "eurosat.txt" in message and "caltech101.txt" in message


def test_hub_id_goes_to_datasets_load_dataset_with_the_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a fake Hub (no network in tests)
    calls = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: object) -> DatasetDict:
        calls.append((path, name))
        return DatasetDict(train=hf_split(3), validation=hf_split(1, offset=3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = DataConfig(hf_subset="digits-8x8", hf_test_split="validation")
    # execute
    splits = load_dataset("hf:someone/digits", config, seed=0)
    # assert
    assert calls == [("someone/digits", "digits-8x8")]
    assert (len(splits.train), len(splits.test)) == (30, 10)


def test_unreachable_hub_is_one_line_naming_the_offline_way(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(path: str, name: str | None = None, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/digits' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = one_line_error("hf:someone/digits", DataConfig())
    assert "Couldn't reach" in message and "save_to_disk" in message and "more detail" not in message


# ----------------------------------------------------------------------------- bad input: one line, naming what exists


def test_missing_column_names_the_columns(tmp_path: Path) -> None:
    name = saved(tmp_path, train=hf_split(3))
    message = one_line_error(name, DataConfig(hf_label_column="fine_label"))
    assert "no column 'fine_label'" in message
    assert "image (Image), label (ClassLabel, 10 names)" in message


def test_non_image_column_is_rejected(tmp_path: Path) -> None:
    name = saved(tmp_path, train=hf_split(3))
    message = one_line_error(name, DataConfig(hf_image_column="label"))
    assert "'label'" in message and "not an Image column" in message and "image (Image)" in message


def test_no_image_column_at_all(tmp_path: Path) -> None:
    table = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=Features(
        {"text": Value("string"), "label": ClassLabel(names=["x", "y"])}
    ))
    name = saved(tmp_path, train=table)
    message = one_line_error(name, DataConfig())
    assert "no Image column" in message and "text (Value string)" in message


def test_labels_without_names_and_no_file(tmp_path: Path) -> None:
    name = saved(tmp_path, train=hf_split(3, label=Value("int64")))
    message = one_line_error(name, DataConfig())
    assert "'label' holds integer labels without names" in message and "data.class_names_file" in message


def test_string_labels_are_not_labels(tmp_path: Path) -> None:
    words = ([str(i) for i in range(30)], Value("string"))
    name = saved(tmp_path, train=hf_split(3, word=words))
    message = one_line_error(name, DataConfig(hf_label_column="word"))
    assert "'word'" in message and "class_encode_column" in message


@pytest.mark.parametrize("key", ["hf_test_split", "hf_train_split"])
def test_unknown_split_names_the_splits(tmp_path: Path, key: str) -> None:
    name = saved(tmp_path, train=hf_split(3), test=hf_split(1, offset=3))
    message = one_line_error(name, DataConfig(**{key: "validation"}))
    assert f"no split 'validation' (data.{key})" in message and "its splits: train, test" in message


def test_class_names_file_with_the_wrong_count(tmp_path: Path) -> None:
    name = saved(tmp_path, train=hf_split(3))
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    message = one_line_error(name, DataConfig(class_names_file=str(names)))
    assert "names 2 classes" in message and "has 10" in message


def test_missing_local_path(tmp_path: Path) -> None:
    message = one_line_error(f"hf:{tmp_path / 'nowhere'}", DataConfig())
    assert "does not exist" in message


def test_unlabelled_test_split_falls_back_to_a_stratified_split(tmp_path: Path) -> None:
    # prepare: the Hub's convention for a test split without labels: -1 throughout
    test = hf_split(1).cast_column("label", Value("int64")).map(lambda row: {"label": -1})
    test = test.cast_column("label", ClassLabel(names=NAMES))
    name = saved(tmp_path, train=hf_split(5), test=test)
    # execute
    splits = load_dataset(name, DataConfig(test_fraction=0.2), seed=0)
    explicit = one_line_error(name, DataConfig(hf_test_split="test"))
    # assert: unset, the train split is divided; named, it is an error
    assert np.bincount(splits.test.labels).tolist() == [1] * 10
    assert "unlabelled" in explicit


def test_an_undecodable_image_fails_when_used_naming_its_row(tmp_path: Path) -> None:
    # prepare: row 1 of the train split holds bytes that are no image; loading reads labels only, so it succeeds
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    pictures = digits(1)[0][:2]
    bad = Dataset.from_dict({"image": [pictures[0], {"bytes": b"not an image", "path": None}], "label": [0, 1]},
                            features=features)
    good = Dataset.from_dict({"image": pictures, "label": [0, 1]}, features=features)
    splits = load_dataset(saved(tmp_path, train=bad, test=good), DataConfig(), seed=0)
    # execute
    with pytest.raises(DatasetError) as err:
        splits.train.load_images([1])
    # assert
    assert "split 'train'" in str(err.value) and "row 1" in str(err.value)
    assert splits.train.load_images([0])[0].size == (8, 8)


def test_test_split_equal_to_the_train_split_is_a_config_error() -> None:
    from feddtl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.hf_test_split='train' is the train split too"):
        load_config("tiny", ["data.hf_test_split=train"])


# ----------------------------------------------------------------------------- the command line


@pytest.mark.usefixtures("one_thread")
def test_cli_runs_tiny_on_a_saved_hf_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], decoded: list[int]
) -> None:
    # prepare: 120 train and 30 test images
    name = saved(tmp_path, train=hf_split(12), test=hf_split(3, offset=12))
    out = tmp_path / "run"
    # execute
    code = main(
        ["run", "--config", "tiny", "--set", f"dataset={name}", "--set", "rounds=2", "--out", str(out), "--quiet"]
    )
    # assert
    assert code == 0, capsys.readouterr().err
    assert (out / "partition.png").stat().st_size > 0
    assert f"on {name}" in capsys.readouterr().out
    # every image decoded was one a client holds or one evaluated, each once (the trunk cache's images)
    results = json.loads((out / "results.json").read_text())
    assert len(decoded) == results["cache"]["images"] < 150


def test_cli_bad_hf_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = saved(tmp_path, train=hf_split(3))
    capsys.readouterr()  # save_to_disk's progress bar
    code = main(["run", "--config", "tiny", "--set", f"dataset={name}", "--set", "data.hf_image_column=label",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not an Image column" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the lazy ImageDataset


class CountingSource:
    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def load(self, rows: np.ndarray) -> list:
        from PIL import Image as PILImage

        self.asked.append([int(r) for r in rows])
        return [PILImage.new("L", (4, 4), color=int(r)) for r in rows]


def test_image_dataset_source_subset_stays_lazy_and_maps_rows() -> None:
    # prepare
    source = CountingSource()
    ds = ImageDataset(np.array([0, 1, 0, 1]), ["a", "b"], source=source, rows=np.array([10, 11, 12, 13]))
    # execute
    sub = ds.subset([3, 1])
    images = sub.load_images([1])
    # assert
    assert source.asked == [[11]] and images[0].mode == "RGB" and images[0].getpixel((0, 0)) == (11, 11, 11)
    with pytest.raises(ValueError, match="rows= with source="):
        ImageDataset(np.array([0]), ["a"], source=source)


def test_datasets_is_imported_only_inside_functions() -> None:
    # The CLI and the Flower ClientApp must stay quick to start: `datasets` (and pyarrow) take about a second
    # to import, so no module of feddtl imports it at its top level (only the hf: loader, when it runs).
    import ast

    import feddtl

    top_level = []
    for path in Path(feddtl.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            )
            if any(n == "datasets" or n.startswith("datasets.") for n in names):
                top_level.append(f"{path.name}:{node.lineno}")
    assert not top_level
