"""`feddtl tune`: run a tuning suite's cells with the bench runner, pick each method's configuration per
partition type by validation HM, and write tuned.toml (what grids apply) and tuned.md (a readable table).

Output folder::

    DIR/tune-suite.toml                         the tuning suite as run
    DIR/runs/<scenario>/<method>/c<i>/seed<k>/  one run directory per (scenario, method, configuration)
    DIR/jobs/                                   as for `feddtl bench`
    DIR/tuned.toml, DIR/tuned.md                written once every cell has finished

Selection: for each method and partition type (the cells' ``partition``), a configuration's score is its
validation HM averaged over the scenarios of that type; the highest wins, a tie goes to the lower index
(with default_first, the paper's values). Like `feddtl bench` it resumes: run the same command again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feddtl.bench.errors import SuiteError
from feddtl.bench.runner import run_cells
from feddtl.bench.plan import preflight
from feddtl.bench.tuned import tuned_text
from feddtl.bench.tuning import TuneSuite
from feddtl.server.rundir import atomic_write_text


@dataclass
class Trial:
    """One configuration of one method on one partition type, scored on the validation hold-out."""

    method: str
    partition: str
    config: int
    values: dict[str, Any]
    scenarios: list[str]
    base: float
    novel: float
    hm: float
    winner: bool = False

    def row(self) -> dict[str, Any]:
        return {
            "method": self.method, "partition": self.partition, "config": self.config, "scenarios": self.scenarios,
            "base": round(self.base, 4), "novel": round(self.novel, 4), "hm": round(self.hm, 4),
            "winner": self.winner, "values": self.values,
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def select(tsuite: TuneSuite, out: Path) -> tuple[dict[str, dict[str, dict[str, Any]]], list[Trial]]:
    """(chosen values per method x partition type, every trial) from the finished cells under ``out``.

    Raises SuiteError if a cell has not finished or was not evaluated on the validation hold-out: a
    choice made on fewer configurations for one method, or on test images, would break the protocol.
    """
    scores: dict[tuple[str, str, int], list[tuple[str, dict[str, Any]]]] = {}
    unfinished = []
    for cell in tsuite.cells():
        path = cell.run_dir(out) / "results.json"
        if not path.is_file():
            unfinished.append(cell.key)
            continue
        results = json.loads(path.read_text())
        if results.get("eval_on") != "validation":
            raise SuiteError(f"{path} was not evaluated on the validation hold-out; a tuning run must never score on test images")
        key = (cell.method, cell.config.partition, cell.record["tuning"]["config"])
        scores.setdefault(key, []).append((cell.scenario, results))
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else "")
        raise SuiteError(f"{len(unfinished)} tuning cells have not finished ({shown}); run `feddtl tune` again to finish them")
    trials = []
    for (method, partition, i), runs in scores.items():
        trials.append(Trial(
            method, partition, i, tsuite.points[method][i], [sc for sc, _ in runs],
            _mean([r["base_acc"] for _, r in runs]), _mean([r["novel_acc"] for _, r in runs]),
            _mean([r["hm"] for _, r in runs]),
        ))
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for method in tsuite.suite.methods:
        for partition in dict.fromkeys(t.partition for t in trials if t.method == method):
            group = sorted((t for t in trials if t.method == method and t.partition == partition), key=lambda t: t.config)
            best = max(group, key=lambda t: (-math.inf if math.isnan(t.hm) else t.hm, -t.config))
            best.winner = True
            chosen.setdefault(method, {})[partition] = dict(best.values)
    order = list(dict.fromkeys(c.config.partition for c in tsuite.cells()))  # the suite's scenario order
    trials.sort(key=lambda t: (order.index(t.partition), tsuite.suite.methods.index(t.method), t.config))
    return chosen, trials


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else f'"{value}"' if isinstance(value, str) else str(value)


def tuned_table(tsuite: TuneSuite, trials: list[Trial]) -> str:
    """tuned.md: per partition type and method, every configuration's validation Base / Novel / HM."""
    c = tsuite.cells()[0].config
    lines = [
        f"# Tuning sweep `{tsuite.name}`",
        "",
        f"Validation hold-out ({c.eval.validation_per_class} training images per class, never trained on), tuning "
        f"split base_novel = \"{c.base_novel}\" with split seed {c.base_novel_seed}, seed {tsuite.seed}, "
        f"{tsuite.configs} configurations per method. Score: validation HM, averaged over the scenarios of a "
        "partition type; **bold** is the chosen configuration (ties go to the lower index; c0 is the default "
        "when the suite says default_first).",
    ]
    for partition in dict.fromkeys(t.partition for t in trials):
        rows = [t for t in trials if t.partition == partition]
        lines += ["", f"## {partition} ({', '.join(rows[0].scenarios)})", "",
                  "| method | config | values | Base | Novel | HM |", "|---|---|---|---|---|---|"]
        for t in rows:
            values = ", ".join(f"{k} = {_fmt(v)}" for k, v in t.values.items())
            hm = f"**{t.hm:.2f}**" if t.winner else f"{t.hm:.2f}"
            lines.append(f"| {t.method} | c{t.config} | {values} | {t.base:.2f} | {t.novel:.2f} | {hm} |")
    return "\n".join(lines) + "\n"


def write_tuning(tsuite: TuneSuite, out: Path) -> tuple[Path, Path]:
    """Select and write ``out/tuned.toml`` and ``out/tuned.md``."""
    chosen, trials = select(tsuite, out)
    c = tsuite.cells()[0].config
    datasets = sorted({cell.config.dataset for cell in tsuite.cells()})
    header = {
        "suite": tsuite.name,
        "seed": tsuite.seed,
        "configs": tsuite.configs,
        "validation_per_class": c.eval.validation_per_class,
        "select_by": "validation HM, mean over the scenarios of a partition type",
        "split": {"base_novel": c.base_novel, "base_novel_seed": c.base_novel_seed, "datasets": datasets},
    }
    toml_path, md_path = out / "tuned.toml", out / "tuned.md"
    atomic_write_text(toml_path, tuned_text(header, chosen, [t.row() for t in trials]))
    atomic_write_text(md_path, tuned_table(tsuite, trials))
    return toml_path, md_path


def run_tuning(tsuite: TuneSuite, out: str | Path, jobs: int = 1, log_fn: Callable[[str], None] = print) -> dict[str, int]:
    """Run the sweep's unfinished cells into ``out`` (resumable), then write tuned.toml and tuned.md once
    every cell has finished. Returns the runner's counts. SuiteError (before any work) if the suite
    needs something this machine lacks."""
    out = Path(out)
    cells = tsuite.cells()
    preflight(tsuite.suite, cells)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tune-suite.toml", tsuite.suite.source)
    methods = len(tsuite.suite.methods)
    title = (
        f"tuning suite {tsuite.name}: {len(cells)} cells ({len(tsuite.suite.scenarios)} scenarios x {methods} methods x "
        f"{tsuite.configs} configurations, seed {tsuite.seed})"
    )
    counts = run_cells(cells, out, jobs, title, log_fn)
    if counts["failed"] == 0:
        write_tuning(tsuite, out)
    return counts
