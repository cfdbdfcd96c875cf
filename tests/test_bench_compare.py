"""Win / tie / loss verdicts in the bench report: FedDTL against each method, and the paper's claims."""

from __future__ import annotations

import csv
import json

import pytest

from feddtl.bench.compare import PAPER_CLAIMS, claim_outcome, verdict
from bench_runs import write_run
from feddtl.bench.report import write_report


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        ([50.0, 52.0, 54.0], [40.0, 41.0, 42.0], "win"),  # +11.5, stds 2 and 1
        ([50.0, 52.0, 54.0], [51.0, 51.0, 51.0], "tie"),  # +1.0 within std 2
        ([40.0, 41.0, 42.0], [50.0, 52.0, 54.0], "loss"),
        ([50.0], [50.5], "loss"),  # one seed: no spread, any difference counts
        ([], [50.0], "n/a"),
    ],
)
def test_verdict_ties_within_one_std_of_either_cell(first, second, outcome):
    # execute
    v = verdict(first, second)
    # assert
    assert v.outcome == outcome


def test_claim_outcome_follows_the_papers_sign():
    assert claim_outcome(verdict([60.0], [50.0]), paper_delta=8.0) == "holds"
    assert claim_outcome(verdict([40.0], [50.0]), paper_delta=8.0) == "reversed"
    assert claim_outcome(verdict([40.0, 60.0], [50.0, 50.0]), paper_delta=8.0) == "tie"


def test_report_states_wins_and_the_papers_direction(tmp_path):
    # prepare: feddtl beats fedlora on Base and HM and ties on Novel in s1; nothing ran in s2
    methods = ["fedlora", "feddtl-decoupled", "feddtl"]
    (tmp_path / "suite.toml").write_text(
        f'name = "t"\nbase = "tiny"\nmethods = {json.dumps(methods)}\n'
        '[[scenario]]\nname = "s1"\n[[scenario]]\nname = "s2"\n'
    )
    for seed in range(3):
        write_run(tmp_path, "s1", "fedlora", seed, base=60.0 + seed, novel=50.0 + seed)
        write_run(tmp_path, "s1", "feddtl-decoupled", seed, base=70.0 + seed, novel=45.0 + seed)
        write_run(tmp_path, "s1", "feddtl", seed, base=80.0 + seed, novel=50.5 + seed)
    # execute
    written = write_report(tmp_path)
    # assert
    assert tmp_path / "comparison.csv" in written
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    vs = {(r["baseline"], r["metric"], r["scenario"]): r for r in rows if r["kind"] == "vs-feddtl"}
    assert vs[("fedlora", "base_acc", "s1")]["outcome"] == "win"
    assert float(vs[("fedlora", "base_acc", "s1")]["delta"]) == pytest.approx(20.0)
    assert vs[("fedlora", "novel_acc", "s1")]["outcome"] == "tie"  # +0.5 within a std of 1
    assert vs[("fedlora", "hm", "s2")]["outcome"] == "n/a"
    claims = {(r["method"], r["baseline"], r["metric"]): r for r in rows if r["kind"] == "paper-claim" and r["scenario"] == "s1"}
    assert claims[("feddtl-decoupled", "fedlora", "base_acc")]["outcome"] == "holds"
    assert claims[("feddtl", "feddtl-decoupled", "novel_acc")]["outcome"] == "holds"  # +5.5
    # claims whose methods are not in the suite (feddtl-twostage) are left out
    assert all("feddtl-twostage" not in key for key in claims)
    assert len(claims) == sum(1 for c in PAPER_CLAIMS if "feddtl-twostage" not in (c.method, c.baseline))
    table = (tmp_path / "table.md").read_text()
    assert "## `feddtl` against each method" in table and "## The paper's direction" in table
    assert "| fedlora | win +" in table
