"""`feddtl bench`: run a suite's unfinished cells in parallel worker processes, then write the report.

Layout of the output folder::

    DIR/suite.toml                          the suite file as run (plus a [bench] table when --scenarios,
                                            --methods or --set chose part of it or changed it)
    DIR/runs/<scenario>/<method>/seed<k>/   one run directory per cell (config.toml, metrics.jsonl, results.json)
    DIR/jobs/<scenario>-seed<k>.json|.log   what each worker ran (last sitting) and printed (every sitting)
    DIR/table.md, table.csv, comparison.csv, paired.csv, domains.csv, *.png   the report (`feddtl bench-report DIR` rebuilds it)

A cell is finished when its run directory holds results.json and a config.toml equal to the cell's
config (as text, or once loaded: a run from before a config section was added has the section's
defaults); finished cells are skipped, so a stopped suite continues where it stopped, and a cell whose
suite entry changed runs again.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from feddtl.bench.plan import preflight
from feddtl.bench.suite import Cell, Suite, cell_config_text, is_finished
from feddtl.server.rundir import atomic_write_text


@dataclass
class Job:
    """The cells of one (scenario, seed): one worker process."""

    name: str
    cells: list[Cell]

    @property
    def methods(self) -> str:
        """The cells' methods in order, "fedlora x6" for a tuning sweep's configurations of one method."""
        names = [c.method for c in self.cells]
        runs = [(m, sum(1 for _ in group)) for m, group in itertools.groupby(names)]
        return ", ".join(m if n == 1 else f"{m} x{n}" for m, n in runs)

    @property
    def cost(self) -> float:
        """Rough relative cost, to start the longest jobs first: training images x rounds."""
        total = 0.0
        for c in self.cells:
            cfg = c.config
            per_client = (
                cfg.shots * cfg.classes_per_client if cfg.shots is not None else (cfg.max_train_per_client or 5000)
            )
            total += 0 if c.method == "zeroshot" else per_client * cfg.num_clients * cfg.rounds
        return total


def plan_jobs(cells: list[Cell], out: Path) -> tuple[list[Job], int]:
    """Unfinished cells grouped by (scenario, seed), costliest first; also the count of finished cells."""
    groups: dict[tuple[str, int], list[Cell]] = {}
    finished = 0
    for cell in cells:
        if is_finished(cell, out):
            finished += 1
            continue
        groups.setdefault((cell.scenario, cell.seed), []).append(cell)
    jobs = [Job(f"{sc}-seed{seed}", group) for (sc, seed), group in groups.items()]
    jobs.sort(key=lambda j: -j.cost)  # stable: equal costs keep suite order
    return jobs, finished


def _write_job(job: Job, out: Path) -> Path:
    folder = out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job.name}.json"
    payload = {
        "cells": [
            {"run_dir": str(c.run_dir(out)), "config": cell_config_text(c), **({"record": c.record} if c.record else {})}
            for c in job.cells
        ]
    }
    atomic_write_text(path, json.dumps(payload, indent=1))
    return path


def run_suite(
    suite: Suite,
    out: str | Path,
    seeds: int | None = None,
    jobs: int = 1,
    log_fn: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every unfinished cell of ``suite`` into ``out`` with up to ``jobs`` workers, then report.

    Returns counts: cells, finished_before, ran, failed. Raises SuiteError (before any work) when the
    suite needs something this machine lacks.
    """
    out = Path(out)
    cells = suite.cells(seeds)
    preflight(suite, cells)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.toml", suite.source + suite.selection_toml)
    if suite.tuned is not None:  # the values the cells ran with, kept beside them
        atomic_write_text(out / "tuned.toml", suite.tuned.path.read_text())
    n_seeds = len(cells) // max(1, len(suite.scenarios) * len(suite.methods))
    counts = run_cells(
        cells, out, jobs, f"suite {suite.name}: {len(cells)} cells ({len(suite.scenarios)} scenarios x "
        f"{len(suite.methods)} methods x {n_seeds} seeds)", log_fn,
    )
    from feddtl.bench.report import write_report

    write_report(out)
    return counts


def run_cells(
    cells: list[Cell], out: Path, jobs: int, title: str, log_fn: Callable[[str], None] = print
) -> dict[str, int]:
    """Run the unfinished ``cells`` into ``out``, one worker process per (scenario, seed) job, up to
    ``jobs`` at once, longest first. Returns counts: cells, finished_before, ran, failed, failed_jobs."""
    todo, finished = plan_jobs(cells, out)
    n_todo = sum(len(j.cells) for j in todo)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    log_fn(f"{title}; {finished} finished, {n_todo} to run in {len(todo)} jobs, {jobs} at a time, {threads} thread(s) each")
    env = {**os.environ, "FEDDTL_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    running: list[tuple[Job, subprocess.Popen, float, object]] = []
    queue = list(todo)
    failed_jobs = 0
    started = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                job = queue.pop(0)
                path = _write_job(job, out)
                # Appended, not overwritten: a resumed suite keeps the earlier sittings' per-cell times.
                log = open(path.with_suffix(".log"), "a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.name}: {job.methods}\n")
                log.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "feddtl.bench.worker", str(path)],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )
                running.append((job, proc, time.perf_counter(), log))
                log_fn(f"  start {job.name} ({len(job.cells)} cells: {job.methods})")
            time.sleep(0.2)
            for item in list(running):
                job, proc, t0, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()  # type: ignore[attr-defined]
                done = sum(is_finished(c, out) for c in job.cells)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see jobs/{job.name}.log)"
                failed_jobs += proc.returncode != 0
                log_fn(
                    f"  {status:>4} {job.name}: {done}/{len(job.cells)} cells in {time.perf_counter() - t0:.0f} s "
                    f"[{time.perf_counter() - started:.0f} s elapsed, {len(queue)} jobs queued]"
                )
    finally:
        for job, proc, _, log in running:  # interrupted: stop our own workers
            proc.terminate()
            proc.wait()
            log.close()  # type: ignore[attr-defined]
    now_finished = sum(is_finished(c, out) for c in cells)
    return {"cells": len(cells), "finished_before": finished, "ran": now_finished - finished,
            "failed": len(cells) - now_finished, "failed_jobs": failed_jobs}
