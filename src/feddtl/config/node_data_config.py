"""A Flower SuperNode's own data: the node-config key ``data`` (set on the node, not in the experiment).

Across organisations every SuperNode holds its own images. It names them in its node config,
``flower-supernode --node-config 'partition-id=0 num-partitions=2 data="imagefolder:/data/ours"'``, and
then trains on them instead of a partition of the run's dataset. The run's configuration says which
classes exist: the server's dataset, or, when the server holds no data at all, ``dataset = "node-local"``
with ``data.class_names_file``. Imports nothing heavy: read by the ClientApp on every message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from feddtl.config.errors import ConfigError
from feddtl.config.node_config_values import node_string

DATA_KEY = "data"
NODE_LOCAL = "node-local"
"""The ``dataset`` value of a run whose server holds no data: every SuperNode brings its own, the run's
class list comes from ``data.class_names_file``, and evaluation runs on the nodes."""
LOCAL_PREFIXES = ("imagefolder:", "hf:")
"""The data a node may name: a folder of class sub-folders, or a Hugging Face dataset on the node's disk."""


@dataclass(frozen=True)
class NodeDataConfig:
    """Which data a SuperNode trains (and, in a ``node-local`` run, evaluates) on."""

    source: str | None = None
    """``data``: ``imagefolder:<path>`` (one sub-folder of images per class, optionally under train/ and
    test/) or ``hf:<path>`` (a Hugging Face dataset saved on this machine). Its classes are matched by name
    onto the run's class list; its test split (or a seeded stratified split of it, ``data.test_fraction``)
    is held out for evaluation. None: the node holds partition ``partition-id`` of the run's dataset, as
    in-process."""

    @property
    def own(self) -> bool:
        return self.source is not None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeDataConfig:
        """The setting of a SuperNode's node config (other keys are ignored), checked: a string with one of
        ``LOCAL_PREFIXES`` naming a path that exists on this machine."""
        hint = f'e.g. --node-config \'{DATA_KEY}="imagefolder:/data/images"\''
        value = node_string(node_config, DATA_KEY, f"a string ({hint})")
        if value is None:
            return cls()
        prefix = next((p for p in LOCAL_PREFIXES if value.startswith(p)), None)
        if prefix is None:
            raise ConfigError(
                f"node config {DATA_KEY}={value!r} must start with one of {', '.join(LOCAL_PREFIXES)} ({hint})"
            )
        path = Path(value[len(prefix):]).expanduser()
        if not value[len(prefix):] or not path.exists():
            raise ConfigError(f"node config {DATA_KEY}={value!r}: {path} does not exist on this SuperNode's machine")
        if prefix == "imagefolder:" and not path.is_dir():
            raise ConfigError(f"node config {DATA_KEY}={value!r}: {path} is not a folder")
        return cls(value)
