"""The run directory: everything a run produces lives here.

config.toml (resolved), metrics.jsonl (one JSON object per round), results.json, the final LoRA
weights (final_lora.safetensors) and plots.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from feddtl.config import ExperimentConfig, to_toml


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None says "not measured"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


MACHINE_FIELDS = ("wall_s", "setup_s")
"""results.json / metrics.jsonl fields that describe the machine, not the run (with time_* and *rss*)."""


def result_fields(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without its wall-time and memory measurements: what must be equal between two runs of
    the same config and seed (resumed or not, cached or not)."""
    return {k: v for k, v in row.items() if k not in MACHINE_FIELDS and not k.startswith("time_") and "rss" not in k}


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: ExperimentConfig) -> None:
        atomic_write_text(self.path / "config.toml", to_toml(config))

    def reset_metrics(self) -> None:
        self.metrics_path.write_text("")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with ``rows`` (atomically): a resumed run drops rows past its checkpoint."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.path / "results.json", json.dumps(_jsonable(results), indent=2) + "\n")

    def save_weights(self, tensors: dict[str, torch.Tensor], name: str = "final_lora.safetensors") -> None:
        if not tensors:
            return
        tmp = self.path / (name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.path / name)
