"""Plots of a run's metrics (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """Accuracy vs round and the RL diagnostics vs round; returns the files written."""
    written: list[Path] = []
    evals = [m for m in metrics if m.get("base_acc") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [m["round"] for m in evals]
        for key, label in (("base_acc", "Base"), ("novel_acc", "Novel"), ("hm", "HM"), ("local_acc", "Local")):
            ax.plot(rounds, [m.get(key) for m in evals], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title or "accuracy per round")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "accuracy.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    rl = [m for m in metrics if m.get("client_reward") is not None]
    if rl:
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [m["round"] for m in rl]
        for key, label in (
            ("client_reward", "mean reward"),
            ("client_silent_groups", "silent-group fraction"),
            ("client_clip_fraction", "clip fraction"),
            ("client_kl", "KL (k3)"),
        ):
            ax.plot(rounds, [m.get(key) for m in rl], marker=".", label=label)
        ax.set_xlabel("round")
        ax.set_title("GRPO diagnostics (mean over clients)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "grpo.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
