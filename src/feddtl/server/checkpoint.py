"""Round checkpoints: a stopped run resumes where it stopped and ends with the same results.

Under ``<run>/checkpoint/``:
- ``state-<round>-<token>.safetensors``: the method's server state (``Method.checkpoint_state``: global
  weights, optimiser moments, generator states) and the global torch RNG states;
- ``state.json``: the commit point. It names the tensor file and its SHA-256 and holds the round, the
  method's metadata, the metrics rows so far and the fingerprint of the experiment config.

Each file is written under a temporary name, flushed to disk and renamed, ``state.json`` last, so a
crash at any moment leaves either the previous checkpoint or the new one, never a mix. Nothing is
unpickled: tensors load with safetensors, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import feddtl
from feddtl.config import ConfigError, ExperimentConfig, load_config
from feddtl.methods.base import Method
from feddtl.server.rundir import METRICS_FILE

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
OPERATIONAL_SECTIONS = ("checkpoint", "robustness", "faults", "flower")
"""Config sections that may change on resume (`--set` with `--resume`, `overrides` with a Flower `resume`):
they decide how failures are handled and how the engine waits, not what a completed round computed."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used; the message says which and why."""


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    round: int
    """The last completed round it holds (0: before the first round)."""
    method: str
    tensors: dict[str, torch.Tensor]
    """Method tensors, keys as ``Method.checkpoint_state`` returned them."""
    meta: dict[str, Any]
    """Method metadata, as ``Method.checkpoint_state`` returned it."""
    rng: dict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    """metrics.jsonl rows of rounds 1..round."""


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (nested sections too) that differ from ``defaults``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            changed = _non_default(value, default)
            if changed:
                out[key] = changed
        elif value != default:
            out[key] = value
    return out


def config_fingerprint(config: ExperimentConfig) -> str:
    """SHA-256 of what the completed rounds depend on: the config's values that differ from feddtl's defaults,
    the operational sections left out. A key that a later feddtl adds at its default leaves it unchanged, so a
    run checkpointed before an upgrade still resumes; a changed value, or a key set away from its default, does not."""
    values = {k: v for k, v in config.to_dict().items() if k not in OPERATIONAL_SECTIONS}
    changed = _non_default(values, ExperimentConfig().to_dict())
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()


def checkpoint_due(round_num: int, rounds: int, every: int) -> bool:
    """Whether a checkpoint is written after ``round_num``: every ``every`` rounds and after the last."""
    return round_num == rounds or (every > 0 and round_num % every == 0)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_checkpoint(
    run_dir: str | Path, round_num: int, method: Method, rows: list[dict[str, Any]], config: ExperimentConfig
) -> Path:
    """Write the state after round ``round_num`` (atomically); returns the state.json path."""
    if [r.get("round") for r in rows] != list(range(1, round_num + 1)):
        raise CheckpointError(f"checkpoint after round {round_num} needs the metrics rows of rounds 1..{round_num}")
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    method_tensors, meta = method.checkpoint_state()
    tensors = {f"method.{k}": v for k, v in method_tensors.items()}
    tensors.update({f"rng.{k}": v for k, v in _rng_tensors().items()})
    # Clones: safetensors refuses tensors that share memory (sft_reference may alias image_lora).
    data = save_tensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    name = f"state-{round_num:05d}-{secrets.token_hex(4)}.safetensors"
    _write_durably(folder / name, data)
    state = {
        "format": FORMAT_VERSION,
        "round": round_num,
        "method": config.method,
        "config_fingerprint": config_fingerprint(config),
        "tensors": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "method_meta": meta,
        "metrics": rows,
        "feddtl_version": feddtl.__version__,
    }
    state_path = folder / STATE_FILE
    _write_durably(state_path, json.dumps(state).encode())
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return state_path


def _check_nothing_lost(run_dir: Path) -> None:
    """A run without state.json may start at round 1 only if it never got past its setup.

    Every run writes a checkpoint of round 0 before its first round, and state.json is replaced, never
    removed, afterwards: so checkpoint tensors or metrics rows without a state.json mean it was deleted or
    lost, and starting again at round 1 would silently throw completed rounds away."""
    tensors = sorted((run_dir / CHECKPOINT_DIR).glob("state-*.safetensors"))
    metrics = run_dir / METRICS_FILE
    rows = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip()) if metrics.is_file() else 0
    if tensors or rows:
        found = f"checkpoint tensors ({tensors[0].name})" if tensors else f"{rows} metrics rows"
        raise CheckpointError(
            f"{run_dir}/{CHECKPOINT_DIR}/{STATE_FILE} is missing, but the run has {found}: its checkpoint was "
            f"deleted or lost, so it cannot resume; `feddtl run --resume {run_dir} --restart` starts it again "
            "from round 1"
        )


def load_checkpoint(run_dir: str | Path, config: ExperimentConfig) -> Checkpoint | None:
    """The checkpoint of ``run_dir`` checked against ``config``; None if the run has none because it
    stopped before its first checkpoint (during the setup). CheckpointError: corrupt, foreign, mismatched,
    or missing although the run had completed rounds."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    state_path = folder / STATE_FILE
    if not state_path.exists():
        _check_nothing_lost(Path(run_dir))
        return None
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is unreadable or corrupt: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: not a feddtl checkpoint of format {FORMAT_VERSION}")
    if state.get("method") != config.method:
        raise CheckpointError(f"{state_path} holds method {state.get('method')!r}, but the config says {config.method!r}")
    if state.get("config_fingerprint") != config_fingerprint(config):
        raise CheckpointError(
            f"{run_dir}/config.toml changed since the checkpoint was written (only the sections "
            f"{', '.join(OPERATIONAL_SECTIONS)} may change on resume); restore it or start a new run"
        )
    round_num = state.get("round")
    if not isinstance(round_num, int) or not 0 <= round_num <= config.rounds:
        raise CheckpointError(f"{state_path}: round {round_num!r} is outside 0..{config.rounds}")
    tensor_path = folder / str(state.get("tensors"))
    try:
        data = tensor_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint tensors {tensor_path} cannot be read: {exc}") from None
    if hashlib.sha256(data).hexdigest() != state.get("sha256"):
        raise CheckpointError(f"checkpoint tensors {tensor_path} are corrupt (SHA-256 mismatch)")
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint tensors {tensor_path} cannot be parsed: {exc}") from None
    rows = state.get("metrics")
    if not isinstance(rows, list) or [r.get("round") for r in rows] != list(range(1, round_num + 1)):
        raise CheckpointError(f"{state_path}: the metrics rows do not cover rounds 1..{round_num}")
    return Checkpoint(
        round=round_num,
        method=state["method"],
        tensors={k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")},
        meta=state.get("method_meta") or {},
        rng={k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")},
        rows=rows,
    )


def restore_checkpoint(checkpoint: Checkpoint, method: Method) -> None:
    """Load the checkpointed server state into a freshly built ``method`` and the global RNGs."""
    try:
        method.load_checkpoint_state(checkpoint.tensors, checkpoint.meta)
    except NotImplementedError as exc:
        raise CheckpointError(str(exc)) from None
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint does not fit method {checkpoint.method!r}: {exc}") from None
    torch.set_rng_state(checkpoint.rng["torch"])
    cuda_keys = sorted((k for k in checkpoint.rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    cuda = [checkpoint.rng[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def remove_checkpoint(run_dir: str | Path) -> None:
    """Delete a run directory's checkpoint (a fresh run into an old directory must not resume from it)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name == STATE_FILE or path.name.startswith("state-") or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config of the run in ``run_dir`` (its config.toml), with ``key=value`` overrides of the
    operational sections only: the rest must stay as the completed rounds computed it."""
    config_path = Path(run_dir) / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.toml there; is it a feddtl run directory?")
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".")[0]
        if section not in OPERATIONAL_SECTIONS:
            raise ConfigError(
                f"--set {item} with --resume: only keys of {', '.join(OPERATIONAL_SECTIONS)} may change on "
                "resume; start a new run to change anything else"
            )
    return load_config(str(config_path), overrides)
