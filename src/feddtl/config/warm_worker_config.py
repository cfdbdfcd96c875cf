"""A Flower SuperNode's warm worker: its settings, from the node's ``--node-config`` (not the experiment's).

Read by the ClientApp on every message (before anything heavy is imported) and by the worker itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from feddtl.config.errors import ConfigError
from feddtl.config.node_config_values import node_bool, node_number

ENABLED_KEY = "warm-worker"
IDLE_KEY = "warm-idle-s"


@dataclass
class WarmWorkerConfig:
    """Whether a SuperNode's ClientApp processes hand their messages to a process kept warm between them.

    Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process, which would import torch and load
    the node's state each time. With the warm worker on, that process imports only flwr and hands the
    message over a Unix socket to a worker of its node that already holds torch, feddtl and the node's
    state (``feddtl.flower.warm_worker``). Set on the node:
    ``flower-supernode --node-config "partition-id=0 num-partitions=2 warm-worker=true warm-idle-s=600"``.
    """

    enabled: bool = True
    """``warm-worker``: true (default): hand messages to the node's warm worker, started by the first message
    that finds none (on Linux; elsewhere, and in the Simulation Engine, messages are served in their own
    process). false: every message is served in its own ``flwr-clientapp`` process."""
    idle_s: float = 600.0
    """``warm-idle-s``: seconds without a message after which the worker exits (the next message starts
    another). It also exits when its SuperNode is gone."""

    def validate(self) -> None:
        if not self.idle_s > 0:
            raise ValueError(f"node config {IDLE_KEY} must be a number of seconds > 0, got {self.idle_s}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> WarmWorkerConfig:
        """The warm-worker settings of a SuperNode's node config (other keys are ignored)."""
        config = cls()
        enabled = node_bool(node_config, ENABLED_KEY, "true or false")
        if enabled is not None:
            config.enabled = enabled
        idle_s = node_number(node_config, IDLE_KEY, "a number of seconds > 0")
        if idle_s is not None:
            config.idle_s = idle_s
        try:
            config.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return config
