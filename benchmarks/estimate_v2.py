"""Wall-time estimate of the tuning sweep (tune-lite) and grid v2 (paper-lite-v2) on this 2-core machine.

    python benchmarks/estimate_v2.py        # from the repository root

Inputs, all committed:
- paper-lite v1's runs (benchmarks/results/paper-lite): each cell's own time (results.json ``wall_s``,
  run with --jobs 2 here) and each job's wall time (sitting1-console.log), whose difference is the job's
  overhead (process start, data, backbone, trunk cache);
- one measurement of what 1000 test images per class add (benchmarks/results/grid-v2-estimate: an fs-path
  FedDTL run, 4 rounds, 4 evaluations, at 100 and at 1000 test images per class, OMP_NUM_THREADS=1):
  the trunk-cache cost per image and the evaluation cost per image per evaluation.
Jobs are scheduled longest first onto two workers, as the runner does. docs/benchmark-protocol.md
("Grid v2") explains the model.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent
V1 = ROOT / "results" / "paper-lite"
MEASURED = ROOT / "results" / "grid-v2-estimate"
SIX = ["zeroshot", "fedlora", "promptfl", "feddtl-decoupled", "feddtl-twostage", "feddtl"]  # v1's sitting 1
SEVEN = SIX + ["fedpgp"]  # fedpgp ran in sitting 2
EVALS = 4  # eval.every = 5 over 20 rounds


def lpt(costs: list[float], workers: int = 2) -> float:
    """Makespan of jobs handed out longest first to the first free worker."""
    load = [0.0] * workers
    for c in sorted(costs, reverse=True):
        load[load.index(min(load))] += c
    return max(load)


def v1_times() -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """(mean cell wall_s per (scenario, method), mean job overhead per scenario) of paper-lite v1."""
    walls: dict[tuple[str, str, int], float] = {}
    for path in (V1 / "runs").glob("*/*/seed*/results.json"):
        seed_dir = path.parent
        walls[(seed_dir.parent.parent.name, seed_dir.parent.name, int(seed_dir.name[4:]))] = json.loads(path.read_text())["wall_s"]
    overheads: dict[str, list[float]] = {}
    for line in (V1 / "sitting1-console.log").read_text().splitlines():
        m = re.search(r"ok (\S+)-seed(\d+): 6/6 cells in (\d+) s", line)
        if m:
            sc, seed = m[1], int(m[2])
            overheads.setdefault(sc, []).append(int(m[3]) - sum(walls[(sc, meth, seed)] for meth in SIX))
    cells: dict[tuple[str, str], list[float]] = {}
    for (sc, meth, _), w in walls.items():
        cells.setdefault((sc, meth), []).append(w)
    return ({k: statistics.mean(v) for k, v in cells.items()}, {k: statistics.mean(v) for k, v in overheads.items()})


def main() -> None:
    cell, overhead = v1_times()
    print("v1 job overhead, s:", {k: round(v) for k, v in overhead.items()})
    r100, r1000 = (json.loads((MEASURED / f"fs-path-test{n}.results.json").read_text()) for n in (100, 1000))
    per_image_cache = (r1000["time_cache_build_s"] - r100["time_cache_build_s"]) / 9000
    per_image_eval = (r1000["time_eval_s_total"] - r100["time_eval_s_total"]) / EVALS / 9000
    extra_job = 9000 * per_image_cache + 9000 * per_image_eval * (6 * EVALS + 1)  # zeroshot evaluates once
    print(f"trunk cache {per_image_cache * 1000:.2f} ms/image, evaluation {per_image_eval * 1000:.3f} ms/image/evaluation; "
          f"1000 test images per class add {extra_job:.0f} s per Fashion-MNIST job")

    # tune-lite: 6 tuned methods x C configurations per 16-shot scenario, one seed; one evaluation of the
    # 2000-image validation set instead of four of the test set (1000 images, digits-domains 1559)
    tuned = [m for m in SEVEN if m != "zeroshot"]
    for configs in (4, 6, 8):
        costs = []
        for sc in ("fs-path", "fs-dir", "fs-iid", "domains-fs"):
            n_test = 1000 if sc.startswith("fs") else 1559
            eval_delta = (2000 - n_test * EVALS) * per_image_eval
            costs.append(overhead[sc] + (2000 - n_test) * per_image_cache
                         + configs * sum(cell[(sc, m)] + eval_delta for m in tuned))
        print(f"tune-lite, {configs} configurations: {sum(costs):.0f} s worker time, {lpt(costs):.0f} s wall "
              f"({lpt(costs) / 60:.0f} min) with --jobs 2; per job {[round(c) for c in costs]}")

    # paper-lite-v2: 8 scenarios x 7 methods x 5 seeds; fs-path-split2 costs what fs-path costs
    scenarios = ["fs-path", "fs-dir", "fs-iid", "full-path", "full-dir", "full-iid", "domains-fs", "fs-path-split2"]
    per_job = {}
    for sc in scenarios:
        src = "fs-path" if sc == "fs-path-split2" else sc
        per_job[sc] = overhead[src] + sum(cell[(src, m)] for m in SEVEN) + (0 if src == "domains-fs" else extra_job)
    costs = [per_job[sc] for sc in scenarios for _ in range(5)]
    wall = lpt(costs)
    print(f"paper-lite-v2: {len(costs)} jobs, {sum(costs):.0f} s worker time, {wall:.0f} s wall ({wall / 3600:.2f} h)")
    print("  per job:", {sc: round(c) for sc, c in per_job.items()})
    old = lpt([c - (0 if sc == "domains-fs" else extra_job) for sc, c in per_job.items() for _ in range(5)])
    print(f"  at v1's 100 test images per class it would be {old:.0f} s ({old / 3600:.2f} h)")
    for k in (2, 4, 5):
        print(f"  seeds 0..{k - 1}: {lpt([per_job[sc] for sc in scenarios for _ in range(k)]):.0f} s wall")


if __name__ == "__main__":
    main()
