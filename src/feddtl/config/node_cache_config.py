"""A Flower SuperNode's node cache: its settings, from the node's ``--node-config`` (not the experiment's).

Read by the ClientApp on every message and by ``feddtl cache ls|clear``; imports nothing heavy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from feddtl.config.errors import ConfigError
from feddtl.config.node_config_values import node_number, node_string

DIR_KEY = "cache-dir"
MAX_MB_KEY = "cache-max-mb"
DIR_ENV = "FEDDTL_NODE_CACHE_DIR"
"""Environment variable naming the folder when the node config does not (`feddtl run --engine flower-sim`
points it at a temporary folder; tests point it at theirs)."""
FOLDER_NAME = "feddtl-node-cache"


@dataclass
class NodeCacheConfig:
    """Where a SuperNode keeps what does not change between its messages, and how much of it.

    Set on the node: ``flower-supernode --node-config "partition-id=0 num-partitions=2 cache-dir=/data/cache
    cache-max-mb=20000"``. The entries are keyed by what they depend on, so one folder may serve several
    runs, configs and SuperNodes of one machine at once.
    """

    dir: str | None = None
    """``cache-dir``: the folder. None: $FEDDTL_NODE_CACHE_DIR if set, else $FLWR_HOME/feddtl-node-cache if
    FLWR_HOME is set, else ./feddtl-node-cache in the SuperNode's working directory."""
    max_mb: float = 10240.0
    """``cache-max-mb``: size cap of the folder in MiB; beyond it the least recently used entries are evicted
    (the ones a message is using stay). 0 turns the node cache off: every message builds the backbone,
    partition and trunk features again."""

    @property
    def enabled(self) -> bool:
        return self.max_mb > 0

    def folder(self, environ: Mapping[str, str] | None = None) -> Path:
        """The resolved folder (see ``dir``)."""
        env = os.environ if environ is None else environ
        if self.dir:
            return Path(self.dir).expanduser()
        if env.get(DIR_ENV):
            return Path(env[DIR_ENV]).expanduser()
        if env.get("FLWR_HOME"):
            return Path(env["FLWR_HOME"]).expanduser() / FOLDER_NAME
        return Path.cwd() / FOLDER_NAME

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)

    def validate(self) -> None:
        if not self.max_mb >= 0:
            raise ValueError(f"node config {MAX_MB_KEY} must be >= 0 MiB, got {self.max_mb}")
        if self.dir is not None and not self.dir:
            raise ValueError(f"node config {DIR_KEY} must be a non-empty path")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeCacheConfig:
        """The node cache settings of a SuperNode's node config (other keys are ignored)."""
        config = cls()
        directory = node_string(node_config, DIR_KEY, "a path (a string)")
        if directory is not None:
            config.dir = directory
        max_mb = node_number(node_config, MAX_MB_KEY, "a number of MiB")
        if max_mb is not None:
            config.max_mb = max_mb
        try:
            config.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return config
