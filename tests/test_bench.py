"""The bench harness: suites, preflight, aggregation, and the smoke suite end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from feddtl.bench.report import write_report
from feddtl.bench.runner import is_finished
from feddtl.bench.plan import preflight
from feddtl.bench.suite import SuiteError, available_suites, cell_config_text, federation_key, load_suite
from feddtl.cli import main

METHODS = ["zeroshot", "fedlora", "promptfl", "fedpgp", "feddtl-decoupled", "feddtl-twostage", "feddtl"]


def _write_suite(path: Path, body: str) -> Path:
    path.write_text('name = "t"\nbase = "tiny"\nmethods = ["feddtl", "fedlora"]\n' + body)
    return path


def test_named_suites_load_and_cover_the_grid():
    assert {"smoke", "paper-lite", "paper-clip"} <= set(available_suites())
    lite = load_suite("paper-lite")
    assert lite.seeds == 3 and set(METHODS) <= set(lite.methods)
    cells = lite.cells()
    assert len(cells) == len(lite.scenarios) * len(lite.methods) * 3
    shots = {(c.config.shots, c.config.partition) for c in cells if c.config.dataset == "fashion-mnist"}
    assert shots == {(s, p) for s in (16, None) for p in ("pathological", "dirichlet", "iid")}
    assert any(c.config.partition.startswith("domain") for c in cells)
    full = [c for c in cells if c.config.shots is None]
    assert full and all(c.config.max_train_per_client is not None for c in full)  # the documented cap


def test_cells_of_one_scenario_and_seed_share_a_federation():
    cells = load_suite("smoke").cells()
    keys = {(c.scenario, c.seed): set() for c in cells}
    for c in cells:
        keys[(c.scenario, c.seed)].add(federation_key(c.config))
    assert all(len(k) == 1 for k in keys.values())
    assert len({next(iter(k)) for k in keys.values()}) == len(keys)


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[scenario]]\nname = "a b"\n', "name must be letters"),
        ('[[scenario]]\nname = "a"\nset = { partition = "zigzag" }\n', "partition='zigzag' is not allowed"),
        ('[[scenario]]\nname = "a"\nset = { nonsense = 1 }\n', "unknown config key 'nonsense'"),
        ("", "at least one \\[\\[scenario\\]\\]"),
        ('[[scenario]]\nname = "a"\n[method_set.promptfl]\nrounds = 2\n', "not in the suite"),
    ],
)
def test_bad_suites_name_the_problem(tmp_path, body, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(str(_write_suite(tmp_path / "s.toml", body)))


def test_unknown_method_is_an_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('base = "tiny"\nmethods = ["fedprox"]\n[[scenario]]\nname = "a"\n')
    with pytest.raises(SuiteError, match="unknown methods \\['fedprox'\\]"):
        load_suite(str(path))


def test_paper_clip_fails_fast_naming_what_is_missing(monkeypatch, tmp_path, capsys):
    for var in ("FEDDTL_CLIP_DIR", "FEDDTL_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub ids count as missing, without asking the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    suite = load_suite("paper-clip")
    with pytest.raises(SuiteError, match="FEDDTL_CLIP_DIR") as err:
        preflight(suite)
    assert "FEDDTL_DATA_ROOT" in str(err.value)
    # with the variables set to empty folders it lists the weights and every dataset folder
    monkeypatch.setenv("FEDDTL_CLIP_DIR", str(tmp_path / "clip"))
    monkeypatch.setenv("FEDDTL_DATA_ROOT", str(tmp_path / "data"))
    assert main(["bench", "--suite", "paper-clip", "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "CLIP weights" in message and "cifar10" in message and "eurosat" in message
    assert not (tmp_path / "out").exists()  # no work started


def _fake_run(root: Path, scenario: str, method: str, seed: int, hm: float, rl: bool) -> None:
    d = root / "runs" / scenario / method / f"seed{seed}"
    d.mkdir(parents=True)
    results = {"base_acc": hm + 1, "novel_acc": hm - 1, "hm": hm, "local_acc": 50.0, "wall_s": 10.0,
               "local_acc_per_client": [40.0, 60.0], "per_domain_acc": {"x": {"base": hm, "novel": hm, "hm": hm}}}
    (d / "results.json").write_text(json.dumps(results))
    row = {"round": 2, "hm": hm, "base_acc": hm + 1}
    if rl:
        row.update(client_reward=0.5, client_silent_groups=0.25, client_kl=0.01, client_clip_fraction=0.1)
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "hm": hm - 5}) + "\n" + json.dumps(row) + "\n")


def test_report_aggregates_mean_and_sample_std_over_seeds(tmp_path):
    (tmp_path / "suite.toml").write_text(
        'name = "t"\nbase = "tiny"\nmethods = ["fedlora", "feddtl"]\n[[scenario]]\nname = "s1"\ntitle = "S one"\n'
    )
    for seed, hm in enumerate((10.0, 20.0, 30.0)):
        _fake_run(tmp_path, "s1", "feddtl", seed, hm, rl=True)
    _fake_run(tmp_path, "s1", "fedlora", 0, 5.0, rl=False)
    written = write_report(tmp_path)
    assert all(p.is_file() for p in written)
    assert {p.name for p in written} >= {"table.md", "table.csv", "domains.csv", "hm.png", "curves.png", "clients.png"}
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert float(rows["feddtl"]["hm_mean"]) == pytest.approx(20.0)
    assert float(rows["feddtl"]["hm_std"]) == pytest.approx(10.0)  # sample std of 10, 20, 30
    assert rows["feddtl"]["seeds"] == "3" and rows["fedlora"]["seeds"] == "1"
    assert float(rows["feddtl"]["client_silent_groups"]) == pytest.approx(0.25)
    assert rows["fedlora"]["client_kl"] == ""  # no RL stage: blank, not zero
    table = (tmp_path / "table.md").read_text()
    assert "**20.00 ± 10.00**" in table and "S one" in table


def test_a_finished_cell_survives_new_config_sections_but_not_changed_values(tmp_path):
    # prepare: a finished cell whose stored config.toml predates the [fedpgp] section
    cell = load_suite("smoke").cells()[0]
    run_dir = cell.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    text = cell_config_text(cell)
    start = text.index("[fedpgp]")
    end = text.find("\n[", start + 1)
    older = text[:start] + (text[end + 1 :] if end >= 0 else "")
    assert "[fedpgp]" not in older
    config = run_dir / "config.toml"
    # execute / assert: missing keys take today's defaults
    config.write_text(older)
    assert is_finished(cell, tmp_path)
    # a changed value, or a key that no longer exists, means the cell runs again
    config.write_text(text.replace(f"rounds = {cell.config.rounds}", f"rounds = {cell.config.rounds + 1}"))
    assert not is_finished(cell, tmp_path)
    config.write_text(text + "\n[retired]\nknob = 1\n")
    assert not is_finished(cell, tmp_path)
    (run_dir / "results.json").unlink()
    config.write_text(text)
    assert not is_finished(cell, tmp_path)


@pytest.mark.slow
def test_smoke_suite_runs_resumes_and_regenerates(tmp_path):
    out = tmp_path / "smoke"
    assert main(["bench", "--suite", "smoke", "--out", str(out), "--jobs", "2"]) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["scenario"], r["method"]) for r in rows} == {(s, m) for s in ("digits-path", "domains") for m in METHODS}
    assert all(r["seeds"] == "1" and r["hm_mean"] != "" for r in rows)
    by_method = {r["method"]: r for r in rows if r["scenario"] == "digits-path"}
    assert by_method["feddtl"]["client_reward"] != "" and by_method["fedlora"]["client_reward"] == ""
    assert (out / "domains.csv").is_file() and (out / "domains.png").is_file()
    # a second call finds every cell finished and runs nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("results.json")}
    assert main(["bench", "--suite", "smoke", "--out", str(out), "--jobs", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("results.json")} == before
    # an unfinished cell runs again; its job's log keeps the first sitting's output
    rerun = out / "runs" / "domains" / "fedlora" / "seed0"
    (rerun / "results.json").unlink()
    assert main(["bench", "--suite", "smoke", "--out", str(out), "--jobs", "2"]) == 0
    assert (rerun / "results.json").is_file()
    assert (out / "jobs" / "domains-seed0.log").read_text().count("=== ") == 2
    table = (out / "table.md").read_text()  # the rerun cell's wall time changed
    # the report is rebuilt from the run folder alone
    for name in ("table.md", "table.csv", "hm.png"):
        (out / name).unlink()
    assert main(["bench-report", str(out)]) == 0
    assert (out / "table.md").read_text() == table and (out / "hm.png").is_file()
