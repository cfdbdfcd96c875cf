"""Who trains in a round, with which seed, and where: client selection, per-round client seeds, and
the ``ClientRunner`` protocol the round loop talks to (in-process clients here; Flower SuperNodes in
``feddtl.flower.server_app``).

Kept free of heavy imports: a Flower ClientApp imports ``client_seed`` from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.config import ExperimentConfig
from feddtl.methods.text_side import with_base_text

if TYPE_CHECKING:  # annotations only: the server loop is told its federation and method
    from feddtl.federation import Federation
    from feddtl.methods.base import Method


def client_seed(seed: int, round_num: int, client_id: int) -> int:
    """Independent, reproducible seed of one client's local round (the same on every engine)."""
    return int(np.random.SeedSequence([seed, round_num, client_id]).generate_state(1)[0])


def select_clients(config: ExperimentConfig, round_num: int) -> list[int]:
    """The clients of round ``round_num``: all, or a seeded ``client_fraction`` of them (sorted)."""
    k, m = config.num_clients, config.clients_per_round
    if m >= k:
        return list(range(k))
    rng = np.random.default_rng([config.seed, round_num, 17])
    return sorted(rng.choice(k, size=m, replace=False).tolist())


class ClientRunner(Protocol):
    """Runs the clients' local rounds for the server loop, wherever they live."""

    def dispatch(self, tasks: dict[int, ClientTask]) -> None:
        """Start one attempt of a round: client k is to run ``tasks[k]`` (remote runners send them all now)."""

    def step(self, task: ClientTask, client_id: int) -> ClientUpdate | None:
        """Client ``client_id``'s update for ``task`` (dispatched before); None: no reply. Raises what
        went wrong on the client."""

    def cancel(self, client_id: int) -> None:
        """The server gave up waiting for ``client_id`` (robustness.client_timeout_s): abandon its call if possible."""


class InProcessClients:
    """Every client in this process, one after the other, on the federation's shared backbone.

    Each client loads the global state it is sent before training, so sharing the backbone is exactly
    equivalent to separate processes (the Flower engines run the same ``client_step`` across processes).
    """

    def __init__(self, fed: Federation, method: Method) -> None:
        self.fed = fed
        self.client_step = method.client_step
        # the base prompts' text features are public: clients that run the text tower get them too
        self.data = [with_base_text(d, fed.base_text) for d in fed.clients] if method.client_text else fed.clients

    def dispatch(self, tasks: dict[int, ClientTask]) -> None:
        """Nothing to send: ``step`` runs each client when asked."""

    def step(self, task: ClientTask, client_id: int) -> ClientUpdate:
        config = self.fed.config
        seed = client_seed(config.seed, task.round, client_id)
        return self.client_step(self.fed.backbone, self.data[client_id], task, config, seed)

    def cancel(self, client_id: int) -> None:
        """A client step in this process cannot be stopped: the round waits for it (see call_client)."""
