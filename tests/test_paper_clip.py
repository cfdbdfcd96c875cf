"""The paper's grid by name (`paper-clip`): hub ids with local overrides, the CoOp-style class-name files, the dry
run, the preflight, and one real cell end to end on a 6-class Fashion-MNIST copy saved with save_to_disk and the
tiny CLIP, both given to the real suite through its environment variables."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.bench.plan import HubProbe, make_plan, preflight
from feddtl.bench.sources import resolve_dataset
from feddtl.bench.suite import SuiteError, load_suite
from feddtl.cli import main
from feddtl.data.class_names import load_class_names_file, preset_class_names
from feddtl.data.datasets import FASHION_MNIST_CLASSNAMES, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
LABEL_SKEW = ("cifar10", "cifar100", "eurosat", "oxford_pets", "flowers102", "caltech101", "food101")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the network, an earlier test's data root, or ~/.cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hugging Face cache: nothing is "cached"
    for var in ("FEDDTL_CLIP_DIR", "FEDDTL_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_the_suite_names_the_hub_ids_and_the_clip_weights() -> None:
    suite = load_suite("paper-clip")
    assert suite.clip is not None and suite.clip.hub == "openai/clip-vit-base-patch16"
    hubs = {key: s.hub for key, s in suite.datasets.items()}
    assert all(hubs[key] for key in LABEL_SKEW)  # every label-skew set by hub id (not verified here)
    assert hubs["domainnet"] is None and hubs["office_caltech10"] is None  # image folders only
    # without local copies the cells read the hub ids; the CoOp files ride along
    cells = {c.scenario: c.config for c in suite.cells(1) if c.method == "feddtl"}
    assert cells["cifar10-fs-path"].dataset == "hf:uoft-cs/cifar10"
    assert cells["cifar100-fs-dir"].data.hf_label_column == "fine_label"
    assert cells["eurosat-full-path"].data.class_names_file == "preset:eurosat.txt"
    assert cells["food101-fs-path"].data.hf_test_split == "validation"
    assert all(c.backbone == "hf-clip:openai/clip-vit-base-patch16" for c in cells.values())
    assert cells["domainnet-domain"].dataset.startswith("imagefolder-domains:")


@pytest.mark.parametrize(
    "name, count, mapped, first",
    [
        ("cifar100.txt", 100, False, "apple"),
        ("eurosat.txt", 10, True, "Annual Crop Land"),
        ("oxford_pets.txt", 37, True, "abyssinian"),
        ("flowers102.txt", 102, False, "pink primrose"),
        ("caltech101.txt", 100, True, "face"),  # CoOp: Faces_easy out, capitals sort first
        ("food101.txt", 101, True, "apple pie"),
    ],
)
def test_shipped_class_name_files(name: str, count: int, mapped: bool, first: str) -> None:
    names = load_class_names_file(f"preset:{name}")
    assert len(names.names) == count and names.mapped == mapped and names.names[0] == first
    assert name in preset_class_names()


def test_dry_run_lists_every_cell_and_what_is_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # execute: offline, no local copies
    assert main(["bench", "--suite", "paper-clip", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # assert: one row per cell, each hub id to fetch, and the summary of what is missing
    suite = load_suite("paper-clip")
    for cell in suite.cells():
        assert f"\n{cell.key} " in out
    assert "fetch openai/clip-vit-base-patch16 from the Hugging Face Hub" in out
    assert "fetch uoft-cs/cifar10 from the Hugging Face Hub" in out
    assert "missing here (10):" in out and "HF_HUB_OFFLINE=1" in out
    assert "DomainNet: no copy here and none on the hub" in out and "FEDDTL_DATA_ROOT not set" in out
    assert f"0 of {len(suite.cells())} cells have what they need here" in out
    # the real run stops before any work, naming the same things
    assert main(["bench", "--suite", "paper-clip", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "CLIP weights openai/clip-vit-base-patch16" in err and "timm/eurosat-rgb" in err and "FEDDTL_CLIP_DIR" in err
    assert not (tmp_path / "out").exists()


def test_hub_answers_are_asked_once_and_an_unreachable_hub_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a hub that knows one data set, then one that cannot be reached
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked: list[str] = []

    def hub(repo_type: str, repo_id: str) -> None:
        asked.append(repo_id)
        if repo_id != "uoft-cs/cifar10":
            response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}"))
            raise RepositoryNotFoundError(f"404 {repo_id}", response=response)

    probe = HubProbe(hub)
    assert probe.problem("dataset", "uoft-cs/cifar10") is None
    assert probe.problem("dataset", "uoft-cs/cifar10") is None
    assert "the hub has no dataset 'nobody/nothing'" in probe.problem("dataset", "nobody/nothing")
    assert asked == ["uoft-cs/cifar10", "nobody/nothing"]

    def down(repo_type: str, repo_id: str) -> None:
        asked.append(repo_id)
        raise ConnectionError("no route to host")

    probe = HubProbe(down)
    assert "not reachable" in probe.problem("model", "openai/clip-vit-base-patch16")
    assert "not reachable" in probe.problem("dataset", "timm/eurosat-rgb")
    assert asked[2:] == ["openai/clip-vit-base-patch16"]  # after the first failure the hub is not asked again


def test_a_local_copy_overrides_the_hub_id_whatever_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: $FEDDTL_DATA_ROOT with a save_to_disk copy, a parquet clone and an image folder
    monkeypatch.setenv("FEDDTL_DATA_ROOT", str(tmp_path))
    split = Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)], "label": [0]},
                              features=Features({"image": Image(), "label": ClassLabel(names=["a"])}))
    DatasetDict(train=split).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "clone" / "data").mkdir(parents=True)
    split.to_parquet(str(tmp_path / "clone" / "data" / "train-00000.parquet"))
    (tmp_path / "folder" / "a").mkdir(parents=True)
    table = {"hub": "someone/set", "hf_set": {"data": {"hf_image_column": "image"}}}
    # execute / assert
    found = {n: resolve_dataset(n, {**table, "local": f"${{FEDDTL_DATA_ROOT}}/{n}"}) for n in ("saved", "clone", "folder", "none")}
    assert (found["saved"].spec, found["saved"].detail) == (f"hf:{tmp_path / 'saved'}", "save_to_disk")
    assert (found["clone"].spec, found["clone"].detail) == (f"hf:{tmp_path / 'clone'}", "parquet")
    assert found["saved"].overrides == {"data": {"hf_image_column": "image"}}
    assert found["folder"].spec == f"imagefolder:{tmp_path / 'folder'}" and found["folder"].overrides == {}
    assert (found["none"].spec, found["none"].origin) == ("hf:someone/set", "hub")


def fashion_six(folder: Path, per_class: int = 20, test_per_class: int = 4) -> Path:
    """6 Fashion-MNIST classes, ``per_class`` images each (the last ``test_per_class`` of them in "test"), saved
    with save_to_disk with the columns CIFAR-10's hub copy has (img, label)."""
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    features = Features({"img": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSNAMES[:6])})
    rows: dict[str, dict[str, list]] = {"train": {"img": [], "label": []}, "test": {"img": [], "label": []}}
    for c in range(6):
        idx = np.flatnonzero(labels == c)[:per_class]
        for i, row in enumerate(idx):
            split = "test" if i >= per_class - test_per_class else "train"
            rows[split]["img"].append(images[row])
            rows[split]["label"].append(c)
    DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in rows.items()}).save_to_disk(str(folder))
    return folder


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST files (apt-get install dataset-fashion-mnist)")
def test_real_suite_runs_a_cell_on_local_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # 6-19 s on the 2-core machine (31 s once with both cores busy): a bench worker process and two tiny runs
    # prepare: local copies where the suite looks for them
    monkeypatch.setenv("FEDDTL_CLIP_DIR", str(build_tiny_clip(tmp_path / "clip")))
    monkeypatch.setenv("FEDDTL_DATA_ROOT", str(tmp_path / "data"))
    fashion_six(tmp_path / "data" / "cifar10")
    smaller = ["--scenarios", "cifar10-fs-path", "--methods", "zeroshot,feddtl", "--seeds", "1",
               "--set", "rounds=2", "--set", "num_clients=3", "--set", "data.image_size=32",
               "--set", "client.switch_round=1", "--set", "eval.every=1"]
    # execute: the dry run of the whole grid, then of the chosen cells
    assert main(["bench", "--suite", "paper-clip", "--dry-run"]) == 0
    whole = capsys.readouterr().out
    assert f"local copy {tmp_path / 'data' / 'cifar10'} (save_to_disk)" in whole
    assert f"read {tmp_path / 'clip'} (CLIPModel folder)" in whole
    assert "missing here (8):" in whole  # the other eight data sets, not the weights or cifar10
    assert "CLIP weights" not in whole.split("missing here")[1]
    out = tmp_path / "out"
    assert main(["bench", "--suite", "paper-clip", "--dry-run", "--out", str(out), *smaller]) == 0
    chosen = capsys.readouterr().out
    assert "nothing is missing here" in chosen and "2 of 2 cells have what they need here" in chosen
    # execute: the real run of those cells
    assert main(["bench", "--suite", "paper-clip", "--out", str(out), *smaller]) == 0
    # assert: both ran on the local copies, the report covers only them, the config says what was read
    run = out / "runs" / "cifar10-fs-path" / "feddtl" / "seed0"
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == f"hf:{tmp_path / 'data' / 'cifar10'}" and "precision" not in results  # float32
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["backbone"] == f"hf-clip:{tmp_path / 'clip'}" and config["data"]["hf_image_column"] == "img"
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["scenario"], r["method"]) for r in rows} == {("cifar10-fs-path", "zeroshot"), ("cifar10-fs-path", "feddtl")}
    assert tomllib.loads((out / "suite.toml").read_text())["bench"]["methods"] == ["zeroshot", "feddtl"]
    # the dry run now sees them finished
    assert main(["bench", "--suite", "paper-clip", "--dry-run", "--out", str(out), *smaller]) == 0
    assert "2 are finished in" in capsys.readouterr().out


def test_selection_and_overrides_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SuiteError, match="has no scenarios \\['nope'\\]"):
        load_suite("paper-clip").select(["nope"], None)
    assert main(["bench", "--suite", "paper-clip", "--dry-run", "--set", "rounds=zero"]) == 2
    assert "rounds: expected int" in capsys.readouterr().err
    assert main(["bench", "--suite", "paper-clip"]) == 2  # neither --out nor --dry-run
    assert "--out DIR is required" in capsys.readouterr().err


def test_preflight_of_a_suite_without_sources_still_checks_paths(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'base = "tiny"\nmethods = ["feddtl"]\n[[scenario]]\nname = "a"\n'
                    f'set = {{ dataset = "imagefolder:{tmp_path / "nowhere"}" }}\n')
    suite = load_suite(str(path))
    with pytest.raises(SuiteError, match="nowhere .* does not exist"):
        preflight(suite)
    plan = make_plan(suite, suite.cells(1))
    assert [c.status for c in plan.cells] == ["missing data"]
