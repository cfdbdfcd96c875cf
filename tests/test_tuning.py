"""The tuning protocol (issue 14): the validation hold-out, the tuning sweep, and grids that apply its choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from feddtl.bench.knobs import OPEN_KNOBS
from feddtl.bench.suite import SuiteError, load_suite
from feddtl.bench.tune import select, write_tuning
from feddtl.bench.tuned import load_tuned, tuned_text
from feddtl.bench.tuning import load_tuning_suite
from feddtl.cli import main
from feddtl.config import ConfigError, load_config
from feddtl.config.registry import available_methods
from feddtl.data import DatasetSplits, ImageDataset, holdout_per_class, split_base_novel
from feddtl.federation import class_split, client_indices, validation_indices

# ----- the validation hold-out ------------------------------------------------------------------------


def _id_coded_splits(n_train_per_class: int = 60, n_test_per_class: int = 20, domains: int = 0) -> DatasetSplits:
    """10 classes; every image's first two pixels spell its unique id (train ids first, then test ids)."""
    def make(n: int, start: int) -> ImageDataset:
        labels = np.repeat(np.arange(10), n)
        ids = np.arange(start, start + len(labels))
        images = np.zeros((len(labels), 8, 8), np.uint8)
        images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
        extra = {}
        if domains:
            extra = {"domains": np.arange(len(labels)) % domains, "domain_names": [f"d{i}" for i in range(domains)]}
        return ImageDataset(labels, [f"c{i}" for i in range(10)], images=images, **extra)

    train = make(n_train_per_class, 0)
    return DatasetSplits("ids", train, make(n_test_per_class, len(train)))


def _ids(ds: ImageDataset, idx: np.ndarray) -> set[int]:
    return {int(a[0, 0]) * 256 + int(a[0, 1]) for a in (np.asarray(im.convert("L")) for im in ds.load_images(idx))}


@pytest.mark.parametrize("partition", ["pathological", "dirichlet", "iid"])
def test_validation_holdout_is_disjoint_from_every_client_and_from_the_test_split(partition):
    # prepare: id-coded images, a validation config
    splits = _id_coded_splits()
    config = load_config("tiny", [
        "eval.on=validation", "eval.validation_per_class=25", f"partition={partition}", "shots=none", "num_clients=3",
    ])
    classes = class_split(config, splits)
    # execute
    held = validation_indices(config, splits)
    parts = client_indices(config, splits, classes)
    # assert: 25 per class (base and novel), none held by a client, all from the training split
    assert held is not None and len(held) == 250
    assert np.bincount(splits.train.labels[held], minlength=10).tolist() == [25] * 10
    val_ids = _ids(splits.train, held)
    test_ids = _ids(splits.test, np.arange(len(splits.test)))
    for part in parts:
        assert not val_ids & _ids(splits.train, part)
    assert not val_ids & test_ids and max(val_ids) < min(test_ids)
    # full data: the clients hold every base-class training image but the held-out ones
    assert sum(len(p) for p in parts) == 5 * (60 - 25)
    # test mode (the default) holds nothing out: the partition is what it always was
    assert validation_indices(load_config("tiny"), splits) is None


def test_holdout_spreads_over_domains_and_refuses_to_take_more_than_half():
    splits = _id_coded_splits(n_train_per_class=70, domains=7)
    labels, domains = splits.train.labels, splits.train.domains
    held = holdout_per_class(labels, 20, seed=4, groups=domains)
    counts = np.zeros((10, 7), int)
    np.add.at(counts, (labels[held], domains[held]), 1)
    assert counts.sum(axis=1).tolist() == [20] * 10
    assert counts.min() == 2 and counts.max() == 3  # 20 over 7 domains: 6 x 3 + ... evenly, never 0
    assert np.array_equal(held, holdout_per_class(labels, 20, seed=4, groups=domains))  # seeded
    with pytest.raises(ValueError, match="at most 5"):  # 10 per (class, domain): half is 5
        holdout_per_class(labels, 7 * 6, seed=0, groups=domains)
    config = load_config("tiny", ["eval.on=validation", "eval.validation_per_class=200"])
    with pytest.raises(ConfigError, match="eval.validation_per_class=200 is too many"):
        validation_indices(config, _id_coded_splits())


class _SealedTest(ImageDataset):
    """A test split whose images must not be read."""

    def load_images(self, indices):  # type: ignore[override]
        raise AssertionError("a test image was read")

    def subset(self, indices):  # type: ignore[override]
        raise AssertionError("the test split was subset")


def test_a_validation_run_never_reads_the_test_split(monkeypatch):
    # prepare: the tiny preset's data with a sealed test split
    import feddtl.federation as federation
    from feddtl.data import load_dataset

    def sealed(name, data, seed):
        splits = load_dataset(name, data, seed)
        test = splits.test
        return DatasetSplits(splits.name, splits.train, _SealedTest(test.labels, test.classnames, images=np.zeros((len(test), 8, 8), np.uint8)))

    monkeypatch.setattr(federation, "load_dataset", sealed)
    config = load_config("tiny", ["eval.on=validation", "eval.validation_per_class=20"])
    # execute: the whole build (data, partition, backbone, trunk cache, evaluation set)
    fed = federation.build_federation(config, log_fn=lambda s: None)
    # assert: the evaluation set is the hold-out (20 per class; tiny's digits: 5 base, 5 novel classes)
    assert len(fed.eval_set.base_labels) == 100 and len(fed.eval_set.novel_labels) == 100
    fed.cache.close()
    # the seal works: the test-mode evaluation set reads the test images and trips it
    test_mode = load_config("tiny")
    splits = sealed(test_mode.dataset, test_mode.data, test_mode.seed)
    with pytest.raises(AssertionError, match="test"):
        federation.build_eval_set(fed.backbone, test_mode, splits, federation.class_split(test_mode, splits), [])


# ----- the tuning suite ---------------------------------------------------------------------------------

TINY_TUNE = """
name = "tt"
base = "tiny"
seed = 7
configs = {configs}
methods = ["fedlora", "feddtl"]

[set]
rounds = 2
base_novel = "random"
base_novel_seed = 100
client = {{ switch_round = 1, sft_epochs = 1, rl_epochs = 1 }}
eval = {{ every = 2, on = "validation", validation_per_class = 20 }}

[[scenario]]
name = "a"
set = {{ partition = "pathological" }}

[[scenario]]
name = "b"
set = {{ partition = "pathological", classes_per_client = 3 }}

[[scenario]]
name = "c"
set = {{ partition = "iid" }}

[space.fedlora]
{fedlora}

[space.feddtl]
"client.lr" = {{ log = [3e-4, 3e-3] }}
"server.text_epochs" = [1, 2]
"""


def _tune_suite(tmp_path: Path, configs: int = 2, fedlora: str = '"client.lr" = [5e-4, 2e-3]', extra: str = "") -> Path:
    path = tmp_path / "tt.toml"
    path.write_text(TINY_TUNE.format(configs=configs, fedlora=fedlora) + extra)
    return path


def test_every_method_declares_its_open_knobs_and_they_are_config_keys():
    assert set(OPEN_KNOBS) == set(available_methods())
    config = load_config("tiny")
    for knobs in OPEN_KNOBS.values():
        for key in knobs:
            node = config
            for part in key.split("."):
                node = getattr(node, part)  # raises if the key is not in the config


def test_configurations_are_drawn_deterministically_with_the_default_first(tmp_path):
    tsuite = load_tuning_suite(str(_tune_suite(tmp_path, configs=4, fedlora='"client.lr" = { log = [1e-4, 1e-2] }')))
    again = load_tuning_suite(str(_tune_suite(tmp_path, configs=4, fedlora='"client.lr" = { log = [1e-4, 1e-2] }')))
    assert tsuite.points == again.points
    lrs = [p["client.lr"] for p in tsuite.points["fedlora"]]
    assert lrs[0] == 1e-3  # c0: the base config's value (the paper's)
    # Latin hypercube: the 3 drawn values fall one in each third of the log range
    thirds = sorted(int((math.log(x) - math.log(1e-4)) / (math.log(1e-2) - math.log(1e-4)) * 3) for x in lrs[1:])
    assert thirds == [0, 1, 2]
    cells = tsuite.cells()
    assert len(cells) == 3 * 2 * 4 and {c.config.seed for c in cells} == {7}
    assert cells[1].run_dir(tmp_path).parts[-3:] == ("fedlora", "c1", "seed7")
    assert cells[1].config.client.lr == lrs[1] and cells[1].record["tuning"] == {"config": 1, "values": tsuite.points["fedlora"][1]}


@pytest.mark.parametrize(
    "fedlora, extra, message",
    [
        # explicit points: 3 + the default = 4 configurations where the suite says 2
        ('points = [{ "client.lr" = 1e-4 }, { "client.lr" = 2e-4 }, { "client.lr" = 3e-4 }]', "",
         "method 'fedlora' gets 4 configurations .* configs = 2: every tuned method must get the same number"),
        ('"server.text_lr" = [1e-3]', "", "\\['server.text_lr'\\] are not open knobs of 'fedlora'"),
        ('"client.lr" = [1e-3]', "", "method 'fedlora'.s space has too few distinct configurations"),
        ('"client.lr" = { log = [0, 1e-3] }', "", "needs \\[low, high\\]"),
        ('"client.lr" = [5e-4]', "\n[space.promptfl]\n\"client.lr\" = [1e-3]\n", "not in methods \\['promptfl'\\]"),
    ],
)
def test_bad_tuning_suites_name_the_method_and_the_problem(tmp_path, fedlora, extra, message):
    with pytest.raises(SuiteError, match=message):
        load_tuning_suite(str(_tune_suite(tmp_path, fedlora=fedlora, extra=extra)))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('on = "validation", ', "", "evaluates on the validation hold-out"),
        ('base_novel = "random"\n', "", "fixes its own class split"),
        ('methods = ["fedlora", "feddtl"]', 'methods = ["fedlora", "feddtl", "zeroshot"]', "no open knobs"),
    ],
)
def test_a_tuning_suite_must_use_the_validation_holdout_and_its_own_split(tmp_path, old, new, message):
    path = _tune_suite(tmp_path)
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(SuiteError, match=message):
        load_tuning_suite(str(path))


def _write_result(out: Path, cell, hm: float, eval_on: str = "validation") -> None:
    d = cell.run_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    results = {"base_acc": hm + 2, "novel_acc": hm - 2, "hm": hm}
    if eval_on:
        results["eval_on"] = eval_on
    (d / "results.json").write_text(json.dumps(results))


def test_selection_picks_the_best_validation_hm_per_partition_type(tmp_path):
    # prepare: known validation HMs; scenarios a and b are both pathological and are averaged
    tsuite = load_tuning_suite(str(_tune_suite(tmp_path)))
    out = tmp_path / "out"
    hms = {
        ("a", "fedlora"): [50.0, 60.0], ("b", "fedlora"): [50.0, 30.0],  # means 50 / 45: c0 wins on pathological
        ("c", "fedlora"): [40.0, 70.0],  # c1 wins on iid
        ("a", "feddtl"): [55.0, 55.0], ("b", "feddtl"): [55.0, 55.0],  # a tie: the lower index (the default)
        ("c", "feddtl"): [float("nan"), 10.0],  # a diverged run (nan) never wins
    }
    for cell in tsuite.cells():
        _write_result(out, cell, hms[(cell.scenario, cell.method)][cell.record["tuning"]["config"]])
    # execute
    chosen, trials = select(tsuite, out)
    # assert
    assert chosen["fedlora"]["pathological"] == tsuite.points["fedlora"][0]
    assert chosen["fedlora"]["iid"] == tsuite.points["fedlora"][1]
    assert chosen["feddtl"]["pathological"] == tsuite.points["feddtl"][0]
    assert chosen["feddtl"]["iid"] == tsuite.points["feddtl"][1]
    winner = next(t for t in trials if t.winner and t.method == "fedlora" and t.partition == "pathological")
    assert winner.scenarios == ["a", "b"] and winner.hm == pytest.approx(50.0)
    assert len(trials) == 2 * 2 * 2 and sum(t.winner for t in trials) == 4
    # written and read back: the grid's view of the choice
    toml_path, md_path = write_tuning(tsuite, out)
    tuned = load_tuned(toml_path)
    assert tuned.chosen == chosen and tuned.split["base_novel_seed"] == 100 and tuned.seed == 7
    assert len(tuned.trials) == 8 and "**50.00**" in md_path.read_text()


def test_selection_refuses_unfinished_cells_and_test_scores(tmp_path):
    tsuite = load_tuning_suite(str(_tune_suite(tmp_path)))
    out = tmp_path / "out"
    cells = tsuite.cells()
    for cell in cells[1:]:
        _write_result(out, cell, 50.0)
    with pytest.raises(SuiteError, match="1 tuning cells have not finished"):
        select(tsuite, out)
    _write_result(out, cells[0], 50.0, eval_on="")  # a result scored on the test split
    with pytest.raises(SuiteError, match="not evaluated on the validation hold-out"):
        select(tsuite, out)


# ----- grids that apply tuned values ---------------------------------------------------------------------


def _tuned_file(path: Path, split_seed: int = 100, chosen: dict | None = None) -> Path:
    chosen = chosen or {
        "fedlora": {"pathological": {"client.lr": 0.002, "client.text_lr": "none"}, "iid": {"client.lr": 0.0005}},
        "feddtl": {"pathological": {"client.lr": 0.0007, "server.text_epochs": 2}, "iid": {"server.text_lr": 0.003}},
    }
    header = {"suite": "tt", "seed": 7, "configs": 2, "split": {"base_novel": "random", "base_novel_seed": split_seed, "datasets": ["digits"]}}
    path.write_text(tuned_text(header, chosen, []))
    return path


GRID = """
name = "g"
base = "tiny"
seeds = 2
methods = ["zeroshot", "fedlora", "feddtl"]
tuned = "{tuned}"

[set]
rounds = 2

[[scenario]]
name = "path"
set = {{ partition = "pathological" }}

[[scenario]]
name = "iid"
set = {{ partition = "iid" {extra} }}
"""


def _grid(tmp_path: Path, tuned: Path, extra: str = "") -> Path:
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(tuned=tuned, extra=extra))
    return path


def test_a_grid_applies_the_tuned_values_per_method_and_partition_type_and_records_them(tmp_path):
    tuned = _tuned_file(tmp_path / "tuned.toml")
    suite = load_suite(str(_grid(tmp_path, tuned)))
    cells = {(c.scenario, c.method, c.seed): c for c in suite.cells()}
    assert cells[("path", "fedlora", 1)].config.client.lr == 0.002
    assert cells[("path", "fedlora", 1)].config.client.text_lr is None
    assert cells[("iid", "fedlora", 0)].config.client.lr == 0.0005
    assert cells[("path", "feddtl", 0)].config.server.text_epochs == 2
    assert cells[("iid", "feddtl", 0)].config.server.text_lr == 0.003 and cells[("iid", "feddtl", 0)].config.client.lr == 1e-3
    record = cells[("path", "feddtl", 0)].record["tuned"]
    assert record["values"] == {"client.lr": 0.0007, "server.text_epochs": 2} and record["partition"] == "pathological"
    assert record["sha256"] == load_tuned(tuned).sha256
    assert cells[("path", "zeroshot", 0)].record["tuned"]["values"] == {}  # nothing to tune
    # --tuned replaces the suite's file
    other = _tuned_file(tmp_path / "other.toml", chosen={
        "fedlora": {"pathological": {"client.lr": 0.004}, "iid": {"client.lr": 0.004}},
        "feddtl": {"pathological": {"client.lr": 0.004}, "iid": {"client.lr": 0.004}},
    })
    assert {c.config.client.lr for c in load_suite(str(_grid(tmp_path, tuned)), tuned=str(other)).cells() if c.method != "zeroshot"} == {0.004}


@pytest.mark.parametrize(
    "extra, chosen, message",
    [
        (', client = { lr = 0.1 }', None, "sets \\['client.lr'\\], which the tuned file .* chooses"),
        (', base_novel = "random", base_novel_seed = 100', None, "is the tuning split"),
        ("", {"fedlora": {"pathological": {"client.lr": 0.002}}, "feddtl": {"pathological": {"client.lr": 0.002}}},
         "no values for method 'fedlora' on partition type 'iid'"),
        ("", {"fedlora": {"pathological": {}, "iid": {}}}, "no values for method 'feddtl'"),
    ],
)
def test_a_grid_refuses_clashes_the_tuning_split_and_gaps(tmp_path, extra, chosen, message):
    tuned = _tuned_file(tmp_path / "tuned.toml", chosen=chosen)
    with pytest.raises(SuiteError, match=message):
        load_suite(str(_grid(tmp_path, tuned, extra)))


def test_bench_set_may_not_override_a_tuned_knob(tmp_path):
    tuned = _tuned_file(tmp_path / "tuned.toml")
    grid = str(_grid(tmp_path, tuned))
    with pytest.raises(SuiteError, match="sets \\['client.lr'\\], which the tuned file .* chooses"):
        load_suite(grid, overrides=["client.lr=0.1"])  # `feddtl bench --set client.lr=0.1`
    assert {c.config.rounds for c in load_suite(grid, overrides=["rounds=3"]).cells()} == {3}


def test_a_grid_whose_tuned_file_is_missing_stops_before_any_work(tmp_path, capsys):
    path = _grid(tmp_path, tmp_path / "nowhere" / "tuned.toml")
    with pytest.raises(SuiteError, match="runs with tuned values from .*nowhere/tuned.toml, but that file does not exist"):
        load_suite(str(path))
    assert main(["bench", "--suite", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "feddtl tune --suite tune-lite" in err and "nothing was run" in err
    assert not (tmp_path / "out").exists()


# ----- the shipped suites ---------------------------------------------------------------------------------


def test_tune_lite_and_paper_lite_v2_implement_the_protocol(tmp_path):
    tsuite = load_tuning_suite("tune-lite")
    assert set(tsuite.points) == set(available_methods()) - {"zeroshot"}
    assert {len(p) for p in tsuite.points.values()} == {tsuite.configs}
    cells = tsuite.cells()
    assert {c.config.partition for c in cells} == {"pathological", "dirichlet", "iid", "domain"}
    assert {c.config.shots for c in cells} == {16} and {c.config.eval.on for c in cells} == {"validation"}
    tune_seed = cells[0].config.base_novel_seed
    # a tuned file as tune-lite would write it (every method x partition type; values: each c0)
    chosen = {m: {p: tsuite.points[m][0] for p in ("pathological", "dirichlet", "iid", "domain")} for m in tsuite.points}
    tuned = tmp_path / "tuned.toml"
    header = {"suite": "tune-lite", "seed": tsuite.seed, "configs": tsuite.configs,
              "split": {"base_novel": "random", "base_novel_seed": tune_seed, "datasets": ["digits-domains", "fashion-mnist"]}}
    tuned.write_text(tuned_text(header, chosen, []))
    grid = load_suite("paper-lite-v2", tuned=str(tuned))
    gcells = grid.cells()
    assert grid.seeds == 5 and len(grid.scenarios) == 8 and len(gcells) == 8 * 7 * 5
    assert {c.config.data.test_per_class for c in gcells if c.config.dataset == "fashion-mnist"} == {1000}
    assert {c.config.data.test_per_class for c in gcells if c.config.dataset == "digits-domains"} == {None}
    split2 = {(c.config.base_novel, c.config.base_novel_seed) for c in gcells if c.config.base_novel == "random"}
    assert len(split2) == 1
    (_, seed2), = split2
    splits = {tuple(split_base_novel(10, "half")[0]), tuple(split_base_novel(10, "random", tune_seed)[0]),
              tuple(split_base_novel(10, "random", seed2)[0])}
    assert len(splits) == 3  # the grid's two splits and the tuning split are three different splits
    # without a tuned file the grid says so
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite("paper-lite-v2", tuned=str(tmp_path / "missing.toml"))


# ----- end to end --------------------------------------------------------------------------------------


def test_tune_then_grid_end_to_end(tmp_path, capsys):
    # prepare: 2 methods x 2 configurations on one tiny scenario, then a grid of those methods
    path = _tune_suite(tmp_path)
    path.write_text(path.read_text().split('[[scenario]]\nname = "b"')[0] + '[space.fedlora]\n"client.lr" = [5e-4, 2e-3]\n'
                    '[space.feddtl]\n"client.lr" = { log = [3e-4, 3e-3] }\n"server.text_epochs" = [1, 2]\n')
    out = tmp_path / "tune"
    # execute
    assert main(["tune", "--suite", str(path), "--out", str(out), "--jobs", "2"]) == 0
    # assert: every cell scored on the hold-out, a choice per method, the table printed
    results = [json.loads(p.read_text()) for p in (out / "runs").rglob("results.json")]
    assert len(results) == 4 and {r["eval_on"] for r in results} == {"validation"}
    assert {r["tuning"]["config"] for r in results} == {0, 1}
    tuned = load_tuned(out / "tuned.toml")
    assert set(tuned.chosen) == {"fedlora", "feddtl"} and set(tuned.chosen["fedlora"]) == {"pathological"}
    assert "Tuning sweep `tt`" in capsys.readouterr().out
    # the grid runs with the choice and records it
    grid = tmp_path / "g.toml"
    grid.write_text(
        f'name = "g"\nbase = "tiny"\nseeds = 1\nmethods = ["zeroshot", "fedlora"]\ntuned = "{out / "tuned.toml"}"\n'
        '[set]\nrounds = 2\n[[scenario]]\nname = "path"\nset = { partition = "pathological" }\n'
    )
    assert main(["bench", "--suite", str(grid), "--out", str(tmp_path / "grid"), "--jobs", "2"]) == 0
    cell = json.loads((tmp_path / "grid" / "runs" / "path" / "fedlora" / "seed0" / "results.json").read_text())
    assert cell["tuned"]["values"] == tuned.chosen["fedlora"]["pathological"] and "eval_on" not in cell
    assert (tmp_path / "grid" / "tuned.toml").read_text() == (out / "tuned.toml").read_text()
    table = (tmp_path / "grid" / "table.md").read_text()
    assert "## Tuned values" in table and "| zeroshot | pathological | (no open knobs) |" in table
    # a second `feddtl tune` finds every cell finished and only rewrites the choice
    assert main(["tune", "--suite", str(path), "--out", str(out)]) == 0
    assert "0 ran now" in capsys.readouterr().out
