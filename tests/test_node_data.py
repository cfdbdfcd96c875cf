"""A SuperNode's own data (node-config ``data``): class matching, the boundary checks, the node's partition and
held-out images, evaluation by counts and their pooling. In memory and on small image folders; the loopback
run is in test_flower_deployment.py."""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import feddtl.flower.node as node_module
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cache import NodeCache
from feddtl.config import ConfigError, load_config
from feddtl.config.node_data_config import NodeDataConfig
from feddtl.data import DatasetError, load_dataset
from feddtl.data.class_match import match_classes, normalise
from feddtl.evaluation import ClassCounts, EvalCounts, evaluate, evaluate_counts, pool_counts
from feddtl.flower import eval_records
from feddtl.flower.node import NodeData, OwnSource
from feddtl.flower.records import RecordError
from feddtl.server.experiment import run_experiment

from image_folders import write_digit_folder

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ("zero", "one", "two", "three", "four", "five")
"""The run's classes: base zero, one, two; novel three, four, five."""


# ----- class matching --------------------------------------------------------------------------------


def test_class_names_match_ignoring_case_underscores_and_spaces() -> None:
    # execute
    match = match_classes(["Ankle_Boot", "  T-shirt ", "bag"], ["t-shirt", "ankle boot", "coat"], "node data")
    # assert: the run's labels, in the node's class order; "bag" is not the run's
    assert normalise("Ankle__BOOT ") == "ankle boot"
    assert match.run_label.tolist() == [1, 0, -1]
    assert match.excluded == ["bag"]
    assert match.map_labels(np.array([2, 0, 0, 1])).tolist() == [-1, 1, 1, 0]


def test_a_node_with_no_class_of_the_run_is_an_error_naming_both_lists() -> None:
    with pytest.raises(DatasetError) as err:
        match_classes(["zebra", "lion"], list(RUN), "this SuperNode's data imagefolder:/x")
    message = str(err.value)
    assert "imagefolder:/x" in message and "['zebra', 'lion']" in message and str(list(RUN)) in message
    assert "\n" not in message


def test_names_that_normalise_alike_are_refused() -> None:
    with pytest.raises(DatasetError, match="'Coat' and 'coat' are the same name"):
        match_classes(["coat"], ["Coat", "coat"], "node data")
    with pytest.raises(DatasetError, match=re.escape("several of its classes match the run's ['coat']")):
        match_classes(["coat", "COAT"], ["coat", "bag"], "node data")


# ----- boundary checks -------------------------------------------------------------------------------


def test_node_config_data_is_checked_where_it_is_read(tmp_path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert NodeDataConfig.from_node_config({"partition-id": 0}).source is None
    assert NodeDataConfig.from_node_config({"data": f"imagefolder:{tmp_path}"}).own
    for value, message in [
        (3, "must be a string"),
        (f"folder:{tmp_path}", "must start with one of imagefolder:, hf:"),
        (f"imagefolder:{tmp_path}/nowhere", "does not exist on this SuperNode's machine"),
        (f"imagefolder:{file}", "is not a folder"),
        ("hf:", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            NodeDataConfig.from_node_config({"data": value})
        assert str(err.value).startswith("node config data=") and "\n" not in str(err.value)


def test_node_local_needs_a_class_list_and_runs_on_the_deployment_engine_only(tmp_path) -> None:
    with pytest.raises(ConfigError, match="dataset='node-local' needs data.class_names_file"):
        load_config("tiny", ["dataset='node-local'"])
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(RUN))
    config = load_config("tiny", ["dataset='node-local'", f"data.class_names_file='{classes}'"])
    with pytest.raises(ConfigError, match="eval.on='validation' is not available"):
        load_config("tiny", ["dataset='node-local'", f"data.class_names_file='{classes}'", "eval.on='validation'"])
    # in process: refused before anything is written
    with pytest.raises(ConfigError, match="run it on the Deployment Engine"):
        run_experiment(config, tmp_path / "run", progress=False, log_fn=lambda s: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DatasetError, match="no data on this machine"):
        load_dataset("node-local", config.data, seed=0)


# ----- a node's own data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    (folder / "classes.txt").write_text("\n".join(RUN) + "\n")
    clip = build_tiny_clip(folder / "clip", seed=0, image_size=32)
    return load_config("tiny", [
        "num_clients=2", "dataset='node-local'", f"data.class_names_file='{folder / 'classes.txt'}'",
        f"backbone='hf-clip:{clip}'",
    ])


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> OwnSource:
    """Base classes zero (12 images) and one, novel three, and zebra, which the run does not know."""
    root = tmp_path_factory.mktemp("org")
    write_digit_folder(root, {"zero": 0, "One": 1, "three": 3, "zebra": 9}, per_class=10)
    write_digit_folder(root, {"zero": 0}, per_class=2, skip=10)  # two more files in zero/
    return OwnSource(f"imagefolder:{root}", RUN)


def test_own_data_are_the_partition_with_shots_and_held_out_images(config, own, tmp_path) -> None:
    # execute
    data = NodeData(config, NodeCache(tmp_path, 2**30), own)
    part, held = data.partition(1), data.holdout(1)
    # assert: base classes only, `shots` (8) per class; zebra left out; 20% of each class held out
    assert part.base_names == ["zero", "one", "two"] and part.excluded == ["zebra"]
    assert torch.bincount(part.labels, minlength=3).tolist() == [8, 8, 0]
    assert torch.bincount(held.base_labels, minlength=3).tolist() == [2, 2, 0]  # round(12 * 0.2), round(10 * 0.2)
    assert torch.bincount(held.novel_labels, minlength=3).tolist() == [2, 0, 0]
    train = data.splits().train  # the indices are the node's own train split's
    assert sorted({train.classnames[c] for c in train.labels[part.indices]}) == ["One", "zero"]
    # the same seeded rule as a partition of a shared dataset: another partition id draws other shots
    other = NodeData(config, None, own).partition(0)
    assert other.indices.tolist() != part.indices.tolist()


def test_a_later_message_loads_the_own_data_entries_without_the_images(config, own, tmp_path, monkeypatch) -> None:
    # prepare: a first message builds the entries
    first = NodeData(config, NodeCache(tmp_path, 2**30), own)
    _, built = first.eval_set(0)
    train = first.client(0, text_tower=False)[1]
    # execute: a fresh process's NodeData must not open the folder again
    monkeypatch.setattr(node_module, "load_own", _fail)
    later = NodeData(config, NodeCache(tmp_path, 2**30), own)
    _, loaded = later.eval_set(0)
    # assert
    assert later.partition(0).excluded == ["zebra"]
    q = torch.arange(len(built.base_features))
    assert torch.equal(loaded.base_features[q], built.base_features[q]) and torch.equal(loaded.base_labels, built.base_labels)
    assert torch.equal(later.client(0, text_tower=False)[1].labels, train.labels)
    assert {e.split(": ")[1] for e in later.cache.events} == {"hit"}
    assert {e.kind for e in later.cache.entries()} == {"partition", "holdout", "backbone", "trunk"}


def test_a_node_with_no_base_class_is_an_error(config, tmp_path) -> None:
    write_digit_folder(tmp_path, {"three": 3, "four": 4}, per_class=5)
    data = NodeData(config, None, OwnSource(f"imagefolder:{tmp_path}", RUN))
    with pytest.raises(DatasetError, match=r"none of its training images is of a base class of the run \['zero', 'one', 'two'\]"):
        data.partition(0)


def _fail(*args, **kwargs):
    raise AssertionError("the node's data were loaded although the node cache had everything")


# ----- evaluation by counts ---------------------------------------------------------------------------


def test_counts_give_the_accuracies_evaluate_gives(config, own) -> None:
    # prepare: the node's held-out images, random class embeddings
    data = NodeData(config, None, own)
    backbone, eval_set = data.eval_set(0)
    g = torch.Generator().manual_seed(0)
    base_T, novel_T, local_T = (torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1) for _ in range(3))
    # execute
    counts = evaluate_counts(backbone, eval_set, base_T, novel_T, 4)
    personal = evaluate_counts(backbone, eval_set, base_T, novel_T, 4, local_T=local_T)
    # assert: the same numbers as the in-process evaluation of that one client
    expected = evaluate(backbone, eval_set, base_T, novel_T, 4)
    assert counts.base.accuracy() == pytest.approx(expected["base_acc"])
    assert counts.novel.accuracy() == pytest.approx(expected["novel_acc"])
    assert counts.local.accuracy() == pytest.approx(expected["local_acc_per_client"][0])
    assert personal.local.accuracy() == pytest.approx(
        evaluate(backbone, eval_set, base_T, novel_T, 4, client_base_T=[local_T])["local_acc_per_client"][0]
    )
    assert counts.base.total.tolist() == [2, 2, 0] and counts.novel.total.tolist() == [2, 0, 0]


def _counts(base: tuple[list[int], list[int]], novel: tuple[list[int], list[int]], local=None) -> EvalCounts:
    def make(pair):
        return ClassCounts(torch.tensor(pair[0]), torch.tensor(pair[1]))

    return EvalCounts(make(base), make(novel), make(local or base))


def test_pooled_accuracy_counts_every_image_once() -> None:
    # prepare: client 0 holds 2 base images (both right), client 1 holds 8 (2 right); client 2 did not answer
    per_client = {
        0: _counts(([2, 0], [2, 0]), ([1], [1])),
        1: _counts(([1, 1], [4, 4]), ([0], [3])),
    }
    # execute
    out = pool_counts(per_client, 3, ["a", "b"], ["c"])
    # assert: pooled by count (4 of 10), not the mean of the clients' accuracies (62.5)
    assert out["base_acc"] == pytest.approx(40.0) and out["novel_acc"] == pytest.approx(25.0)
    assert out["hm"] == pytest.approx(2 * 40 * 25 / 65) and out["local_acc"] == pytest.approx(40.0)
    assert out["local_acc_per_client"][:2] == [100.0, 25.0] and np.isnan(out["local_acc_per_client"][2])
    assert out["evaluation"] == "nodes"
    assert out["eval_counts"]["per_class"]["base"] == {"classes": ["a", "b"], "correct": [3, 1], "total": [6, 4]}
    assert out["eval_counts"]["per_client"]["1"] == {"base": [2, 8], "novel": [0, 3], "local": [2, 8]}


def test_evaluation_records_round_trip_and_bad_counts_are_refused() -> None:
    counts = _counts(([2, 0], [2, 1]), ([1], [1]))
    back = eval_records.counts_from_records(eval_records.counts_to_records(counts), 2, 1)
    assert torch.equal(back.base.correct, counts.base.correct) and torch.equal(back.novel.total, counts.novel.total)
    with pytest.raises(RecordError, match="more base images correct than there are"):
        eval_records.counts_from_records(eval_records.counts_to_records(_counts(([3, 0], [2, 1]), ([1], [1]))), 2, 1)
    with pytest.raises(RecordError, match="'novel_correct'] must be 2 int64 counts"):
        eval_records.counts_from_records(eval_records.counts_to_records(counts), 2, 2)
    lora = {"a": torch.zeros(2, 3)}
    T = torch.zeros(2, 4)
    content = eval_records.eval_to_records("x", list(RUN), 1, lora, T, torch.zeros(1, 4))
    got = eval_records.eval_from_records(content, lora, 2, 1, 4)
    assert torch.equal(got[0]["a"], lora["a"]) and got[3] is None
    with pytest.raises(RecordError, match=r"eval.text\['novel'\] must be a float \(3, 4\)"):
        eval_records.eval_from_records(content, lora, 2, 3, 4)
