"""Suite plots (PNG, matplotlib Agg): HM per method per scenario, accuracy-vs-round curves,
per-client accuracy, and per-domain HM for feature-shift scenarios."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from feddtl.bench.cells import CellSummary, domain_names, domain_stats


def _legend(axes: Any, **kwargs: Any) -> None:
    """One legend, on the first panel that drew something (a scenario with no finished runs draws nothing)."""
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**kwargs)
            return


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_hm(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary], path: Path) -> Path:
    scenarios, methods = suite.get("scenario", []), suite.get("methods", [])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(scenarios) * max(1, len(methods)) / 3), 4.5))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(scenarios))
    for i, m in enumerate(methods):
        stats = [cells[(sc["name"], m)].stat("hm") for sc in scenarios]
        means = [s[0] if s[0] == s[0] else 0.0 for s in stats]
        stds = [s[1] if s[1] == s[1] else 0.0 for s in stats]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(x, [sc["name"] for sc in scenarios], rotation=20, ha="right")
    ax.set_ylabel("HM (%)")
    ax.set_title(f"HM per method and scenario (mean ± std over seeds) — {suite.get('name', '')}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _save(fig, path)


def _curve(summary: CellSummary, key: str) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = {}
    for run in summary.runs:
        for row in run.metrics:
            if row.get(key) is not None and row.get("round", 0) > 0:
                by_round.setdefault(int(row["round"]), []).append(float(row[key]))
    rounds = sorted(by_round)
    return rounds, [float(np.mean(by_round[r])) for r in rounds]


def plot_curves(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary], path: Path) -> Path:
    scenarios, methods = suite.get("scenario", []), suite.get("methods", [])
    rows, cols = _grid(len(scenarios))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, sc in zip(axes.flat, scenarios):
        for m in methods:
            s = cells[(sc["name"], m)]
            rounds, hm = _curve(s, "hm")
            if rounds:
                ax.plot(rounds, hm, marker="o", markersize=3, label=m)
            elif s.runs:  # no rounds (zero-shot): a flat reference line
                ax.axhline(s.stat("hm")[0], linestyle="--", color="grey", linewidth=1, label=m)
        ax.set_title(sc.get("title", sc["name"]), fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("HM (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.axis("off")
    _legend(axes, fontsize=7)
    fig.suptitle("HM vs round (mean over seeds)")
    return _save(fig, path)


def plot_clients(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary], path: Path) -> Path:
    scenarios, methods = suite.get("scenario", []), suite.get("methods", [])
    rows, cols = _grid(len(scenarios))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, sc in zip(axes.flat, scenarios):
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            per_client = [r.results.get("local_acc_per_client") for r in cells[(sc["name"], m)].runs]
            per_client = [p for p in per_client if p]
            if not per_client:
                continue
            arr = np.array([[np.nan if v is None else v for v in p] for p in per_client], dtype=float)
            x = np.arange(arr.shape[1])
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nanmean(arr, axis=0), width, label=m)
        ax.set_title(sc.get("title", sc["name"]), fontsize=9)
        ax.set_xlabel("client")
        ax.set_ylabel("local accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.axis("off")
    _legend(axes, fontsize=7)
    fig.suptitle("Per-client local accuracy (mean over seeds)")
    return _save(fig, path)


def plot_domains(
    suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary], path: Path
) -> Path | None:
    scenarios, methods = suite.get("scenario", []), suite.get("methods", [])
    with_domains = [(sc, domain_names(cells, sc["name"], methods)) for sc in scenarios]
    with_domains = [(sc, d) for sc, d in with_domains if d]
    if not with_domains:
        return None
    fig, axes = plt.subplots(len(with_domains), 1, figsize=(9, 3.6 * len(with_domains)), squeeze=False)
    for ax, (sc, domains) in zip(axes.flat, with_domains):
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(domains))
        for i, m in enumerate(methods):
            stats = [domain_stats(cells[(sc["name"], m)], d, "hm") for d in domains]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [s[0] if s[0] == s[0] else 0 for s in stats], width,
                   yerr=[s[1] if s[1] == s[1] else 0 for s in stats], capsize=2, label=m)
        ax.set_xticks(x, domains, rotation=15)
        ax.set_ylabel("HM (%)")
        ax.set_title(f"HM per domain — {sc.get('title', sc['name'])}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    _legend(axes, fontsize=7, ncol=min(3, len(methods)))
    return _save(fig, path)


def plot_suite(suite: dict[str, Any], cells: dict[tuple[str, str], CellSummary], out: Path) -> list[Path]:
    written = [
        plot_hm(suite, cells, out / "hm.png"),
        plot_curves(suite, cells, out / "curves.png"),
        plot_clients(suite, cells, out / "clients.png"),
    ]
    domains = plot_domains(suite, cells, out / "domains.png")
    return written + ([domains] if domains else [])
