"""Round time of one config in process vs Flower's Simulation Engine vs Deployment Engine on loopback.

Each engine runs the same config (default: the `tiny` preset) from a fresh process; the Deployment
Engine as separate SuperLink / SuperNode processes on 127.0.0.1 with TLS and node authentication
(feddtl.flower.deploy). Prints a Markdown table: per-round wall time (`time_round_s` in
metrics.jsonl), the run's setup and wall time (results.json), the end-to-end time seen from outside
(process start to results), and whether the metrics equal the in-process run's.

Usage: python benchmarks/flower_engines.py [--config tiny] [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from feddtl.config import load_config
from feddtl.flower.certs import write_dev_pki
from feddtl.flower.deploy import COMPLETED, LocalDeployment
from feddtl.server.rundir import result_fields

REPO = Path(__file__).resolve().parents[1]
PLACEMENT = ("engine", "cache")
"""Not results: the engine's name, and where trunk features are cached (server vs nodes)."""


def cli_run(out: Path, config: str, overrides: list[str], engine: str) -> float:
    args = [sys.executable, "-m", "feddtl", "run", "--config", config, "--quiet", "--engine", engine, "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def deployment_run(out: Path, config: str, overrides: list[str], work: Path) -> float:
    num_clients = load_config(config, overrides).num_clients
    certs = work / "certs"
    write_dev_pki(certs, nodes=num_clients)
    start = time.perf_counter()
    with LocalDeployment(work / "deployment", certs) as dep:
        dep.start_superlink()
        for k in range(num_clients):
            dep.register(certs / f"node{k}.pub")
            dep.start_supernode(k, num_clients, certs / f"node{k}")
        quoted = " ".join(overrides)
        run_id = dep.submit(REPO, f"config='{config}' overrides='{quoted}' out='{out}'")
        row = dep.wait_run(run_id, timeout=3600)
        if row["status"] != COMPLETED:
            raise RuntimeError(f"deployment run {row['status']}:\n{dep.run_log(run_id)}")
        traffic = row.get("network-traffic", {})
        print(f"deployment network traffic (flwr ls): {traffic}", file=sys.stderr)
    return time.perf_counter() - start


def summary(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"results": results, "rows": rows, "rounds": [r["time_round_s"] for r in rows]}


def numbers(run: dict) -> list[float]:
    """Every computed number of a run (results and per-round metrics), timings aside, in a fixed order."""
    out: list[float] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for k, v in sorted(result_fields(value).items()):
                if k not in PLACEMENT:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))

    walk(run["results"])
    walk(run["rows"])
    return out


def difference(a: dict, b: dict) -> str:
    """'identical', or the largest relative difference between the two runs' numbers."""
    x, y = numbers(a), numbers(b)
    if len(x) != len(y):
        return "different fields"
    worst = max((abs(p - q) / max(abs(p), abs(q), 1e-12) for p, q in zip(x, y)), default=0.0)
    return "identical" if worst == 0 else f"max rel. diff {worst:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument(
        "--engines", default="inprocess,flower-sim,flower-deployment",
        help="comma-separated subset (inprocess always runs: it is the reference)",
    )
    args = parser.parse_args()
    engines = {"inprocess", *args.engines.split(",")}
    unknown = engines - {"inprocess", "flower-sim", "flower-deployment"}
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="flower-engines-"))
    end_to_end = {"inprocess": cli_run(out / "inprocess", args.config, args.set, "inprocess")}
    if "flower-sim" in engines:
        end_to_end["flower-sim"] = cli_run(out / "flower-sim", args.config, args.set, "flower-sim")
    if "flower-deployment" in engines:
        end_to_end["flower-deployment"] = deployment_run(out / "flower-deployment", args.config, args.set, out / "work")
    runs = {engine: summary(out / engine) for engine in end_to_end}
    reference = runs["inprocess"]
    print(f"config {args.config} {' '.join(args.set)}; runs in {out}")
    print("| engine | round times (s) | mean round, rounds 2+ (s) | setup (s) | run wall (s) | end to end (s) | numbers vs in-process |")
    print("|---|---|---|---|---|---|---|")
    for engine, run in runs.items():
        later = run["rounds"][1:] or run["rounds"]
        print(
            f"| {engine} | {', '.join(f'{t:.1f}' for t in run['rounds'])} | {sum(later) / len(later):.1f} | "
            f"{run['results']['setup_s']:.1f} | {run['results']['wall_s']:.1f} | {end_to_end[engine]:.1f} | "
            f"{difference(run, reference)} |"
        )


if __name__ == "__main__":
    main()
