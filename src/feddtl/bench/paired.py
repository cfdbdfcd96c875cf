"""Paired verdicts for a bench report: per-seed differences between two methods of one scenario.

The runs of one (scenario, seed) share the partitions, the test subsample and the initial weights, so
the difference of two methods *per seed* cancels the seed-to-seed spread that the unpaired verdicts
(``compare``) count against both cells. Statistics, stated in the report as well:

- d_k = first_k − second_k for each seed k present in both cells (n seeds); mean d̄, sample std s (n − 1);
- 95 % interval: the paired t interval d̄ ± t_{0.975, n−1} · s / √n;
- p: the two-sided paired t test of "mean difference 0" (t = d̄ / (s / √n), n − 1 degrees of freedom).

Verdicts: the headline families, FedDTL against every other method on HM (every method × scenario) and
the paper's claims (every claim × scenario), are each Holm-corrected at α = 0.05 (step-down over the
family's p-values): win / loss (holds / reversed for a claim) only where Holm rejects. Every other
comparison is *uncorrected*: win / loss where its own 95 % interval excludes 0. Anything else is a tie
("not separated by these seeds"). Fewer than 2 paired seeds give no interval: "n/a".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from feddtl.bench.cells import METRICS, CellSummary
from feddtl.bench.compare import PAPER_CLAIMS, REFERENCE, Verdict, signed, verdict

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
"""Level of the intervals, of the uncorrected verdicts and of Holm's family-wise error rate."""

METHOD_TEXT = (
    "paired t over seeds: per seed, the difference of the two runs (same seed: same partitions, test "
    "images and initial weights); mean, 95 % interval mean ± t(0.975, n − 1) · s / √n, and the two-sided "
    "paired t test's p"
)

UNCORRECTED = "uncorrected"
"""The family name of every comparison outside the two Holm families."""

HEADLINE_METRIC = "hm"
"""FedDTL against each method on this metric forms the first Holm family; its other metrics are uncorrected."""


@dataclass(frozen=True)
class PairedStat:
    """The per-seed differences of two cells and their paired t summary (nan where undefined)."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    p: float

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def above(self) -> int:
        """Seeds where the first method is above the second."""
        return sum(d > 0 for d in self.diffs)

    @property
    def below(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0  # False for nan


def paired_stat(first: dict[int, float], second: dict[int, float], confidence: float = CONFIDENCE) -> PairedStat:
    """Paired t summary of ``first[k] - second[k]`` over the seeds k present in both (by seed)."""
    seeds = tuple(sorted(set(first) & set(second)))
    diffs = tuple(float(first[k] - second[k]) for k in seeds)
    n = len(diffs)
    if n == 0:
        return PairedStat(seeds, diffs, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(np.mean(diffs))
    if n == 1:  # no spread to estimate: no interval, no test
        return PairedStat(seeds, diffs, mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(np.std(diffs, ddof=1))
    if sd == 0:  # every seed gives the same difference: scipy would divide by zero
        return PairedStat(seeds, diffs, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedStat(seeds, diffs, mean, sd, mean - half, mean + half, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sorted ascending, p_(i) becomes
    max_{j <= i} min(1, (m − j + 1) p_(j)); rejecting where the adjusted p <= α is Holm's step-down
    procedure at family-wise level α. nan p-values (too few seeds) stay nan and do not count in m."""
    valid = sorted((p, i) for i, p in enumerate(pvalues) if p == p)
    m = len(valid)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class PairedComparison:
    """One paired comparison: ``method`` minus ``baseline`` on ``metric`` in ``scenario``."""

    kind: str
    """"vs-feddtl" (FedDTL against a method), "paper-claim", or "pair" (any other two methods)."""
    family: str
    """The Holm family ("hm-vs-feddtl", "paper-claims") or UNCORRECTED."""
    method: str
    baseline: str
    metric: str
    scenario: str
    stat: PairedStat
    unpaired: Verdict
    paper_delta: float | None = None
    p_holm: float | None = None
    """Holm-adjusted p within the family (nan below 2 paired seeds); None for an uncorrected comparison."""

    @property
    def corrected(self) -> bool:
        return self.family != UNCORRECTED

    @property
    def separated(self) -> bool:
        """Holm rejects (headline families) or the 95 % interval excludes 0 (uncorrected)."""
        if self.corrected:
            return self.p_holm is not None and self.p_holm <= ALPHA  # False for nan
        return self.stat.excludes_zero

    @property
    def outcome(self) -> str:
        """win / tie / loss; holds / tie / reversed for a paper claim; n/a below 2 paired seeds."""
        if self.stat.n < 2:
            return "n/a"
        if not self.separated:
            return "tie"
        if self.paper_delta is not None:
            return "holds" if (self.stat.mean > 0) == (self.paper_delta > 0) else "reversed"
        return "win" if self.stat.mean > 0 else "loss"

    @property
    def unpaired_outcome(self) -> str:
        outcome = self.unpaired.outcome
        if self.paper_delta is None or outcome in ("tie", "n/a"):
            return outcome
        return "holds" if (self.unpaired.delta > 0) == (self.paper_delta > 0) else "reversed"

    @property
    def interval_text(self) -> str:
        s = self.stat
        if s.n < 2:
            return "—" if s.n == 0 else f"{signed(s.mean)} [n = 1]"
        return f"{signed(s.mean)} [{signed(s.ci_low)}, {signed(s.ci_high)}]"

    @property
    def cell_text(self) -> str:
        """Outcome, mean and interval; † marks a Holm family member whose own interval excludes 0 but
        that Holm does not reject."""
        mark = "†" if self.corrected and self.outcome == "tie" and self.stat.excludes_zero else ""
        return f"{self.outcome}{mark} {self.interval_text}"


def _by_seed(cell: CellSummary, key: str) -> dict[int, float]:
    return {r.seed: float(r.results[key]) for r in cell.runs if r.results.get(key) is not None}


def _compare(
    cells: dict[tuple[str, str], CellSummary], kind: str, family: str, a: str, b: str, key: str, sc: str,
    paper: float | None = None,
) -> PairedComparison:
    first, second = cells[(sc, a)], cells[(sc, b)]
    return PairedComparison(
        kind, family, a, b, key, sc, paired_stat(_by_seed(first, key), _by_seed(second, key)),
        verdict(first.values(key), second.values(key)), paper,
    )


def _with_holm(rows: list[PairedComparison]) -> list[PairedComparison]:
    adjusted = holm([r.stat.p for r in rows])
    return [dataclasses.replace(r, p_holm=p) for r, p in zip(rows, adjusted)]


def paired_comparisons(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary]) -> list[PairedComparison]:
    """Every paired comparison of the report, in this order: FedDTL against each method on HM (Holm family),
    the paper's claims whose methods the suite runs (Holm family), FedDTL against each method on the other
    metrics (uncorrected), then every other pair of methods on every metric (uncorrected; the method later
    in the suite's list minus the earlier one). Empty without ``feddtl``."""
    scenarios, methods = [sc["name"] for sc in suite.get("scenario", [])], list(suite.get("methods", []))
    if REFERENCE not in methods:
        return []
    others = [m for m in methods if m != REFERENCE]
    headline = _with_holm([
        _compare(cells, "vs-feddtl", "hm-vs-feddtl", REFERENCE, m, HEADLINE_METRIC, sc) for m in others for sc in scenarios
    ])
    claims = _with_holm([
        _compare(cells, "paper-claim", "paper-claims", c.method, c.baseline, c.metric, sc, c.paper_delta)
        for c in PAPER_CLAIMS if c.method in methods and c.baseline in methods for sc in scenarios
    ])
    rest = [
        _compare(cells, "vs-feddtl", UNCORRECTED, REFERENCE, m, key, sc)
        for m in others for key, _ in METRICS if key != HEADLINE_METRIC for sc in scenarios
    ]
    rest += [
        _compare(cells, "pair", UNCORRECTED, later, earlier, key, sc)
        for earlier, later in combinations(others, 2) for key, _ in METRICS for sc in scenarios
    ]
    return headline + claims + rest


def _counts(outcomes: list[str], labels: tuple[str, ...]) -> str:
    return " / ".join(str(outcomes.count(label)) for label in labels)


def sign_test(above: int, below: int) -> float:
    """Two-sided exact sign test of ``above`` positive against ``below`` negative differences (zeros
    dropped): binomial(above + below, 1/2). nan without any nonzero difference."""
    n = above + below
    return float(stats.binomtest(above, n, 0.5).pvalue) if n else math.nan


def _seed_counts(rows: list[PairedComparison], with_sign: bool = True) -> str:
    """"above / below of n, sign p": (scenario, seed) pairs where the first method is above / below the
    second, pooled over the scenarios, and the sign test's p; ``with_sign=False`` swaps the two counts (a
    claim whose paper difference is negative)."""
    above, below = sum(r.stat.above for r in rows), sum(r.stat.below for r in rows)
    first, second = (above, below) if with_sign else (below, above)
    return f"{first} / {second} of {sum(r.stat.n for r in rows)}, p {_p(sign_test(above, below))}"


def paired_sections(suite: dict[str, Any], rows: list[PairedComparison]) -> list[str]:
    """Markdown: FedDTL against each method per metric, then the paper's claims, paired, with the unpaired
    counts beside them. Empty when there are no comparisons."""
    if not rows:
        return []
    scenarios, methods = [sc["name"] for sc in suite.get("scenario", [])], suite.get("methods", [])
    family_size = {f: sum(r.family == f for r in rows) for f in ("hm-vs-feddtl", "paper-claims")}
    versus = {(r.baseline, r.metric, r.scenario): r for r in rows if r.kind == "vs-feddtl"}
    labels = dict(METRICS)
    lines = [
        f"## Paired: `{REFERENCE}` against each method",
        "",
        f"Statistics: {METHOD_TEXT}. A cell gives the verdict, then `{REFERENCE}` minus the method, in points: "
        "mean [95 % interval]. "
        f"{labels[HEADLINE_METRIC]} is a Holm-corrected family of {family_size['hm-vs-feddtl']} tests "
        f"(every method × scenario; family-wise α = {ALPHA:.2f}): win / loss where Holm rejects; † marks an "
        "interval that excludes 0 where Holm does not reject. The other metrics are **uncorrected**: win / loss "
        "where the interval excludes 0. Beside them: the paired and the unpaired W/T/L counts over the "
        f"scenarios, and the (scenario, seed) pairs where `{REFERENCE}` is above / below the method, pooled over "
        "the scenarios, with the two-sided exact sign test's p (uncorrected; it treats the pairs as independent). "
        "Every comparison, with t-test p-values (Holm-adjusted for the families), is in paired.csv.",
        "",
    ]
    headline_first = sorted(METRICS, key=lambda m: m[0] != HEADLINE_METRIC)
    for key, label in headline_first:
        corrected = key == HEADLINE_METRIC
        lines += [
            f"### {label} ({'Holm-corrected' if corrected else 'uncorrected'})",
            "",
            "| method | " + " | ".join(scenarios) + " | paired W/T/L | unpaired W/T/L | seeds above / below |",
            "|---|" + "---|" * (len(scenarios) + 3),
        ]
        for m in methods:
            if m == REFERENCE:
                continue
            per = [versus[(m, key, sc)] for sc in scenarios]
            lines.append(
                f"| {m} | " + " | ".join(r.cell_text for r in per)
                + f" | {_counts([r.outcome for r in per], ('win', 'tie', 'loss'))}"
                + f" | {_counts([r.unpaired_outcome for r in per], ('win', 'tie', 'loss'))} | {_seed_counts(per)} |"
            )
        lines.append("")
    claims = [c for c in PAPER_CLAIMS if c.method in methods and c.baseline in methods]
    if claims:
        claimed = {(r.method, r.baseline, r.scenario): r for r in rows if r.kind == "paper-claim"}
        lines += [
            "## Paired: the paper's direction",
            "",
            f"Each claim's measured difference per scenario, paired as above: mean [95 % interval]; one "
            f"Holm-corrected family of {family_size['paper-claims']} tests (every claim × scenario): *holds* / "
            "*reversed* where Holm rejects (same / opposite sign as the paper), else *tie*; † as above. "
            "Seeds with / against: (scenario, seed) pairs whose difference has the paper's sign / the opposite, and the "
            "sign test's p (uncorrected).",
            "",
            "| claim | metric | paper | " + " | ".join(scenarios)
            + " | paired holds / tie / reversed | unpaired holds / tie / reversed | seeds with / against |",
            "|---|---|---|" + "---|" * (len(scenarios) + 3),
        ]
        for c in claims:
            per = [claimed[(c.method, c.baseline, sc)] for sc in scenarios]
            seeds = _seed_counts(per, with_sign=c.paper_delta >= 0)
            lines.append(
                f"| {c.text} (`{c.method}` − `{c.baseline}`) | {labels[c.metric]} | {signed(c.paper_delta)} | "
                + " | ".join(r.cell_text for r in per)
                + f" | {_counts([r.outcome for r in per], ('holds', 'tie', 'reversed'))}"
                + f" | {_counts([r.unpaired_outcome for r in per], ('holds', 'tie', 'reversed'))} | {seeds} |"
            )
        lines.append("")
    return lines


def console_lines(rows: list[PairedComparison]) -> list[str]:
    """The headline families for `feddtl bench-report`'s output: one line per comparison."""
    lines = []
    for family, title in (
        ("hm-vs-feddtl", f"`{REFERENCE}` − method on HM"),
        ("paper-claims", "the paper's claims (method − baseline)"),
    ):
        members = [r for r in rows if r.family == family]
        if not members:
            continue
        lines.append(f"paired, {title}: mean [95 % paired-t interval], p, Holm-adjusted p over {len(members)} tests")
        # Widths from the content, so that long scenario and method names keep the columns aligned.
        pairs = [f"{r.method} − {r.baseline}" for r in members]
        w_sc = max(len(r.scenario) for r in members)
        w_pair = max(len(x) for x in pairs)
        w_ci = max(len(r.interval_text) for r in members)
        for r, pair in zip(members, pairs):
            lines.append(
                f"  {r.scenario:<{w_sc}}  {pair:<{w_pair}}  {dict(METRICS)[r.metric]:<5} {r.interval_text:<{w_ci}}  "
                f"p {_p(r.stat.p):<6}  p_holm {_p(r.p_holm):<6}  {r.outcome} (unpaired: {r.unpaired_outcome})"
            )
    return lines


def _p(p: float | None) -> str:
    if p is None or p != p:
        return "—"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"  # a sign test over 21 pairs goes down to 1e-6


PAIRED_FIELDS = [
    "kind", "family", "method", "baseline", "metric", "scenario", "n", "seeds", "diffs", "mean", "sd", "ci_low",
    "ci_high", "p", "p_holm", "outcome", "unpaired_outcome", "above", "below", "paper_delta",
]


def paired_csv_rows(rows: list[PairedComparison]) -> list[dict[str, Any]]:
    """paired.csv: one row per comparison, numbers rounded to 4 decimals (blank where undefined)."""

    def num(x: float | None) -> Any:
        return "" if x is None or x != x else round(x, 4)

    return [
        {"kind": r.kind, "family": r.family, "method": r.method, "baseline": r.baseline, "metric": r.metric,
         "scenario": r.scenario, "n": r.stat.n, "seeds": " ".join(map(str, r.stat.seeds)),
         "diffs": " ".join(f"{d:.4f}" for d in r.stat.diffs), "mean": num(r.stat.mean), "sd": num(r.stat.sd),
         "ci_low": num(r.stat.ci_low), "ci_high": num(r.stat.ci_high), "p": num(r.stat.p), "p_holm": num(r.p_holm),
         "outcome": r.outcome, "unpaired_outcome": r.unpaired_outcome, "above": r.stat.above,
         "below": r.stat.below, "paper_delta": "" if r.paper_delta is None else round(r.paper_delta, 2)}
        for r in rows
    ]
