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
    "data.test_per_class=50",  # above the digits test split's 36 a class: every test image
]
ATTACKERS = [0, 1]
RULES = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"]
WEIGHT_ATTACKS = ["none", "sign_flip", "scaled", "collude"]
MIN_AGREEMENT = 0.5
"""server.embedding_min_relative_agreement of the embedding-check cells."""


def cells() -> list[tuple[str, list[str], list[int]]]:
    """(name, overrides, attacking clients) of every run of one seed."""

    def attack(mode: str) -> list[str]:
        return [] if mode == "none" else [f"faults.mode={mode}", f"faults.clients={ATTACKERS}"]

    out = []
    for rule in RULES:
        for mode in WEIGHT_ATTACKS:
            overrides = [f"server.aggregation={rule}", f"server.assumed_attackers={len(ATTACKERS)}", *attack(mode)]
            out.append((f"{rule}-{mode}", overrides, [] if mode == "none" else ATTACKERS))
    check = [f"server.embedding_min_relative_agreement={MIN_AGREEMENT}"]
    out.append(("fedavg-none-check", check, []))  # fedavg-none (above) is the check-off run without attack
    out.append(("fedavg-label_flip", attack("label_flip"), ATTACKERS))
    out.append(("fedavg-label_flip-check", [*attack("label_flip"), *check], ATTACKERS))
    return out


def cell_stats(run: Path, attackers: list[int]) -> dict[str, Any]:
    """Final accuracy and, over the rounds, what the defences kept and dropped."""
    results = json.loads((run / "results.json").read_text())
    rows = RunDir(run).read_metrics()
    picked = [r["aggregation_selected"] for r in rows if "aggregation_selected" in r]
    stats: dict[str, Any] = {
        "base": results["base_acc"], "novel": results["novel_acc"], "hm": results["hm"], "local": results["local_acc"],
        "rounds": len(rows),
        "rounds_skipped": sum("aggregation_skipped" in r for r in rows),
        "rounds_an_attacker_picked": sum(bool(set(p) & set(attackers)) for p in picked) if picked else None,
        "update_norm_max": max(r["update_norm_max"] for r in rows),
        "honest_checked": 0, "honest_rejected": 0, "attacker_checked": 0, "attacker_rejected": 0,
        "agreement_honest": [], "agreement_attacker": [],
    }
    for r in rows:
        if "embedding_agreement" not in r:
            continue
        rejected = {e["client"] for e in r.get("embeddings_rejected", [])}
        for k, agreement in zip(r["accepted"], r["embedding_agreement"]):
            role = "attacker" if k in attackers else "honest"
            stats[f"{role}_checked"] += 1
            stats[f"{role}_rejected"] += k in rejected
            stats[f"agreement_{role}"].append(agreement)
    return stats


def run_seed(seed: int, out: Path, log, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    started, cpu = time.perf_counter(), time.process_time()
    fed = build_federation(load_config("tiny", [*BASE, f"seed={seed}"]), log_fn=lambda s: None)
    snapshot = (fed.backbone.image_lora_state(), fed.backbone.text_lora_state(), torch.get_rng_state())
    log(f"seed {seed}: federation built in {time.perf_counter() - started:.0f} s ({time.process_time() - cpu:.0f} s CPU)")
    stats = {}
    for name, overrides, attackers in cells():
        if only is not None and name not in only:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        config = load_config("tiny", [*BASE, f"seed={seed}", *overrides])
        fed.backbone.load_image_lora(snapshot[0])
        fed.backbone.load_text_lora(snapshot[1])
        torch.set_rng_state(snapshot[2])
        run = out / f"s{seed}" / name
        run_experiment(config, run, progress=False, log_fn=lambda s: None, fed=dataclasses.replace(fed, config=config))
        stats[name] = {**cell_stats(run, attackers), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        s = stats[name]
        log(f"seed {seed} {name}: Base {s['base']:.2f} Novel {s['novel']:.2f} HM {s['hm']:.2f} "
            f"[{s['wall_s']:.0f} s, {s['cpu_s']:.0f} s CPU]")
    return stats


Stats = dict[int, dict[str, dict[str, Any]]]
"""seed -> cell -> cell_stats."""


def _accuracy(stats: Stats, cell: str) -> str:
    """HM mean ± sample std over seeds (Base / Novel means)."""
    hm = [s[cell]["hm"] for s in stats.values()]
    spread = f" ± {np.std(hm, ddof=1):.2f}" if len(hm) > 1 else ""
    base, novel = (np.mean([s[cell][k] for s in stats.values()]) for k in ("base", "novel"))
    return f"{np.mean(hm):.2f}{spread} ({base:.1f} / {novel:.1f})"


def _total(stats: Stats, cell: str, key: str) -> int:
    return sum(s[cell][key] for s in stats.values())


def table(stats: Stats) -> str:
    """Markdown: HM per rule and attack (mean over seeds); the embedding check's rejections."""
    lines = [
        "| aggregation | no attack | sign_flip | scaled | collude | rounds an attacker was picked (sign_flip / scaled / collude) |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        picked = "n/a (coordinate-wise)"
        if any(s[f"{rule}-sign_flip"]["rounds_an_attacker_picked"] is not None for s in stats.values()):
            rounds = _total(stats, f"{rule}-none", "rounds")
            picked = " / ".join(f"{_total(stats, f'{rule}-{m}', 'rounds_an_attacker_picked')} of {rounds}" for m in WEIGHT_ATTACKS[1:])
        lines.append(f"| {rule} | " + " | ".join(_accuracy(stats, f"{rule}-{m}") for m in WEIGHT_ATTACKS) + f" | {picked} |")
    lines += [
        "",
        "| embedding check (fedavg) | HM (Base / Novel) | honest uploads rejected | attacker uploads rejected "
        "| honest agreement: min / median | attacker agreement: min / median |",
        "|---|---|---|---|---|---|",
    ]

    def share(cell: str, role: str) -> str:
        checked = _total(stats, cell, f"{role}_checked")
        return f"{_total(stats, cell, f'{role}_rejected')} of {checked}" if checked else "n/a"

    def spread(cell: str, role: str) -> str:
        values = [a for s in stats.values() for a in s[cell][f"agreement_{role}"]]
        return f"{min(values):.2f} / {np.median(values):.2f}" if values else "n/a"

    for cell, title in (
        ("fedavg-none", "off, no attack"),
        ("fedavg-none-check", f"on ({MIN_AGREEMENT}), no attack"),
        ("fedavg-label_flip", "off, label_flip"),
        ("fedavg-label_flip-check", f"on ({MIN_AGREEMENT}), label_flip"),
    ):
        lines.append(
            f"| {title} | {_accuracy(stats, cell)} | {share(cell, 'honest')} | {share(cell, 'attacker')} "
            f"| {spread(cell, 'honest')} | {spread(cell, 'attacker')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/robust"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", help="run only these cells (names as in the log); no table")
    parser.add_argument("--table", action="store_true", help="only print the table of <out>/summary.json")
    args = parser.parse_args()
    if args.table:
        stats = {int(k): v for k, v in json.loads((args.out / "summary.json").read_text()).items()}
        print(table(stats))
        return
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
