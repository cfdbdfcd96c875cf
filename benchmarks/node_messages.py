"""Where a Deployment Engine message's time goes, per phase, for one version of feddtl's code.

Runs, in one sitting and with one torch thread everywhere (OMP_NUM_THREADS=1):
1. ``python -c "import torch, flwr"`` a few times before and after the runs (the floor of any ClientApp process);
2. the backbone build and one client's trunk pass, timed in process (what a node's first message must do);
3. the config in process (``feddtl run``): the reference round times and numbers;
4. the config on a loopback deployment (feddtl.flower.deploy: SuperLink and one SuperNode per client,
   TLS, node authentication), ``--runs`` times on the same SuperNodes (run 1 starts with empty node
   caches, later runs find them filled). Each SuperNode has its own node cache folder, as on separate
   machines. Every ``flwr-clientapp`` process is timed from outside by benchmarks/probe/sitecustomize.py.

``--src`` picks the code the SuperLink, SuperNodes and in-process run import (default: this checkout's
src/), so the same script times main's code and a branch. Prints Markdown tables; writes every number to
``<out>/summary.json``.

Usage: python benchmarks/node_messages.py --label after [--src DIR] [--config tiny] [--set key=value ...]
       [--runs 2] [--out DIR]
       python benchmarks/node_messages.py --compare OUT [OUT ...]   # condensed table of earlier measurements
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from feddtl.config import load_config
from feddtl.flower.certs import write_dev_pki
from feddtl.flower.deploy import COMPLETED, LocalDeployment

HERE = Path(__file__).resolve().parent
PROBE = HERE / "probe"
sys.path.insert(0, str(HERE))
from flower_engines import difference, summary  # noqa: E402

PHASES = [
    ("python start", "start", "python"),
    ("flwr start, pull", "python", "import"),
    ("imports", "import", "call"),
    ("state load", "call", "step"),
    ("client step", "step", "step_end"),
    ("reply, exit", "step_end", "exit"),
]
"""The phases of one message in the tables; FLOWER_PHASES split "flwr start, pull" (where the probe saw them)."""
FLOWER_PHASES = [
    ("flwr imports", "python", "run"),
    ("pull task", "run", "pulled"),
    ("install app", "pulled", "fab"),
    ("load app", "fab", "import"),
]
WARM_PHASES = [
    ("hand-off", "call", "w_call"),
    ("worker state", "w_call", "step"),
    ("in the worker", "w_call", "w_call_end"),
    ("hand-back", "w_call_end", "call_end"),
]
"""A message handed to the node's warm worker (the worker's marks are prefixed w_; its step and step_end are the
message's): "state load" (call to step) is then hand-off plus worker state."""


class LoadSampler(threading.Thread):
    """The 1-minute load average every few seconds."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stopped = every, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self.stopped.wait(self.every)

    def span(self) -> str:
        return f"{min(self.samples):.1f}-{max(self.samples):.1f}" if self.samples else "?"


def child_env(src: Path, probe_log: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(src)] if probe_log is None else [str(PROBE), str(src)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if probe_log is not None:
        env["FEDDTL_PROBE_LOG"] = str(probe_log)
    else:
        env.pop("FEDDTL_PROBE_LOG", None)
    return env


def import_floor(src: Path, times: int) -> list[float]:
    out = []
    for _ in range(times):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, flwr"], env=child_env(src), check=True)
        out.append(time.perf_counter() - start)
    return out


BUILD_TIMES = """
import json, sys, time
import torch
from feddtl.config import load_config
from feddtl.federation import make_backbone, build_client
from feddtl.cache import TrunkCache
from feddtl.data import load_dataset
config = load_config(sys.argv[1], sys.argv[2:])
splits = load_dataset(config.dataset, config.data, seed=config.seed)
t = time.perf_counter(); backbone = make_backbone(config); build = time.perf_counter() - t
cache = TrunkCache(config.cache, backbone, config.data.image_size, config.data.invert, log_fn=lambda s: None)
t = time.perf_counter(); build_client(config, 0, backbone, splits, cache); trunk = time.perf_counter() - t
print(json.dumps({"backbone_build_s": build, "trunk_pass_s": trunk}))
"""


def build_times(src: Path, config: str, overrides: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", BUILD_TIMES, config, *overrides], env=child_env(src),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def inprocess(src: Path, config: str, overrides: list[str], out: Path) -> float:
    args = [sys.executable, "-m", "feddtl", "run", "--config", config, "--quiet", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(args, env=child_env(src), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def deployment(src: Path, config: str, overrides: list[str], out: Path, runs: int, probe_log: Path) -> list[dict]:
    num_clients = load_config(config, overrides).num_clients
    certs = out / "certs"
    write_dev_pki(certs, nodes=num_clients)
    rows = []
    with LocalDeployment(out / "deployment", certs, env=child_env(src, probe_log)) as dep:
        dep.start_superlink()
        for k in range(num_clients):
            dep.register(certs / f"node{k}.pub")
            dep.start_supernode(k, num_clients, certs / f"node{k}", node_config=f'cache-dir="{out / f"node{k}-cache"}"')
        quoted = " ".join(overrides)
        for r in range(1, runs + 1):
            run_dir = out / f"run{r}"
            started_wall, started = time.time(), time.perf_counter()
            run_id = dep.submit(src.parent, f"config='{config}' overrides='{quoted}' out='{run_dir}'")
            row = dep.wait_run(run_id, timeout=7200)
            if row["status"] != COMPLETED:
                raise RuntimeError(f"deployment run {row['status']}:\n{dep.run_log(run_id)}")
            rows.append({"run": r, "dir": str(run_dir), "wall_start": started_wall, "wall_end": time.time(),
                         "end_to_end_s": time.perf_counter() - started})
    return rows


def messages(probe_log: Path, runs: list[dict]) -> list[dict]:
    """The probe's lines of ClientApp processes, each with its run number and phase durations; a warm worker's
    line for a message is joined to the line of the process that handed it over (same message id)."""
    out = []
    lines = [json.loads(line) for line in probe_log.read_text().splitlines()]
    served = {w["message"]: w for w in lines if w.get("worker")}
    for m in lines:
        if m.get("worker"):
            continue
        marks = m["marks"]
        w = served.get(m.get("message"))
        if w is not None:
            m["worker_pid"], m["worker_peak_rss_mib"] = w["pid"], w.get("peak_rss_mib")
            m["worker_held_rss_mib"] = w.get("held_rss_mib")
            marks |= {f"w_{k}": v for k, v in w["marks"].items() if k in ("call", "call_end")}
            marks |= {k: v for k, v in w["marks"].items() if k in ("step", "step_end")}
        m["run"] = next((r["run"] for r in runs if r["wall_start"] <= m["wall"] <= r["wall_end"] + 5), None)
        phases = PHASES + FLOWER_PHASES + WARM_PHASES
        m["phases"] = {name: marks[b] - marks[a] for name, a, b in phases if a in marks and b in marks}
        if "step" in marks and "start" in marks:
            m["overhead_s"] = marks["step"] - marks["start"]
        if "start" in marks and "exit" in marks:
            m["total_s"] = marks["exit"] - marks["start"]
        out.append(m)
    return sorted(out, key=lambda m: (m["run"] or 0, m["marks"].get("start", 0)))


def message_class(m: dict, first_train: set) -> str:
    if m.get("type") == "query":
        return "hello"
    key = (m["run"], m.get("partition"))
    if m["run"] == 1 and key not in first_train:
        first_train.add(key)
        return "first train (run 1)"
    return "later train"


def grouped_messages(folder: str) -> tuple[str, dict[str, list[dict]]]:
    """A measurement folder's label and its messages grouped by message class."""
    result = json.loads((Path(folder) / "summary.json").read_text())
    groups: dict[str, list[dict]] = {}
    first: set = set()
    for m in result["messages"]:
        groups.setdefault(message_class(m, first), []).append(m)
    return result["label"], groups


def compare(folders: list[str]) -> None:
    """Condensed per-phase table of earlier measurements: the median of each message class's phases."""
    print("| code | message | n | " + " | ".join(name for name, _, _ in PHASES) + " | overhead | total | peak RSS (MiB) |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|")
    for folder in folders:
        label, groups = grouped_messages(folder)
        for cls in ("hello", "first train (run 1)", "later train"):
            ms = groups.get(cls, [])
            if not ms:
                continue

            def med(values: list[float]) -> str:
                return f"{statistics.median(values):.2f}" if values else ""

            cells = " | ".join(med([m["phases"][n] for m in ms if n in m["phases"]]) for n, _, _ in PHASES)
            over = med([m["overhead_s"] for m in ms if "overhead_s" in m])
            total = med([m["total_s"] for m in ms if "total_s" in m])
            rss = med([m["peak_rss_mib"] for m in ms if "peak_rss_mib" in m]).split(".")[0]
            print(f"| {label} | {cls} | {len(ms)} | {cells} | {over} | {total} | {rss} |")
    print("\nFlower's part of \"flwr start, pull\" (medians, where the probe recorded it):\n")
    print("| code | message | " + " | ".join(name for name, _, _ in FLOWER_PHASES) + " |")
    print("|---|---|" + "---|" * len(FLOWER_PHASES))
    for folder in folders:
        label, groups = grouped_messages(folder)
        for cls, ms in groups.items():
            values = [[m["phases"][n] for m in ms if n in m["phases"]] for n, _, _ in FLOWER_PHASES]
            if all(values):
                print(f"| {label} | {cls} | " + " | ".join(f"{statistics.median(v):.2f}" for v in values) + " |")
    warm_rows = []
    for folder in folders:
        label, groups = grouped_messages(folder)
        for cls, ms in groups.items():
            values = [[m["phases"][n] for m in ms if n in m["phases"]] for n, _, _ in WARM_PHASES]
            rss = [m["worker_peak_rss_mib"] for m in ms if m.get("worker_peak_rss_mib")]
            held = [m["worker_held_rss_mib"] for m in ms if m.get("worker_held_rss_mib")]
            pids = len({m["worker_pid"] for m in ms if "worker_pid" in m})
            if all(values):
                held_cell = f"{statistics.median(held):.0f}" if held else ""
                warm_rows.append(f"| {label} | {cls} | " + " | ".join(f"{statistics.median(v):.2f}" for v in values)
                                 + f" | {held_cell} | {statistics.median(rss):.0f} | {pids} |")
    if warm_rows:
        print("\nMessages handed to the node's warm worker (medians; worker RSS in MiB: held between messages, at the"
              " message's start; peak so far):\n")
        print("| code | message | " + " | ".join(name for name, _, _ in WARM_PHASES)
              + " | worker RSS held | worker peak RSS | workers |")
        print("|---|---|" + "---|" * (len(WARM_PHASES) + 3))
        print("\n".join(warm_rows))
    print()
    for folder in folders:
        r = json.loads((Path(folder) / "summary.json").read_text())
        load = r["load_avg_1min"]
        rounds = "; ".join(f"run {d['run']}: {', '.join(f'{t:.1f}' for t in d['rounds'])}" for d in r["deployment"])
        print(f"- {r['label']}: `import torch, flwr` median {statistics.median(r['import_torch_flwr_s']):.2f} s; "
              f"in-process rounds {', '.join(f'{t:.1f}' for t in r['inprocess']['rounds'])} s; deployment rounds {rounds} s; "
              f"backbone build {r['build']['backbone_build_s']:.1f} s, trunk pass {r['build']['trunk_pass_s']:.2f} s; "
              f"load average {min(load):.1f}-{max(load):.1f} ({r['started']})")


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        compare(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="name of this measurement (before, after, ...)")
    parser.add_argument("--src", default=str(HERE.parent / "src"), help="the src/ folder of the feddtl code to time")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--imports", type=int, default=5, help="times to time `import torch, flwr`")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    src = Path(args.src).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix=f"node-messages-{args.label}-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    probe_log = out / "probe.jsonl"
    load = LoadSampler()
    load.start()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    # The floor is timed before and after the runs: the load of a shared machine drifts within minutes.
    floor = import_floor(src, args.imports)
    builds = build_times(src, args.config, args.set)
    inproc_s = inprocess(src, args.config, args.set, out / "inprocess")
    runs = deployment(src, args.config, args.set, out, args.runs, probe_log)
    floor += import_floor(src, args.imports)
    load.stopped.set()
    reference = summary(out / "inprocess")
    for r in runs:
        s = summary(Path(r["dir"]))
        r |= {"rounds": s["rounds"], "setup_s": s["results"]["setup_s"], "numbers": difference(s, reference)}
    msgs = messages(probe_log, runs)
    result = {
        "label": args.label, "src": str(src), "config": args.config, "overrides": args.set, "started": started,
        "load_avg_1min": load.samples, "import_torch_flwr_s": floor, "build": builds,
        "inprocess": {"rounds": reference["rounds"], "setup_s": reference["results"]["setup_s"], "end_to_end_s": inproc_s},
        "deployment": runs, "messages": msgs,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1))

    med = statistics.median(floor)
    print(f"## {args.label}: {args.config} {' '.join(args.set)} ({src}); {started}, load average {load.span()}; -> {out}\n")
    print(f"`import torch, flwr`: median {med:.2f} s of {len(floor)} ({', '.join(f'{t:.2f}' for t in floor)}); "
          f"in process: backbone build {builds['backbone_build_s']:.1f} s, one client's trunk pass {builds['trunk_pass_s']:.2f} s\n")
    print("| engine | round times (s) | setup (s) | end to end (s) | numbers vs in-process |")
    print("|---|---|---|---|---|")
    print(f"| in-process | {', '.join(f'{t:.1f}' for t in reference['rounds'])} | {reference['results']['setup_s']:.1f} | {inproc_s:.1f} | (reference) |")
    for r in runs:
        print(f"| deployment run {r['run']} | {', '.join(f'{t:.1f}' for t in r['rounds'])} | {r['setup_s']:.1f} | "
              f"{r['end_to_end_s']:.1f} | {r['numbers']} |")
    warm = any("worker_pid" in m for m in msgs)
    extra = WARM_PHASES if warm else []
    tail = " | worker pid | worker RSS held, peak (MiB)" if warm else ""
    print("\n| run | message | partition | " + " | ".join(name for name, _, _ in PHASES + extra)
          + f" | overhead | peak RSS (MiB){tail} |")
    print("|---|---|---|" + "---|" * len(PHASES + extra) + "---|---|" + ("---|---|" if warm else ""))
    for m in msgs:
        kind = "hello" if m.get("type") == "query" else f"train r{m.get('group')}"
        cells = " | ".join(f"{m['phases'][name]:.2f}" if name in m["phases"] else "" for name, _, _ in PHASES + extra)
        overhead = f"{m['overhead_s']:.2f}" if "overhead_s" in m else ""
        worker = (f" | {m.get('worker_pid', '')} | {m.get('worker_held_rss_mib') or 0:.0f}, "
                  f"{m.get('worker_peak_rss_mib') or 0:.0f}") if warm else ""
        print(f"| {m['run']} | {kind} | {m.get('partition')} | {cells} | {overhead} | {m.get('peak_rss_mib', 0):.0f}{worker} |")


if __name__ == "__main__":
    main()
