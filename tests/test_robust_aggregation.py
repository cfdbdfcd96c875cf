"""server.aggregation: each robust rule against Flower's legacy aggregation functions on random arrays,
against an outlier, at its bound (a config error naming it) and below it at run time (the round keeps
the global weights); fedavg is exactly the sample-weighted average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from feddtl.algorithm.aggregation import weighted_average
from feddtl.config import ConfigError, load_config
from feddtl.config.server_config import ServerConfig
from feddtl.methods.robust_aggregation import aggregate_states

KEYS = {"a": (3, 4), "b": (5,)}


def random_states(n: int, seed: int = 0, spread: float = 1.0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: spread * torch.randn(shape, generator=g) for k, shape in KEYS.items()} for _ in range(n)]


def as_flower(states, weights) -> list[tuple[list[np.ndarray], int]]:
    return [([s[k].to(torch.float64).numpy() for k in KEYS], w) for s, w in zip(states, weights)]


def run(rule: str, states, weights=None, f: int = 0, **server):
    weights = weights or [1] * len(states)
    config = ServerConfig(aggregation=rule, assumed_attackers=f, **server)  # type: ignore[arg-type]
    return aggregate_states(states, weights, list(range(len(states))), config)


def assert_state_close(state, arrays, atol=1e-6):
    for k, expected in zip(KEYS, arrays):
        assert state[k].dtype == torch.float32
        np.testing.assert_allclose(state[k].numpy(), expected, rtol=0, atol=atol)


# ----- each rule equals Flower's on random arrays --------------------------------------------------


def test_median_is_flowers_aggregate_median():
    # prepare
    states = random_states(7)
    # execute
    out, metrics = run("median", states)
    # assert
    assert_state_close(out, aggregate_median(as_flower(states, [1] * 7)))
    assert metrics == {}


@pytest.mark.parametrize("n,f", [(5, 1), (7, 3), (49, 1), (12, 2)])
def test_trimmed_mean_cuts_exactly_f_from_each_side_as_flower(n, f):
    # prepare: 1/49 * 49 < 1, the rounding trap a fraction f / n would fall into
    states = random_states(n, seed=n)
    stacked = np.sort(np.stack([s["b"].numpy().astype(np.float64) for s in states]), axis=0)
    # execute
    out, _ = run("trimmed-mean", states, f=f)
    # assert: Flower's function with a cut of exactly f, and the mean of the middle n - 2f by hand
    assert_state_close(out, aggregate_trimmed_avg(as_flower(states, [1] * n), f / n + 1e-9))
    np.testing.assert_allclose(out["b"].numpy(), stacked[f : n - f].mean(axis=0), atol=1e-6)


def test_krum_picks_flowers_krum_update_and_names_it():
    # prepare
    states = random_states(8, seed=3)
    # execute
    out, metrics = run("krum", states, f=2)
    # assert: the very update Flower's Krum returns, recorded by client id
    expected = aggregate_krum(as_flower(states, [1] * 8), num_malicious=2, to_keep=0)
    picked = metrics["aggregation_selected"]
    assert len(picked) == 1 and all(torch.equal(out[k], states[picked[0]][k]) for k in KEYS)
    assert_state_close(out, expected)


def test_multi_krum_averages_flowers_selection_by_sample_count():
    # prepare
    states, weights = random_states(9, seed=4), [10, 20, 30, 40, 50, 60, 70, 80, 90]
    # execute
    out, metrics = run("multi-krum", states, weights, f=2, multikrum_select=4)
    # assert: Flower's MultiKrum (selection, then the sample-weighted mean) and our record of the picks
    assert_state_close(out, aggregate_krum(as_flower(states, weights), num_malicious=2, to_keep=4), atol=1e-5)
    picked = metrics["aggregation_selected"]
    assert len(picked) == 4 and picked == sorted(picked)
    reference = weighted_average([states[i] for i in picked], [weights[i] for i in picked])
    assert all(torch.equal(out[k], reference[k]) for k in KEYS)


def test_multi_krum_selects_n_minus_f_by_default():
    # prepare / execute
    _, metrics = run("multi-krum", random_states(9, seed=5), f=2)
    # assert
    assert len(metrics["aggregation_selected"]) == 7


def test_bulyan_is_flowers_recursive_bulyan():
    # prepare: n = 4f + 3
    states = random_states(11, seed=6)
    flower_input = as_flower(states, [1] * 11)
    # execute
    out, metrics = run("bulyan", states, f=2)
    # assert: Flower's legacy aggregate_bulyan (Krum recursion) gives the same, and n - 2f updates were picked
    expected = aggregate_bulyan(list(flower_input), num_malicious=2, aggregation_rule=aggregate_krum, to_keep=0)
    assert_state_close(out, expected)
    assert len(metrics["aggregation_selected"]) == 11 - 2 * 2


# ----- each robust rule resists what FedAvg does not -------------------------------------------------


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_robust_rules_ignore_two_colluding_outliers(rule):
    # prepare: 9 honest updates near 0, two identical attackers at +50 (a colluding pair); n = 11 >= 4f + 3
    states = random_states(9, seed=7, spread=0.1) + [{k: torch.full(s, 50.0) for k, s in KEYS.items()}] * 2
    # execute
    fedavg, _ = run("fedavg", states)
    out, metrics = run(rule, states, f=2)
    # assert: FedAvg is dragged to ~9, the robust rule stays among the honest
    assert float(fedavg["b"].mean()) > 5
    assert all(float(v.abs().max()) < 0.5 for v in out.values())
    # Krum and Multi-Krum never pick an attacker. Bulyan's recursion does, in its last steps: with 5 updates
    # left Krum scores each by its single nearest neighbour, and the identical pair scores 0; its trimmed
    # stage (the n - 4f values per coordinate closest to the median) is what keeps them out of the result.
    if rule in ("krum", "multi-krum"):
        assert not {9, 10} & set(metrics["aggregation_selected"])


def test_fedavg_is_exactly_the_weighted_average():
    # prepare
    states, weights = random_states(4, seed=8), [3, 1, 4, 1]
    # execute
    out, metrics = run("fedavg", states, weights, f=3)
    # assert: bit for bit the FedAvg the project always used (and f is ignored)
    reference = weighted_average(states, weights)
    assert all(torch.equal(out[k], reference[k]) for k in KEYS) and metrics == {}


# ----- the bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule,f,clients,bound",
    [
        ("krum", 2, 6, r"n > 2f \+ 2 = 6"),
        ("multi-krum", 1, 4, r"n > 2f \+ 2 = 4"),
        ("bulyan", 2, 10, r"n >= 4f \+ 3 = 11"),
        ("trimmed-mean", 2, 4, r"n > 2f = 4"),
        ("median", 1, 2, r"n > 2f = 2"),
    ],
)
def test_a_round_too_small_for_the_bound_is_a_config_error(rule, f, clients, bound):
    # prepare / execute / assert: the message names the rule, f, the bound and the round size
    with pytest.raises(ConfigError, match=rf"server\.aggregation = '{rule}' with server\.assumed_attackers = {f} needs {bound} clients a round, but num_clients x client_fraction gives {clients}"):
        load_config("tiny", [f"num_clients={clients}", f"server.aggregation={rule}", f"server.assumed_attackers={f}"])


def test_the_bound_counts_the_clients_of_a_round_not_all_clients():
    # prepare / execute / assert: 20 clients at 0.5 are 10 a round, one short of Bulyan's 11 for f = 2
    with pytest.raises(ConfigError, match="gives 10"):
        load_config("tiny", ["num_clients=20", "client_fraction=0.5", "server.aggregation=bulyan", "server.assumed_attackers=2"])
    config = load_config("tiny", ["num_clients=20", "client_fraction=0.55", "server.aggregation=bulyan", "server.assumed_attackers=2"])
    assert config.clients_per_round == 11


@pytest.mark.parametrize(
    "override,message",
    [
        ("server.aggregation=mean", r"server\.aggregation='mean' is not allowed; allowed: 'fedavg', 'median', 'trimmed-mean', 'krum', 'multi-krum', 'bulyan'"),
        ("server.assumed_attackers=-1", r"server\.assumed_attackers must be >= 0, got -1"),
        ("server.multikrum_select=0", r"server\.multikrum_select must be >= 1 or none, got 0"),
        ("server.embedding_min_relative_agreement=1.5", r"server\.embedding_min_relative_agreement must be in \(0, 1\] or none, got 1\.5"),
    ],
)
def test_bad_server_keys_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_below_the_bound_at_run_time_the_round_keeps_the_global_weights():
    # prepare: a Krum round with f = 1 planned for 5 clients, of which only 4 sent a valid update
    states = random_states(4, seed=9)
    # execute
    out, metrics = run("krum", states, f=1)
    # assert
    assert out is None
    assert metrics["aggregation_skipped"] == (
        "4 valid updates, but krum with server.assumed_attackers = 1 needs n > 2f + 2 = 4: weights kept"
    )


def test_states_with_different_keys_are_refused():
    # prepare
    states = random_states(3)
    states[2] = {"a": states[2]["a"]}
    # execute / assert
    with pytest.raises(ValueError, match="different keys"):
        run("median", states)
