"""The FedDTL ClientApp: one SuperNode is one client partition.

The node's partition comes from its ``node_config`` (``partition-id``, ``num-partitions``); the
experiment's configuration comes with every message from the ServerApp. The node builds only its
own client (same dataset, partitioner and seed as the in-process run) and runs the method's own
``client_step`` with the same per-round seed, so a round here computes what it computes in process.
"""

from __future__ import annotations

import atexit
import hashlib
from dataclasses import dataclass, field

from flwr.app import Context, Message, UserConfig
from flwr.clientapp import ClientApp

from feddtl.algorithm.client import ClientData
from feddtl.backbones.base import Backbone
from feddtl.cache import TrunkCache
from feddtl.config import ConfigError, ExperimentConfig, loads_config
from feddtl.data import DatasetSplits, load_dataset
from feddtl.federation import build_client, class_split, client_partition, make_backbone, prompt_features, to_base_index
from feddtl.flower import records
from feddtl.flower.versions import node_versions
from feddtl.methods import get_method
from feddtl.methods.text_side import with_base_text
from feddtl.server.clients import client_seed

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

app = ClientApp()


def node_partition(node_config: UserConfig) -> tuple[int, int]:
    """(partition id, number of partitions) of this SuperNode, checked."""
    hint = f"start the SuperNode with --node-config '{PARTITION_ID}=K {NUM_PARTITIONS}=N'"
    values = []
    for key in (PARTITION_ID, NUM_PARTITIONS):
        value = node_config.get(key)
        if value is None:
            raise ConfigError(f"node_config lacks {key!r}: {hint}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"node_config {key}={value!r} must be an integer: {hint}")
        values.append(value)
    pid, n = values
    if not 0 <= pid < n:
        raise ConfigError(f"node_config {PARTITION_ID}={pid} must be in [0, {NUM_PARTITIONS}={n})")
    return pid, n


@dataclass
class NodeState:
    """What a node keeps between messages while it stays in one process (Simulation Engine actors)."""

    key: str
    config: ExperimentConfig
    splits: DatasetSplits
    num_classes: int
    backbone: Backbone | None = None
    cache: TrunkCache | None = None
    """The node's own trunk cache (config [cache], as in process); its disk files go at exit."""
    clients: dict[int, ClientData] = field(default_factory=dict)


_state: NodeState | None = None
"""Per-process cache. The Deployment Engine starts a fresh process per message, so it only pays
off in the Simulation Engine, whose actors serve many messages (possibly of several partitions)."""


def node_state(experiment_toml: str, num_partitions: int) -> NodeState:
    global _state
    key = hashlib.sha256(experiment_toml.encode()).hexdigest()
    if _state is None or _state.key != key:
        config = loads_config(experiment_toml, source="the configuration sent by the ServerApp")
        splits = load_dataset(config.dataset, config.data, seed=config.seed)
        _state = NodeState(key, config, splits, num_classes=len(class_split(config, splits).base))
    if num_partitions != _state.config.num_clients:
        raise ConfigError(
            f"this SuperNode has {NUM_PARTITIONS}={num_partitions} but the run's config has "
            f"num_clients={_state.config.num_clients}; restart the SuperNodes with "
            f"{NUM_PARTITIONS}={_state.config.num_clients} or change num_clients"
        )
    return _state


def client_data(state: NodeState, partition_id: int) -> tuple[Backbone, ClientData]:
    config = state.config
    if state.backbone is None:
        state.backbone = make_backbone(config)
        state.cache = TrunkCache(
            config.cache, state.backbone, config.data.image_size, config.data.invert, log_fn=lambda s: None
        )
        atexit.register(state.cache.close)
    if partition_id not in state.clients:
        data = build_client(config, partition_id, state.backbone, state.splits, state.cache)
        if get_method(config.method).client_text:  # the base prompts' text features are public: built here
            names = class_split(config, state.splits).base_names
            data = with_base_text(data, prompt_features(state.backbone, names, config.backbone_options.template))
        state.clients[partition_id] = data
    return state.backbone, state.clients[partition_id]


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Handshake: tell the ServerApp which partition this node holds, which base classes are in it, and
    what it computes with (versions and backbone weights: the server refuses a node that differs)."""
    pid, n = node_partition(context.node_config)
    state = node_state(records.experiment_of(msg.content, records.HELLO), n)
    classes, indices = client_partition(state.config, state.splits, pid)
    labels = to_base_index(state.splits.train.labels[indices], classes.base)
    reply = records.hello_reply(pid, n, sorted(set(labels.tolist())), len(indices))
    versions = node_versions(state.config.backbone, context.node_config)
    reply[records.HELLO_VERSIONS] = records.versions_record(versions.as_dict())
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: the method's client step on this node's partition."""
    pid, n = node_partition(context.node_config)
    state = node_state(records.experiment_of(msg.content), n)
    backbone, data = client_data(state, pid)
    task = records.task_from_records(
        msg.content,
        image_lora=backbone.image_lora_state(),
        num_classes=state.num_classes,
        embed_dim=backbone.info.embed_dim,
    )
    config = state.config
    method = get_method(config.method)
    update = method.client_step(backbone, data, task, config, client_seed(config.seed, task.round, pid))
    return Message(records.update_to_records(update), reply_to=msg)
