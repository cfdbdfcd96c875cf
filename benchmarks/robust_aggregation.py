"""HM under attack for each server.aggregation rule, and what the embedding check rejects (BENCHMARKS.md,
"Privacy and robustness").

    OMP_NUM_THREADS=1 python benchmarks/robust_aggregation.py --out runs/robust [--seeds 0 1]

FedDTL on the `tiny` preset's data and sizes (scikit-learn digits, 32 px, `lite` backbone, 8 shots) with
12 clients (IID), 6 rounds (3 SFT, 3 RL), all clients every round, robustness.max_update_norm = 1.0 (about
5x the honest update norms). Clients 0 and 1 attack in every round; the robust rules assume f = 2, which
12 clients a round satisfy for every rule (Bulyan needs 4f + 3 = 11). Grid, per seed:

- each aggregation rule x {no attack, sign_flip, scaled, collude} (faults.attack_scale = 10, shrunk to
  0.99 of the norm bound);
- fedavg x {no attack, label_flip} x embedding check {off, server.embedding_min_relative_agreement}.

One federation per seed (data, partition, backbone, trunk cache) is built once and every cell starts from
the same initial LoRA, as `feddtl bench` does. Each cell writes a normal run directory under --out; the
table (markdown) goes to <out>/table.md and the numbers to <out>/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from feddtl.config import load_config
from feddtl.federation import build_federation
from feddtl.server.experiment import run_experiment
from feddtl.server.rundir import RunDir

BASE = [
    "num_clients=12",
    "partition=iid",
    "rounds=6",
    "client.switch_round=3",
    "eval.every=6",
    "robustness.max_update_norm=1.0",
]
ATTACKERS = [0, 1]
RULES = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"]
WEIGHT_ATTACKS = ["none", "sign_flip", "scaled", "collude"]
MIN_AGREEMENT = 0.5
"""server.embedding_min_relative_agreement of the embedding-check cells."""


def cells(seed: int) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run of one seed."""
    attack = lambda mode: [] if mode == "none" else [f"faults.mode={mode}", f"faults.clients={ATTACKERS}"]  # noqa: E731
    out = []
    for rule in RULES:
        for mode in WEIGHT_ATTACKS:
            out.append((f"{rule}-{mode}", [f"server.aggregation={rule}", f"server.assumed_attackers={len(ATTACKERS)}", *attack(mode)]))
    for mode in ("none", "label_flip"):
        for check in (False, True):
            if mode == "none" and not check:
                continue  # the same run as fedavg-none
            name = f"fedavg-{mode}-check" if check else f"fedavg-{mode}"
            out.append((name, [*attack(mode), *([f"server.embedding_min_relative_agreement={MIN_AGREEMENT}"] if check else [])]))
    return out


def cell_stats(run: Path) -> dict[str, Any]:
    """Final accuracy and, over the rounds, what the defences kept and dropped."""
    results = json.loads((run / "results.json").read_text())
    rows = RunDir(run).read_metrics()
    selected = [r["aggregation_selected"] for r in rows if "aggregation_selected" in r]
    honest_rejected = attacker_rejected = honest_uploads = 0
    agreements: dict[str, list[float]] = {"honest": [], "attacker": []}
    for r in rows:
        rejected = {e["client"] for e in r.get("embeddings_rejected", [])}
        for k, a in zip(r["accepted"], r.get("embedding_agreement", [])):
            agreements["attacker" if k in ATTACKERS else "honest"].append(a)
        honest = [k for k in r["accepted"] if k not in ATTACKERS]
        honest_uploads += len(honest) if "embedding_agreement" in r else 0
        honest_rejected += len(rejected - set(ATTACKERS))
        attacker_rejected += len(rejected & set(ATTACKERS))
    return {
        "base": results["base_acc"], "novel": results["novel_acc"], "hm": results["hm"], "local": results["local_acc"],
        "rounds_with_an_attacker_selected": sum(bool(set(s) & set(ATTACKERS)) for s in selected) if selected else None,
        "rounds_skipped": sum("aggregation_skipped" in r for r in rows),
        "update_norm_max": max(r["update_norm_max"] for r in rows),
        "honest_uploads_checked": honest_uploads,
        "honest_uploads_rejected": honest_rejected,
        "attacker_uploads_rejected": attacker_rejected,
        "agreement": {k: [min(v), float(np.median(v))] if v else None for k, v in agreements.items()},
        "rounds": len(rows),
    }


def run_seed(seed: int, out: Path, log, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    started, cpu = time.perf_counter(), time.process_time()
    fed = build_federation(load_config("tiny", [*BASE, f"seed={seed}"]), log_fn=lambda s: None)
    snapshot = (fed.backbone.image_lora_state(), fed.backbone.text_lora_state(), torch.get_rng_state())
    log(f"seed {seed}: federation built in {time.perf_counter() - started:.0f} s ({time.process_time() - cpu:.0f} s CPU)")
    stats = {}
    for name, overrides in cells(seed):
        if only is not None and name not in only:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        config = load_config("tiny", [*BASE, f"seed={seed}", *overrides])
        fed.backbone.load_image_lora(snapshot[0])
        fed.backbone.load_text_lora(snapshot[1])
        torch.set_rng_state(snapshot[2])
        run = out / f"s{seed}" / name
        run_experiment(config, run, progress=False, log_fn=lambda s: None, fed=dataclasses.replace(fed, config=config))
        stats[name] = {**cell_stats(run), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        s = stats[name]
        log(f"seed {seed} {name}: Base {s['base']:.2f} Novel {s['novel']:.2f} HM {s['hm']:.2f} "
            f"[{s['wall_s']:.0f} s, {s['cpu_s']:.0f} s CPU]")
    return stats


def _mean(stats: dict[int, dict[str, dict[str, Any]]], cell: str, key: str) -> float:
    return float(np.mean([s[cell][key] for s in stats.values()]))


def table(stats: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Markdown: HM (Base / Novel) per rule and attack, mean over seeds; the embedding check's counts."""
    seeds = sorted(stats)
    first = stats[seeds[0]]
    lines = [
        "| aggregation | no attack | sign_flip | scaled | collude | rounds an attacker was picked (sign_flip / scaled / collude) |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        cols = [f"{_mean(stats, f'{rule}-{m}', 'hm'):.2f} ({_mean(stats, f'{rule}-{m}', 'base'):.1f} / "
                f"{_mean(stats, f'{rule}-{m}', 'novel'):.1f})" for m in WEIGHT_ATTACKS]
        picked = [first[f"{rule}-{m}"]["rounds_with_an_attacker_selected"] for m in WEIGHT_ATTACKS[1:]]
        rounds = first[f"{rule}-none"]["rounds"]
        lines.append(f"| {rule} | " + " | ".join(cols) + " | "
                     + (" / ".join(f"{sum(stats[s][f'{rule}-{m}']['rounds_with_an_attacker_selected'] for s in seeds)} of {rounds * len(seeds)}" for m in WEIGHT_ATTACKS[1:]) if picked[0] is not None else "n/a") + " |")
    lines += [
        "",
        f"| embedding check (fedavg) | HM (Base / Novel) | honest uploads rejected | attacker uploads rejected | agreement, honest: min / median | attacker: min / median |",
        "|---|---|---|---|---|---|",
    ]
    for cell, title in (("fedavg-none", "off, no attack"), ("fedavg-none-check", f"on ({MIN_AGREEMENT}), no attack"),
                        ("fedavg-label_flip", "off, label_flip"), ("fedavg-label_flip-check", f"on ({MIN_AGREEMENT}), label_flip")):
        checked = sum(stats[s][cell]["honest_uploads_checked"] for s in seeds)
        rej = sum(stats[s][cell]["honest_uploads_rejected"] for s in seeds)
        att = sum(stats[s][cell]["attacker_uploads_rejected"] for s in seeds)
        ag = first[cell]["agreement"]
        fmt = lambda v: f"{v[0]:.2f} / {v[1]:.2f}" if v else "n/a"  # noqa: E731
        lines.append(
            f"| {title} | {_mean(stats, cell, 'hm'):.2f} ({_mean(stats, cell, 'base'):.1f} / {_mean(stats, cell, 'novel'):.1f}) | "
            + (f"{rej} of {checked}" if checked else "n/a") + " | "
            + (f"{att} of {len(ATTACKERS) * first[cell]['rounds'] * len(seeds)}" if checked and "label_flip" in cell else ("0" if checked else "n/a"))
            + f" | {fmt(ag['honest'])} | {fmt(ag['attacker'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/robust"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", help="run only these cells (names as in the log); no table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.txt"

    def log(line: str) -> None:
        print(line, flush=True)
        with log_path.open("a") as f:
            f.write(line + "\n")

    started, cpu = time.perf_counter(), time.process_time()
    log(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}")
    stats = {seed: run_seed(seed, args.out, log, args.only) for seed in args.seeds}
    if args.only:
        print(json.dumps(stats, indent=1))
        return
    (args.out / "summary.json").write_text(json.dumps(stats, indent=1))
    (args.out / "table.md").write_text(table(stats))
    log(f"done in {time.perf_counter() - started:.0f} s ({time.process_time() - cpu:.0f} s CPU), "
        f"load average {os.getloadavg()[0]:.1f}")
    print(table(stats))


if __name__ == "__main__":
    main()
