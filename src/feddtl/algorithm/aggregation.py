"""Server-side aggregation: the sample-weighted average of client LoRA weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k (w_k / sum w) * state_k, key by key. All states must have the same keys and shapes.

    LoRA factors A and B are averaged separately (FedAvg of LoRA), so the merged update is
    avg(B) avg(A), not avg(B A): the usual FedLoRA approximation.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {list(weights)}")
    keys = set(states[0])
    out: dict[str, torch.Tensor] = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float64)
        for state, w in zip(states, weights):
            if set(state) != keys:
                raise ValueError("client LoRA states have different keys")
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(states[0][name].dtype)
    return out
