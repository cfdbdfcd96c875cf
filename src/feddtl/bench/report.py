"""The bench report, rebuilt from a suite's output folder alone (`feddtl bench-report DIR`).

Reads DIR/suite.toml and every DIR/runs/<scenario>/<method>/seed<k>/{results.json, metrics.jsonl};
writes table.md, table.csv (method x scenario: Base / Novel / HM / Local mean and std over seeds, plus
the final-round RL diagnostics), comparison.csv (FedDTL against every other method, and the paper's
claims, as win / tie / loss verdicts: see ``compare``), paired.csv (the same and every other pair of
methods, paired by seed, with 95 % intervals and Holm-corrected headline families: see ``paired``),
domains.csv (feature-shift scenarios: accuracy per domain) and plots.
Standard deviations are sample standard deviations (n - 1) over the seeds that finished.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feddtl.bench.cells import METRICS, RL_DIAGNOSTICS, CellSummary, collect, domain_names, domain_stats
from feddtl.bench.compare import PAPER_CLAIMS, REFERENCE, Verdict, claim_outcome, signed, verdict
from feddtl.bench.paired import PAIRED_FIELDS, console_lines, paired_comparisons, paired_csv_rows, paired_sections
from feddtl.bench.plots import plot_suite


def _fmt(mean: float, std: float | None = None) -> str:
    if mean != mean:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary]) -> str:
    scenarios, methods = suite.get("scenario", []), suite.get("methods", [])
    lines = [f"# Benchmark suite `{suite.get('name', '?')}`", ""]
    if suite.get("description"):
        lines += [suite["description"].strip(), ""]
    lines += [
        "Accuracy in percent, mean ± sample std over the seeds that finished (the `n` column). "
        "RL diagnostics are final-round means over clients, averaged over seeds (blank: no RL stage). "
        "wall s: the run's own time, without the federation build its worker shares across methods.",
        "",
        "## HM per method and scenario",
        "",
        "| method | " + " | ".join(sc["name"] for sc in scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    best = {}
    for sc in scenarios:
        hms = {m: cells[(sc["name"], m)].stat("hm")[0] for m in methods}
        valid = {m: v for m, v in hms.items() if v == v}
        best[sc["name"]] = max(valid, key=valid.get) if valid else None
    for m in methods:
        row = []
        for sc in scenarios:
            mean, std = cells[(sc["name"], m)].stat("hm")
            text = _fmt(mean, std)
            row.append(f"**{text}**" if best[sc["name"]] == m else text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Scenarios: " + "; ".join(f"`{sc['name']}` = {sc.get('title', sc['name'])}" for sc in scenarios), ""]
    lines += tuned_section(suite, cells)
    lines += comparison_sections(suite, comparisons(suite, cells))
    # the paired re-reading after the unpaired verdicts, so the two read side by side
    lines += paired_sections(suite, paired_comparisons(suite, cells))
    for sc in scenarios:
        lines += [
            f"## {sc.get('title', sc['name'])} (`{sc['name']}`)",
            "",
            "| method | n | Base | Novel | HM | Local | " + " | ".join(label for _, label in RL_DIAGNOSTICS) + " | wall s |",
            "|---|---|---|---|---|---|" + "---|" * len(RL_DIAGNOSTICS) + "---|",
        ]
        for m in methods:
            s = cells[(sc["name"], m)]
            stats = [_fmt(*s.stat(k)) for k, _ in METRICS]
            rl = ["" if s.rl(k) != s.rl(k) else f"{s.rl(k):.3f}" for k, _ in RL_DIAGNOSTICS]
            wall = _fmt(s.stat("wall_s")[0]).split(".")[0]
            lines.append(f"| {m} | {len(s.runs)} | " + " | ".join(stats + rl) + f" | {wall} |")
        domains = domain_names(cells, sc["name"], methods)
        if domains:
            lines += ["", "HM per domain (Base / Novel per domain in domains.csv):", "",
                      "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
            for m in methods:
                s = cells[(sc["name"], m)]
                lines.append(f"| {m} | " + " | ".join(_fmt(*domain_stats(s, d, "hm")) for d in domains) + " |")
        lines.append("")
    return "\n".join(lines)


def tuned_section(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary]) -> list[str]:
    """The tuned values the runs record (results.json ``tuned``), per method and partition type; nothing for a
    suite that ran without a tuned file."""
    applied: dict[tuple[str, str, str, str], list[str]] = {}
    for sc in suite.get("scenario", []):
        for m in suite.get("methods", []):
            for run in cells[(sc["name"], m)].runs:
                tuned = run.results.get("tuned")
                if not isinstance(tuned, dict):
                    continue
                values = ", ".join(f"{k} = {v}" for k, v in tuned.get("values", {}).items()) or "(no open knobs)"
                key = (m, str(tuned.get("partition", "")), values, str(tuned.get("sha256", ""))[:12])
                if sc["name"] not in applied.setdefault(key, []):
                    applied[key].append(sc["name"])
    if not applied:
        return []
    lines = [
        "## Tuned values",
        "",
        "What each method ran with, per partition type, as its runs recorded it (results.json `tuned`; chosen by "
        "`feddtl tune` on a validation hold-out of its tuning split; the file is tuned.toml beside this table).",
        "",
        "| method | partition | values | tuned.toml sha256 | scenarios |",
        "|---|---|---|---|---|",
    ]
    for (m, partition, values, sha), scs in applied.items():
        lines.append(f"| {m} | {partition} | {values} | {sha} | {', '.join(scs)} |")
    return lines + [""]


def _counts(outcomes: list[str], labels: tuple[str, ...]) -> str:
    return " / ".join(str(outcomes.count(label)) for label in labels)


@dataclass(frozen=True)
class Comparison:
    """One verdict of a report: FedDTL against a method, or one of the paper's claims, on one metric
    in one scenario."""

    kind: str
    """"vs-feddtl" or "paper-claim"."""
    method: str
    baseline: str
    metric: str
    scenario: str
    verdict: Verdict
    paper_delta: float | None
    """The paper's difference for a claim; None for a vs-feddtl row."""

    @property
    def outcome(self) -> str:
        """win / tie / loss against a method; holds / tie / reversed for a claim; n/a without runs."""
        return self.verdict.outcome if self.paper_delta is None else claim_outcome(self.verdict, self.paper_delta)

    @property
    def cell_text(self) -> str:
        return self.outcome if self.outcome == "n/a" else f"{self.outcome} {signed(self.verdict.delta)}"


def comparisons(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary]) -> list[Comparison]:
    """Every verdict the report shows: FedDTL against each other method (per metric and scenario), then
    each paper claim whose two methods the suite runs (per scenario). Empty without ``feddtl``."""
    scenarios, methods = [sc["name"] for sc in suite.get("scenario", [])], suite.get("methods", [])

    def compare(kind: str, a: str, b: str, key: str, sc: str, paper: float | None) -> Comparison:
        return Comparison(kind, a, b, key, sc, verdict(cells[(sc, a)].values(key), cells[(sc, b)].values(key)), paper)

    if REFERENCE not in methods:
        return []
    rows = [
        compare("vs-feddtl", REFERENCE, m, key, sc, None)
        for m in methods if m != REFERENCE for key, _ in METRICS for sc in scenarios
    ]
    rows += [
        compare("paper-claim", c.method, c.baseline, c.metric, sc, c.paper_delta)
        for c in PAPER_CLAIMS if c.method in methods and c.baseline in methods for sc in scenarios
    ]
    return rows


def comparison_sections(suite: dict[str, Any], rows: list[Comparison]) -> list[str]:
    """Markdown: FedDTL against each other method (HM per scenario, win / tie / loss counts per metric),
    then the paper's claims per scenario. Empty when there are no comparisons."""
    if not rows:
        return []
    scenarios, methods = [sc["name"] for sc in suite.get("scenario", [])], suite.get("methods", [])
    versus = {(r.baseline, r.metric, r.scenario): r for r in rows if r.kind == "vs-feddtl"}
    lines = [
        f"## `{REFERENCE}` against each method",
        "",
        f"HM of `{REFERENCE}` minus the method's, in points, per scenario; a tie is a difference within one "
        "sample std of either cell. The last columns count wins / ties / losses over the scenarios per metric.",
        "",
        "| method | " + " | ".join(scenarios) + " | " + " | ".join(f"{label} W/T/L" for _, label in METRICS) + " |",
        "|---|" + "---|" * (len(scenarios) + len(METRICS)),
    ]
    for m in methods:
        if m == REFERENCE:
            continue
        row = [versus[(m, "hm", sc)].cell_text for sc in scenarios]
        for key, _ in METRICS:
            row.append(_counts([versus[(m, key, sc)].outcome for sc in scenarios], ("win", "tie", "loss")))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    claims = [c for c in PAPER_CLAIMS if c.method in methods and c.baseline in methods]
    if claims:
        lines += [
            "",
            "## The paper's direction",
            "",
            "Each claim is a difference the paper's ablation reports (7 datasets, few-shot non-IID, CLIP ViT-B/16); "
            "here, the measured difference per scenario: *holds* (same sign, beyond a tie), *tie*, or *reversed*.",
            "",
            "| claim | metric | paper | " + " | ".join(scenarios) + " | holds / tie / reversed |",
            "|---|---|---|" + "---|" * (len(scenarios) + 1),
        ]
        labels = dict(METRICS)
        claimed = {(r.method, r.baseline, r.scenario): r for r in rows if r.kind == "paper-claim"}
        for c in claims:
            per_scenario = [claimed[(c.method, c.baseline, sc)] for sc in scenarios]
            lines.append(
                f"| {c.text} (`{c.method}` − `{c.baseline}`) | {labels[c.metric]} | {signed(c.paper_delta)} | "
                + " | ".join(r.cell_text for r in per_scenario)
                + f" | {_counts([r.outcome for r in per_scenario], ('holds', 'tie', 'reversed'))} |"
            )
    lines.append("")
    return lines


COMPARISON_FIELDS = ["kind", "method", "baseline", "metric", "scenario", "delta", "margin", "outcome", "paper_delta"]


def comparison_csv_rows(rows: list[Comparison]) -> list[dict[str, Any]]:
    """comparison.csv: one row per verdict, numbers rounded to 4 decimals (blank where there are no runs)."""
    return [
        _blank_nan({"kind": r.kind, "method": r.method, "baseline": r.baseline, "metric": r.metric,
                    "scenario": r.scenario, "delta": round(r.verdict.delta, 4), "margin": round(r.verdict.margin, 4),
                    "outcome": r.outcome, "paper_delta": "" if r.paper_delta is None else round(r.paper_delta, 2)})
        for r in rows
    ]


CSV_FIELDS = (
    ["scenario", "scenario_title", "method", "seeds"]
    + [f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")]
    + [k for k, _ in RL_DIAGNOSTICS]
    + ["wall_s_mean"]
)


def csv_rows(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary]) -> list[dict[str, Any]]:
    rows = []
    for sc in suite.get("scenario", []):
        for m in suite.get("methods", []):
            s = cells[(sc["name"], m)]
            row: dict[str, Any] = {"scenario": sc["name"], "scenario_title": sc.get("title", sc["name"]), "method": m,
                                   "seeds": len(s.runs)}
            for k, _ in METRICS:
                row[f"{k}_mean"], row[f"{k}_std"] = s.stat(k)
            for k, _ in RL_DIAGNOSTICS:
                row[k] = s.rl(k)
            row["wall_s_mean"] = s.stat("wall_s")[0]
            rows.append(_blank_nan(row))
    return rows


def _blank_nan(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row with NaN (no finished runs) written as an empty field."""
    return {k: ("" if isinstance(v, float) and v != v else v) for k, v in row.items()}


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_report(out: str | Path, echo: Callable[[str], None] | None = None) -> list[Path]:
    """Write table.md, table.csv, comparison.csv and paired.csv (if the suite has feddtl), domains.csv (if
    any domains) and the plots; returns the files written. ``echo`` gets the paired headline verdicts, a
    line each."""
    out = Path(out)
    suite, cells = collect(out)
    written = [out / "table.md", out / "table.csv"]
    (out / "table.md").write_text(markdown_table(suite, cells) + "\n")
    _write_csv(out / "table.csv", CSV_FIELDS, csv_rows(suite, cells))
    comparison = comparison_csv_rows(comparisons(suite, cells))
    if comparison:
        _write_csv(out / "comparison.csv", COMPARISON_FIELDS, comparison)
        written.append(out / "comparison.csv")
    paired = paired_comparisons(suite, cells)
    if paired:
        _write_csv(out / "paired.csv", PAIRED_FIELDS, paired_csv_rows(paired))
        written.append(out / "paired.csv")
        if echo is not None:
            for line in console_lines(paired):
                echo(line)
    domain_rows = []
    for sc in suite.get("scenario", []):
        methods = suite.get("methods", [])
        for d in domain_names(cells, sc["name"], methods):
            for m in methods:
                s = cells[(sc["name"], m)]
                row: dict[str, Any] = {"scenario": sc["name"], "method": m, "domain": d, "seeds": len(s.runs)}
                for key in ("base", "novel", "hm"):
                    row[f"{key}_mean"], row[f"{key}_std"] = domain_stats(s, d, key)
                domain_rows.append({k: ("" if isinstance(v, float) and v != v else v) for k, v in row.items()})
    if domain_rows:
        _write_csv(out / "domains.csv", list(domain_rows[0]), domain_rows)
        written.append(out / "domains.csv")
    written += plot_suite(suite, cells, out)
    return written
