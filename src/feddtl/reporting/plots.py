"""Plots of a run's metrics and of its partition (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

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


# Above this many cells the counts are left out of the heat map: they would not be legible.
MAX_ANNOTATED_CELLS = 400


def plot_partition(counts: np.ndarray, classnames: list[str], out: Path, title: str = "") -> Path:
    """``partition.png``: a clients x classes heat map of the training images each client holds.

    ``counts[k, c]``: client k's images of class c (the run's base classes, in order)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(classnames):
        raise ValueError(f"counts must be (clients, {len(classnames)} classes), got shape {counts.shape}")
    clients, classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.5 * classes, 24.0), min(1.5 + 0.4 * clients, 24.0)))
    image = ax.imshow(counts, cmap="Blues", aspect="auto", vmin=0)
    fig.colorbar(image, ax=ax, label="training images")
    slanted = classes > 4  # long lists of names overlap when horizontal
    ax.set_xticks(range(classes), classnames, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(clients), [f"client {k} ({n})" for k, n in enumerate(counts.sum(axis=1))])
    if clients * classes <= MAX_ANNOTATED_CELLS:
        threshold = counts.max() / 2 if counts.size else 0
        for k in range(clients):
            for c in range(classes):
                if counts[k, c]:
                    color = "white" if counts[k, c] > threshold else "black"
                    ax.text(c, k, str(counts[k, c]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("class")
    ax.set_title(title or "training images per client and class")
    fig.tight_layout()
    path = out / "partition.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
