"""Flatten server-side optimiser and generator states into tensors + JSON, and back (for checkpoints)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-parameter state as ``{"<param index>.<name>": tensor}`` (Adam: step, exp_avg, exp_avg_sq) and
    the non-tensor entries as JSON. Hyper-parameters are not saved: they come from the config."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().clone()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Restore what ``optimizer_state`` returned into an optimiser over the same parameters."""
    num_params = sum(len(g["params"]) for g in optimizer.param_groups)
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        index, name = key.split(".", 1)
        if not 0 <= int(index) < num_params:
            raise ValueError(f"optimizer state for parameter {index}, but the optimizer has {num_params}")
        state[int(index)][name] = value
    full = optimizer.state_dict()
    full["state"] = dict(state)
    optimizer.load_state_dict(full)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with ``prefix.`` before every key."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(
    tensors: dict[str, torch.Tensor], prefix: str, order: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed.

    ``order``: the keys in the order the live state has them (safetensors files sort their keys, and
    code that sums over a state's tensors must see the same order after a resume as before).
    """
    start = prefix + "."
    out = {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
    if order is None:
        return out
    if set(order) != set(out):
        extra, missing = sorted(set(out) - set(order)), sorted(set(order) - set(out))
        raise ValueError(f"saved {prefix} state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    return {k: out[k] for k in order}


def matching(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``tensors`` checked against the live state ``expected``: the same keys, shapes and dtypes, returned
    in ``expected``'s order. A checkpoint of another model (or another num_clients) fails here, not later."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"saved {what} state does not match: unexpected {extra[:3]}, missing {missing[:3]}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape) or tensors[key].dtype != ref.dtype:
            raise ValueError(
                f"saved {key} is {tuple(tensors[key].shape)} {tensors[key].dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
    return {k: tensors[k] for k in expected}
