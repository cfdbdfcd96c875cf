"""Paired verdicts in the bench report: per-seed differences, t intervals, Holm families."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from feddtl.bench.paired import holm, paired_stat, sign_test
from bench_runs import write_run
from feddtl.bench.report import write_report
from feddtl.cli import main


def test_paired_stat_is_the_paired_t_interval_and_test():
    # prepare: differences 1, 2, 3 (seed 3 only in the first cell: not paired)
    first, second = {0: 11.0, 1: 22.0, 2: 33.0, 3: 99.0}, {0: 10.0, 1: 20.0, 2: 30.0}
    # execute
    s = paired_stat(first, second)
    # assert: mean 2, sd 1, t(0.975, 2) = 4.3027 -> 2 ± 2.4841; t = 3.4641 -> p = 0.0742
    assert s.seeds == (0, 1, 2) and s.diffs == (1.0, 2.0, 3.0)
    assert (s.mean, s.sd) == pytest.approx((2.0, 1.0))
    assert (s.ci_low, s.ci_high) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
    assert s.p == pytest.approx(0.0742, abs=1e-4)
    assert (s.above, s.below) == (3, 0) and not s.excludes_zero


def test_paired_stat_edge_cases():
    # identical differences: a zero-width interval (p 0), or exactly no difference (p 1)
    constant = paired_stat({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})
    assert (constant.ci_low, constant.ci_high, constant.p) == (2.0, 2.0, 0.0) and constant.excludes_zero
    assert paired_stat({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0
    # one paired seed: a mean, no interval
    one = paired_stat({0: 3.0}, {0: 1.0, 1: 5.0})
    assert one.mean == 2.0 and math.isnan(one.ci_low) and math.isnan(one.p) and not one.excludes_zero
    assert math.isnan(paired_stat({}, {0: 1.0}).mean)


def test_holm_steps_down_and_keeps_the_input_order():
    # prepare: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    pvalues = [0.01, 0.04, math.nan, 0.03, 0.005]
    # execute
    adjusted = holm(pvalues)
    # assert: nan is not counted in m = 4 and stays nan
    assert adjusted[0] == pytest.approx(0.03) and adjusted[4] == pytest.approx(0.02)
    assert adjusted[3] == pytest.approx(0.06) and adjusted[1] == pytest.approx(0.06)
    assert math.isnan(adjusted[2])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1


def test_sign_test():
    assert sign_test(3, 18) == pytest.approx(2 * (1 + 21 + 210 + 1330) / 2**21)
    assert sign_test(2, 2) == 1.0
    assert math.isnan(sign_test(0, 0))


SEED_LEVELS = [40.0, 50.0, 60.0, 70.0, 80.0]
"""Per-seed level shared by every method: a large spread between seeds, as different partitions give."""
JITTER = [0.1, -0.1, 0.05, -0.05, 0.0]


@pytest.fixture()
def known_suite(tmp_path: Path) -> Path:
    """5 seeds, 2 scenarios. In s1: feddtl is always 2 ± 0.1 points above fedlora (Base and Novel, so HM
    too) and 2 ± 0.1 points below feddtl-decoupled on Novel while equal on Base; fedlora and
    feddtl-decoupled cross each other's level at random (no paired difference). In s2 every method is the
    same level except noise of ±3 that flips sign with the seed."""
    methods = ["fedlora", "feddtl-decoupled", "feddtl"]
    (tmp_path / "suite.toml").write_text(
        f'name = "t"\nbase = "tiny"\nmethods = {json.dumps(methods)}\n'
        '[[scenario]]\nname = "s1"\n[[scenario]]\nname = "s2"\n'
    )
    for seed, (level, jit) in enumerate(zip(SEED_LEVELS, JITTER)):
        write_run(tmp_path, "s1", "fedlora", seed, base=level, novel=level)
        write_run(tmp_path, "s1", "feddtl", seed, base=level + 2 + jit, novel=level + 2 + jit)
        write_run(tmp_path, "s1", "feddtl-decoupled", seed, base=level + 2 + jit, novel=level + 4 - jit)
        swing = 3.0 * (-1) ** seed
        write_run(tmp_path, "s2", "fedlora", seed, base=level, novel=level)
        write_run(tmp_path, "s2", "feddtl", seed, base=level + swing, novel=level + swing)
        write_run(tmp_path, "s2", "feddtl-decoupled", seed, base=level - swing, novel=level - swing)
    return tmp_path


def test_report_gives_paired_verdicts_the_unpaired_table_cannot(known_suite: Path):
    # execute
    written = write_report(known_suite)
    # assert
    assert known_suite / "paired.csv" in written
    rows = list(csv.DictReader((known_suite / "paired.csv").open()))
    key = {(r["kind"], r["method"], r["baseline"], r["metric"], r["scenario"]): r for r in rows}
    hm = key[("vs-feddtl", "feddtl", "fedlora", "hm", "s1")]
    # +2 ± 0.1 over 5 seeds: a Holm-corrected win, while unpaired it is a tie (seed spread ~16 points)
    assert hm["family"] == "hm-vs-feddtl" and hm["outcome"] == "win" and hm["unpaired_outcome"] == "tie"
    assert float(hm["mean"]) == pytest.approx(2.0, abs=0.01)
    assert 1.8 < float(hm["ci_low"]) < 2.0 < float(hm["ci_high"]) < 2.2
    assert float(hm["p"]) <= float(hm["p_holm"]) < 0.05
    assert (hm["n"], hm["above"], hm["below"]) == ("5", "5", "0")
    # the other direction: feddtl 2 below feddtl-decoupled on Novel (uncorrected: a loss), equal on Base
    novel = key[("vs-feddtl", "feddtl", "feddtl-decoupled", "novel_acc", "s1")]
    assert (novel["family"], novel["outcome"], novel["unpaired_outcome"]) == ("uncorrected", "loss", "tie")
    assert novel["p_holm"] == ""
    assert key[("vs-feddtl", "feddtl", "feddtl-decoupled", "base_acc", "s1")]["outcome"] == "tie"
    # ±3 noise that changes sign with the seed: no verdict
    assert key[("vs-feddtl", "feddtl", "fedlora", "hm", "s2")]["outcome"] == "tie"
    # every other pair is there too, uncorrected (later in the suite's list minus earlier)
    pair = key[("pair", "feddtl-decoupled", "fedlora", "novel_acc", "s1")]
    assert (pair["family"], pair["outcome"]) == ("uncorrected", "win")  # +4 ± 0.1
    # the paper's claims form their own Holm family: decoupling raises Base (+2 ± 0.1 in s1)
    claim = key[("paper-claim", "feddtl-decoupled", "fedlora", "base_acc", "s1")]
    assert (claim["family"], claim["outcome"], claim["unpaired_outcome"]) == ("paper-claims", "holds", "tie")
    families = {r["family"] for r in rows}
    assert families == {"hm-vs-feddtl", "paper-claims", "uncorrected"}
    # comparison.csv, the unpaired verdicts, is unchanged beside it
    unpaired = list(csv.DictReader((known_suite / "comparison.csv").open()))
    assert {r["outcome"] for r in unpaired if r["scenario"] == "s1" and r["metric"] == "hm"} == {"tie"}
    table = (known_suite / "table.md").read_text()
    assert "## `feddtl` against each method" in table  # the unpaired section stays
    assert "## Paired: `feddtl` against each method" in table and "### HM (Holm-corrected)" in table
    assert "### Base (uncorrected)" in table and "## Paired: the paper's direction" in table
    assert "| fedlora | win +2.00 [+1." in table
    # pooled over s1 (5 above) and s2 (3 above, 2 below): 8 / 2, sign test p = 2 (1 + 10 + 45) / 1024
    assert "| 8 / 2 of 10, p 0.1094 |" in table


def test_holm_can_keep_a_tie_that_its_own_interval_separates(tmp_path: Path):
    # prepare: 3 seeds, 3 scenarios; feddtl above fedlora by 4.9, 5, 5.1 in s0 (p ~ 0.0001), by 3.5, 5, 7
    # in s1 (p ~ 0.036: the interval excludes 0), by -1, 2, 5 in s2 (p ~ 0.37)
    methods = ["fedlora", "feddtl"]
    scenarios = [f"s{i}" for i in range(3)]
    (tmp_path / "suite.toml").write_text(
        f'name = "t"\nbase = "tiny"\nmethods = {json.dumps(methods)}\n'
        + "".join(f'[[scenario]]\nname = "{sc}"\n' for sc in scenarios)
    )
    gaps = {"s0": [4.9, 5.0, 5.1], "s1": [3.5, 5.0, 7.0], "s2": [-1.0, 2.0, 5.0]}
    for sc in scenarios:
        for seed, (level, gap) in enumerate(zip(SEED_LEVELS, gaps[sc])):
            write_run(tmp_path, sc, "fedlora", seed, base=level, novel=level)
            write_run(tmp_path, sc, "feddtl", seed, base=level + gap, novel=level + gap)
    # execute
    write_report(tmp_path)
    # assert: s1's interval excludes 0, but Holm over 3 tests needs p <= 0.05 / 2 at its rank
    rows = {r["scenario"]: r for r in csv.DictReader((tmp_path / "paired.csv").open())
            if r["family"] == "hm-vs-feddtl"}
    assert rows["s0"]["outcome"] == "win"
    assert float(rows["s1"]["ci_low"]) > 0 and float(rows["s1"]["p_holm"]) > 0.05
    assert rows["s1"]["outcome"] == "tie" and rows["s2"]["outcome"] == "tie"
    assert "tie† +5.17" in (tmp_path / "table.md").read_text()


def test_bench_report_prints_paired_intervals_and_verdicts(known_suite: Path, capsys):
    # execute
    code = main(["bench-report", str(known_suite)])
    # assert
    out = capsys.readouterr().out
    assert code == 0
    assert "Holm-adjusted p over 4 tests" in out  # HM family: 2 methods x 2 scenarios
    lines = [" ".join(x.split()) for x in out.splitlines()]  # columns are padded to their widest entry
    line = next(x for x in lines if "s1" in x and "feddtl − fedlora HM" in x)
    assert "+2.00 [+1." in line and line.rstrip().endswith("win (unpaired: tie)")
    assert str(known_suite / "paired.csv") in out


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("grid", ["paper-lite", "paper-lite-v2"])
def test_committed_grid_tables_regenerate_byte_identically(grid: str, tmp_path: Path):
    # prepare: the committed run folder alone (suite and runs), without its tables
    committed = RESULTS / grid
    shutil.copy(committed / "suite.toml", tmp_path / "suite.toml")
    shutil.copytree(committed / "runs", tmp_path / "runs")
    # execute
    write_report(tmp_path)
    # assert: the tables BENCHMARKS.md quotes are what the committed runs give
    for name in ("table.md", "table.csv", "comparison.csv", "paired.csv", "domains.csv"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_one_seed_gives_no_paired_verdict(tmp_path: Path):
    # prepare: one seed (the smoke suite's case): the unpaired rule counts any difference, paired cannot
    (tmp_path / "suite.toml").write_text('name = "t"\nbase = "tiny"\nmethods = ["fedlora", "feddtl"]\n[[scenario]]\nname = "s1"\n')
    write_run(tmp_path, "s1", "fedlora", 0, base=50.0, novel=50.0)
    write_run(tmp_path, "s1", "feddtl", 0, base=60.0, novel=60.0)
    # execute
    write_report(tmp_path)
    # assert
    row = next(r for r in csv.DictReader((tmp_path / "paired.csv").open()) if r["metric"] == "hm")
    assert (row["n"], row["mean"], row["ci_low"], row["p"], row["p_holm"]) == ("1", "10.0", "", "", "")
    assert (row["outcome"], row["unpaired_outcome"]) == ("n/a", "win")
    assert "| fedlora | n/a +10.00 [n = 1] |" in (tmp_path / "table.md").read_text()
