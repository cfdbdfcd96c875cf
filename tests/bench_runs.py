"""Hand-made suite output folders for the bench-report tests: one finished run per call."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(root: Path, scenario: str, method: str, seed: int, base: float, novel: float) -> None:
    """``root/runs/<scenario>/<method>/seed<seed>`` with results.json and one metrics row (Local = Base)."""
    d = root / "runs" / scenario / method / f"seed{seed}"
    d.mkdir(parents=True)
    hm = 2 * base * novel / (base + novel)
    (d / "results.json").write_text(json.dumps({"base_acc": base, "novel_acc": novel, "hm": hm, "local_acc": base}))
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "hm": hm}) + "\n")
