"""Aggregation of the clients' weights by ``server.aggregation``: FedAvg or a Byzantine-robust rule.

Every method's server step calls ``aggregate_states`` on the tensors it shares across clients (FedDTL's
image LoRA; FedLoRA's image and text LoRA together; PromptFL's context; FedPGP's shared sigma). "fedavg"
is ``algorithm.aggregation.weighted_average``, untouched. The robust rules reuse Flower's own aggregation
functions (flwr 1.42) on NumPy copies of the states:

- median: ``flwr.server.strategy.aggregate.aggregate_median`` (coordinate-wise, unweighted);
- trimmed-mean: ``flwr.server.strategy.aggregate.aggregate_trimmed_avg`` (cuts f from each side);
- krum, multi-krum: ``flwr.serverapp.strategy.multikrum.select_multikrum`` picks the updates (it says
  which, so the row records them); multi-krum then averages them by sample count with FedAvg's
  ``weighted_average``, as Flower's MultiKrum strategy does;
- bulyan: written here from Flower's pieces. The paper's selection runs Krum n - 2f times, each time on
  the updates not yet picked (``select_multikrum`` with one pick); then ``aggregate_median`` and
  ``flwr.serverapp.strategy.bulyan.aggregate_n_closest_weights`` average, per coordinate, the n - 4f
  picked values closest to the median. Flower's Bulyan strategy picks all n - 2f in one Multi-Krum pass
  instead; its legacy ``aggregate_bulyan`` is the paper's recursion but pops from the caller's list and
  returns no picks. tests/test_robust_aggregation.py checks each rule against Flower's legacy functions.

This module sits in the methods layer, not in ``algorithm/``: Flower is a dependency of the package, but
the algorithm layer stays free of it, and flwr is imported only when a robust rule runs (a fedavg run
never imports it here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from feddtl.algorithm.aggregation import weighted_average
from feddtl.config.server_config import ServerConfig, aggregation_min_clients

State = dict[str, torch.Tensor]


def _to_numpy(states: Sequence[State], keys: list[str]) -> list[list[np.ndarray]]:
    # float64: the Krum distances and the medians of float32 weights are then exact enough that ties and
    # near-ties do not depend on rounding
    out = []
    for state in states:
        if set(state) != set(keys):
            raise ValueError("client states have different keys")
        out.append([state[k].detach().cpu().to(torch.float64).numpy() for k in keys])
    return out


def _to_state(arrays: Sequence[np.ndarray], keys: list[str], like: State) -> State:
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(like[k].dtype) for k, a in zip(keys, arrays)}


def krum_select(arrays: Sequence[list[np.ndarray]], attackers: int, count: int) -> list[int]:
    """Indices of the ``count`` updates with the lowest Krum scores (the sum of squared distances to their
    n - f - 2 nearest others), best first: Flower's ``select_multikrum``."""
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    contents = [RecordDict({"arrays": ArrayRecord(numpy_ndarrays=list(a))}) for a in arrays]
    picked = select_multikrum(contents, num_malicious_nodes=attackers, num_nodes_to_select=count)
    return [next(i for i, c in enumerate(contents) if c is p) for p in picked]


def bulyan(arrays: Sequence[list[np.ndarray]], attackers: int) -> tuple[list[np.ndarray], list[int]]:
    """Bulyan over Krum (El Mhamdi et al., 2018): (aggregate, indices picked by the recursive Krum)."""
    from flwr.server.strategy.aggregate import aggregate_median
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

    n, f = len(arrays), attackers
    theta, beta = n - 2 * f, n - 4 * f
    remaining, picked = list(range(n)), []
    for _ in range(theta):
        best = krum_select([arrays[i] for i in remaining], f, 1)[0]
        picked.append(remaining.pop(best))
    chosen = [arrays[i] for i in picked]
    median = aggregate_median([(a, 1) for a in chosen])
    return aggregate_n_closest_weights(median, chosen, beta), picked


def aggregate_states(
    states: Sequence[State], weights: Sequence[float], client_ids: Sequence[int], server: ServerConfig
) -> tuple[State | None, dict[str, Any]]:
    """(the aggregate of ``states``, metrics-row entries), by ``server.aggregation``.

    ``weights`` (sample counts) weight fedavg and multi-krum's mean; the other rules are unweighted (a
    claimed sample count must not buy influence). The aggregate is None when this round has fewer
    updates than the rule's bound for ``server.assumed_attackers`` (validation or failures removed some):
    the caller keeps its global weights, and ``aggregation_skipped`` in the row says why. The config check
    makes sure a full round always meets the bound.
    """
    rule = server.aggregation
    if rule == "fedavg":
        return weighted_average(states, weights), {}
    if not states:
        raise ValueError("aggregation needs at least one state")
    n, f = len(states), server.assumed_attackers
    need, bound = aggregation_min_clients(rule, f)
    if n < need:
        reason = f"{n} valid updates, but {rule} with server.assumed_attackers = {f} needs {bound}: weights kept"
        return None, {"aggregation_skipped": reason}
    keys = list(states[0])
    arrays = _to_numpy(states, keys)
    metrics: dict[str, Any] = {}
    if rule == "median":
        from flwr.server.strategy.aggregate import aggregate_median

        out = _to_state(aggregate_median([(a, 1) for a in arrays]), keys, states[0])
    elif rule == "trimmed-mean":
        from flwr.server.strategy.aggregate import aggregate_trimmed_avg

        # Flower cuts int(fraction * n) from each side; f / n can round to just below f (1/49*49 < 1), so
        # ask for f + 1/4 of an update, which stays below half for every n > 2f
        fraction = (f + 0.25) / n
        out = _to_state(aggregate_trimmed_avg([(a, 1) for a in arrays], fraction), keys, states[0])
    elif rule in ("krum", "multi-krum"):
        count = 1 if rule == "krum" else min(n, server.multikrum_select or n - f)
        picked = sorted(krum_select(arrays, f, count))  # client order: the mean's float sum is then fixed
        out = weighted_average([states[i] for i in picked], [weights[i] for i in picked])
        metrics["aggregation_selected"] = [client_ids[i] for i in picked]
    elif rule == "bulyan":
        result, picked = bulyan(arrays, f)
        out = _to_state(result, keys, states[0])
        metrics["aggregation_selected"] = sorted(client_ids[i] for i in picked)
    else:
        raise ValueError(f"server.aggregation={rule!r} is unknown")
    return out, metrics
