"""`feddtl report DIR ...`: a table of the finished runs; unfinished ones are skipped with a warning."""

from __future__ import annotations

import json
from pathlib import Path

from feddtl.cli import main
from feddtl.reporting.table import load_results


def _finished(path: Path, method: str, hm: float) -> Path:
    path.mkdir()
    results = {"method": method, "dataset": "digits", "partition": "pathological", "shots": 8, "rounds": 4,
               "base_acc": 50.0, "novel_acc": 40.0, "hm": hm, "local_acc": 60.0}
    (path / "results.json").write_text(json.dumps(results))
    return path


def _unfinished(path: Path) -> Path:
    path.mkdir()  # a run stopped mid-way: config and metrics, no results.json
    (path / "config.toml").write_text('method = "feddtl"\n')
    (path / "metrics.jsonl").write_text('{"round": 1}\n')
    return path


def test_report_skips_unfinished_runs_with_a_warning_and_tabulates_the_rest(tmp_path, capsys):
    # prepare
    a = _finished(tmp_path / "a", "feddtl", 44.44)
    stopped = _unfinished(tmp_path / "stopped")
    b = _finished(tmp_path / "b", "fedlora", 33.33)
    # execute
    code = main(["report", str(a), str(stopped), str(b)])
    # assert
    out, err = capsys.readouterr()
    assert code == 0
    assert err.splitlines() == [f"feddtl report: skipping {stopped}: no results.json (an unfinished run?)"]
    rows = [line for line in out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "44.44" in rows[0] and "33.33" in rows[1]
    assert "stopped" not in out


def test_report_without_any_finished_run_exits_2(tmp_path, capsys):
    # prepare
    stopped = _unfinished(tmp_path / "stopped")
    missing = tmp_path / "typo"
    # execute
    code = main(["report", str(stopped), str(missing)])
    # assert: one warning per folder, then what went wrong; no table
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"feddtl report: skipping {stopped}: no results.json (an unfinished run?)",
        f"feddtl report: skipping {missing}: no such folder",
        "feddtl report: nothing to report: none of the 2 folder(s) given holds a finished run (a results.json)",
    ]


def test_load_results_says_why_a_broken_results_json_is_skipped(tmp_path):
    # prepare
    good = _finished(tmp_path / "good", "feddtl", 10.0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    # execute
    rows, skipped = load_results([good, broken])
    # assert
    assert [r["run"] for r in rows] == ["good"]
    assert [d for d, _ in skipped] == [broken] and "results.json cannot be read" in skipped[0][1]
