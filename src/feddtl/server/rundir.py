"""The run directory: everything a run produces lives here.

config.toml (resolved), metrics.jsonl (one JSON object per round), results.json, the final LoRA
weights (final_lora.safetensors) and plots.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
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


METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
"""Written last, atomically: a run directory holding it is a finished run."""
WEIGHTS_FILE = "final_lora.safetensors"


class RunDirError(RuntimeError):
    """The run directory cannot be created or written (a file in the way, no permission); the message says which."""


def _blocking_file(path: Path) -> Path | None:
    """``path`` or the first of its parents that exists and is not a directory (what stops a mkdir)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` (and its parents) and check that files can be created in it; RunDirError otherwise.
    Checked by creating a file, not with os.access: root passes every permission check but still cannot
    write to a read-only mount or into /proc."""
    blocker = _blocking_file(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is below {blocker}, which is a file"
        raise RunDirError(f"run directory {path} {where}, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".feddtl-write-check-"):
            pass
    except OSError as exc:
        raise RunDirError(f"run directory {path} cannot be written: {exc.strerror or exc}") from None


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """results.json of the finished run in ``run_dir``; None if it has not finished (or is no run).
    Reads only: a finished run on a read-only disk is still reported finished."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable or corrupt: {exc}") from None
    if not isinstance(results, dict):
        raise RunDirError(f"{path} is not a feddtl results file")
    return results


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ensure_writable_dir(self.path)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def write_config(self, config: ExperimentConfig) -> None:
        atomic_write_text(self.path / "config.toml", to_toml(config))

    def reset_metrics(self) -> None:
        self.metrics_path.write_text("")

    def start_fresh(self) -> None:
        """Empty metrics.jsonl and remove the results and final weights of an earlier run in this
        directory: a fresh run that stops must not look finished (``--resume`` trusts results.json)."""
        self.reset_metrics()
        for name in (RESULTS_FILE, WEIGHTS_FILE):
            (self.path / name).unlink(missing_ok=True)

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

    def read_results(self) -> dict[str, Any] | None:
        return read_results(self.path)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.path / RESULTS_FILE, json.dumps(_jsonable(results), indent=2) + "\n")

    def save_weights(self, tensors: dict[str, torch.Tensor], name: str = WEIGHTS_FILE) -> None:
        if not tensors:
            return
        tmp = self.path / (name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.path / name)
