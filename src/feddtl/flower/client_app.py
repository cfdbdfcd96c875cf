"""The FedDTL ClientApp: one SuperNode is one client partition.

The node's partition comes from its ``node_config`` (``partition-id``, ``num-partitions``); the
experiment's configuration comes with every message from the ServerApp. The node builds only its
own client (same dataset, partitioner and seed as the in-process run) and runs the method's own
``client_step`` with the same per-round seed, so a round here computes what it computes in process.
A node that names its own data (node-config ``data``) trains on those instead, its classes matched onto
the run's class names that every message carries, and in a ``node-local`` run it also evaluates the
global model on its own test images (``evaluate``).

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
from feddtl.config.node_data_config import DATA_KEY, NODE_LOCAL, NodeDataConfig
from feddtl.flower import warm_client
from feddtl.methods import get_method

if TYPE_CHECKING:
    from feddtl.flower.node import NodeData, OwnSource

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


def own_source(config: ExperimentConfig, settings: NodeDataConfig, run_classes: list[str]) -> OwnSource | None:
    """The node's own data (node-config ``data``) for this run, or None: a partition of the run's dataset."""
    if settings.source is None:
        if config.dataset == NODE_LOCAL:
            raise ConfigError(
                f"this run's dataset is {NODE_LOCAL!r}: every SuperNode brings its own data; start this one with "
                f"--node-config '... {DATA_KEY}=\"imagefolder:<path>\"' (or \"hf:<path>\")"
            )
        return None
    from feddtl.flower.node import OwnSource

    return OwnSource(settings.source, tuple(run_classes))


def node_state(experiment_toml: str, num_partitions: int, node_config: UserConfig, run_classes: list[str]) -> NodeState:
    global _state
    settings = NodeDataConfig.from_node_config(node_config)
    # the node's data are in the key: the virtual nodes that one Simulation Engine actor serves may differ
    key = hashlib.sha256("\0".join([experiment_toml, settings.source or "", *run_classes]).encode()).hexdigest()
    if _state is None or _state.key != key:
        from feddtl.flower.node import NodeData, open_node_cache

        config = loads_config(experiment_toml, source="the configuration sent by the ServerApp")
        own = own_source(config, settings, run_classes)
        if _state is not None:
            _state.data.close()
        cache = open_node_cache(NodeCacheConfig.from_node_config(node_config), node_log)
        _state = NodeState(key, config, NodeData(config, cache, own))
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
    """Handshake: tell the ServerApp which partition this node holds, which base classes are in it (with
    their training-image counts; a node with its own data also its test images per class and the classes the
    run does not know), and what it computes with (versions and backbone weights: the server refuses a node
    that differs)."""
    if (reply := warm_client.forward(msg, context)) is not None:
        return reply
    import torch

    from feddtl.flower import records
    from feddtl.flower.versions import node_versions

    pid, n = node_partition(context.node_config)
    content = msg.content
    state = node_state(
        records.experiment_of(content, records.HELLO), n, context.node_config, records.classes_of(content, records.HELLO)
    )
    part = state.data.partition(pid)
    counts = torch.bincount(part.labels, minlength=len(part.base))
    classes = sorted(set(part.labels.tolist()))
    report = records.NodeReport([int(counts[c]) for c in classes])
    if state.data.own is not None:  # what the server logs and writes to nodes.json
        held = state.data.holdout(pid)
        novel = len(state.data.own.run_classes) - len(part.base)
        report.source, report.excluded = state.data.own.source, part.excluded
        report.test_base_counts = torch.bincount(held.base_labels, minlength=len(part.base)).tolist()
        report.test_novel_counts = torch.bincount(held.novel_labels, minlength=novel).tolist()
    reply = records.hello_reply(pid, n, classes, len(part.indices), report)
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
    state = node_state(records.experiment_of(msg.content), n, context.node_config, records.classes_of(msg.content))
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


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A ``node-local`` run's evaluation: the global model on this node's own test images, as per-class
    correct / total counts of Base, Novel and Local (the server pools them over the nodes)."""
    if (reply := warm_client.forward(msg, context)) is not None:
        return reply
    from feddtl.evaluation import evaluate_counts
    from feddtl.flower import eval_records, records

    started = time.perf_counter()
    pid, n = node_partition(context.node_config)
    content = msg.content
    state = node_state(
        records.experiment_of(content, eval_records.EVAL), n, context.node_config,
        records.classes_of(content, eval_records.EVAL),
    )
    if state.data.own is None:
        raise ConfigError("only a SuperNode with its own data (node-config data) evaluates on its node")
    backbone, eval_set = state.data.eval_set(pid)
    num_base = len(state.data.partition(pid).base)
    lora, base_T, novel_T, local_T = eval_records.eval_from_records(
        content, backbone.image_lora_state(), num_base, len(state.data.own.run_classes) - num_base,
        backbone.info.embed_dim,
    )
    if lora:
        backbone.load_image_lora(lora)
    counts = evaluate_counts(backbone, eval_set, base_T, novel_T, state.config.eval.batch_size, local_T)
    node_log(
        f"partition {pid}, evaluation: {int(counts.base.total.sum())} base and {int(counts.novel.total.sum())} novel "
        f"test images in {time.perf_counter() - started:.2f} s"
    )
    return Message(eval_records.counts_to_records(counts), reply_to=msg)
