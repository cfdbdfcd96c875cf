"""The FedDTL ClientApp: one SuperNode is one client partition.

The node's partition comes from its ``node_config`` (``partition-id``, ``num-partitions``); the
experiment's configuration comes with every message from the ServerApp. The node builds only its
own client (same dataset, partitioner and seed as the in-process run) and runs the method's own
``client_step`` with the same per-round seed, so a round here computes what it computes in process.

Flower 1.42 runs every message in a fresh process (``flwr-clientapp``), so what does not change
between messages (the partition, the backbone's derived tensors, the trunk features) is kept in the
node cache on disk (``feddtl.flower.node``; ``cache-dir`` / ``cache-max-mb`` in the node config).
This module imports only what a message needs: no server, benchmark or plotting code, and for a
method whose clients never run the text tower (FedDTL) a lite backbone without it (no transformers).
With the node's warm worker on (``warm-worker``, default true), each handler first hands its message to the
worker (``feddtl.flower.warm_client``), which runs this same ClientApp in a process that outlives messages;
so torch and the modules that import it are imported inside the handlers, never by this module itself.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING

from flwr.app import Context, Message, UserConfig
from flwr.clientapp import ClientApp
from flwr.common import log

from feddtl.config import ConfigError, ExperimentConfig, loads_config
from feddtl.config.node_cache_config import NodeCacheConfig
from feddtl.flower import warm_client
from feddtl.methods import get_method

if TYPE_CHECKING:
    from feddtl.flower.node import NodeData

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


def node_log(line: str) -> None:
    log(INFO, "feddtl node: %s", line)


@dataclass
class NodeState:
    """What a process keeps between the messages it serves: one per process in the Deployment Engine
    (a message each), many in a Simulation Engine actor (possibly of several partitions)."""

    key: str
    config: ExperimentConfig
    data: NodeData


_state: NodeState | None = None


def node_state(experiment_toml: str, num_partitions: int, node_config: UserConfig) -> NodeState:
    global _state
    key = hashlib.sha256(experiment_toml.encode()).hexdigest()
    if _state is None or _state.key != key:
        from feddtl.flower.node import NodeData, open_node_cache

        config = loads_config(experiment_toml, source="the configuration sent by the ServerApp")
        if _state is not None:
            _state.data.close()
        cache = open_node_cache(NodeCacheConfig.from_node_config(node_config), node_log)
        _state = NodeState(key, config, NodeData(config, cache))
    if num_partitions != _state.config.num_clients:
        raise ConfigError(
            f"this SuperNode has {NUM_PARTITIONS}={num_partitions} but the run's config has "
            f"num_clients={_state.config.num_clients}; restart the SuperNodes with "
            f"{NUM_PARTITIONS}={_state.config.num_clients} or change num_clients"
        )
    return _state


def client_data(state: NodeState, partition_id: int):
    """The backbone and this partition's client data, the way the method's client step needs them."""
    config = state.config
    method = get_method(config.method)
    backbone, data = state.data.client(partition_id, text_tower=not method.client_image_only)
    if method.client_text:  # the base prompts' text features are public: built here
        from feddtl.federation import prompt_features
        from feddtl.methods.text_side import with_base_text

        names = state.data.partition(partition_id).base_names
        data = with_base_text(data, prompt_features(backbone, names, config.backbone_options.template))
    return backbone, data


def _event(line: str) -> str:
    """'trunk-<fingerprint>: hit' -> 'trunk hit'."""
    name, _, what = line.partition(": ")
    return f"{name.rsplit('-', 1)[0]} {what}"


@app.lifespan()
def lifespan(context: Context):
    """Before a message: torch's optimizers without their torch._dynamo import (seconds of every fresh
    process's client step; see ``optimizers_without_dynamo``). Not at import: the Simulation Engine's
    driver imports this module too, and it runs the server, which must stay as in process. A message handed
    to the warm worker skips it (it imports torch): the worker's own lifespan runs it, and a message served
    here after all runs it then (``warm_client.forward``)."""
    if not warm_client.warm_path(context.node_config):
        from feddtl.flower.node import optimizers_without_dynamo

        optimizers_without_dynamo()
    yield


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Handshake: tell the ServerApp which partition this node holds, which base classes are in it, and
    what it computes with (versions and backbone weights: the server refuses a node that differs)."""
    if (reply := warm_client.forward(msg, context)) is not None:
        return reply
    from feddtl.flower import records
    from feddtl.flower.versions import node_versions

    pid, n = node_partition(context.node_config)
    state = node_state(records.experiment_of(msg.content, records.HELLO), n, context.node_config)
    part = state.data.partition(pid)
    reply = records.hello_reply(pid, n, sorted(set(part.labels.tolist())), len(part.indices))
    versions = node_versions(state.config.backbone, context.node_config)
    reply[records.HELLO_VERSIONS] = records.versions_record(versions.as_dict())
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: the method's client step on this node's partition."""
    if (reply := warm_client.forward(msg, context)) is not None:
        return reply
    from feddtl.flower import records
    from feddtl.flower.node import peak_rss_mb, process_age_s
    from feddtl.server.clients import client_seed

    started = time.perf_counter()
    age = None if warm_client.IN_WORKER else process_age_s()  # a worker's age says nothing of this message
    pid, n = node_partition(context.node_config)
    state = node_state(records.experiment_of(msg.content), n, context.node_config)
    cache = state.data.cache
    events = len(cache.events) if cache is not None else 0
    backbone, data = client_data(state, pid)
    task = records.task_from_records(
        msg.content,
        image_lora=backbone.image_lora_state(),
        num_classes=len(state.data.partition(pid).base),
        embed_dim=backbone.info.embed_dim,
    )
    config = state.config
    loaded = time.perf_counter()
    update = get_method(config.method).client_step(backbone, data, task, config, client_seed(config.seed, task.round, pid))
    stepped = time.perf_counter()
    where = "off" if cache is None else (", ".join(_event(e) for e in cache.events[events:]) or "in memory")
    before = "" if age is None else f"process start to handler {age:.1f} s, "
    node_log(
        f"partition {pid}, round {task.round}: {before}state {loaded - started:.2f} s (node cache: {where}), "
        f"client step {stepped - loaded:.2f} s, peak RSS {peak_rss_mb():.0f} MiB"
    )
    return Message(records.update_to_records(update), reply_to=msg)
