"""Known trap 2 (DESIGN.md): how the latent-noise scale and where it goes set the RL signal.

Runs the demo preset with 10 SFT rounds and 2 RL rounds for each (noise_space, sigma) and prints
the RL stage's mean reward rate and silent-group fraction (groups whose G actions all agree carry no
advantage), plus the final accuracies. Usage: python benchmarks/noise_scale.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from feddtl.config import load_config
from feddtl.server.experiment import run_experiment

SETTINGS = [("embedding", 0.1), ("embedding", 0.03), ("embedding", 0.01), ("features", 0.1), ("features", 0.03)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="noise-scale-"))
    print("| noise_space | sigma | RL reward | silent groups | clip fraction | Base | Novel | HM |")
    print("|---|---|---|---|---|---|---|---|")
    for space, sigma in SETTINGS:
        config = load_config(
            "demo",
            [f"rounds={args.rounds}", "client.switch_round=10", f'grpo.noise_space="{space}"', f"grpo.sigma={sigma}",
             f"eval.every={args.rounds}"],
        )
        res = run_experiment(config, out / f"{space}-{sigma}", progress=False, log_fn=lambda s: None)
        rows = [json.loads(x) for x in (out / f"{space}-{sigma}" / "metrics.jsonl").read_text().splitlines()]
        rl = [r for r in rows if r["stage"] == "rl"]
        mean = lambda k: sum(r[k] for r in rl) / len(rl)  # noqa: E731
        print(
            f"| {space} | {sigma} | {mean('client_reward'):.3f} | {mean('client_silent_groups'):.3f} | "
            f"{mean('client_clip_fraction'):.3f} | {res['base_acc']:.1f} | {res['novel_acc']:.1f} | {res['hm']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
