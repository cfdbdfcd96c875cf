"""The FedDTL ServerApp: the engine-neutral server loop, with the client steps run on SuperNodes.

The server side is ``feddtl.server.experiment.run_experiment``, unchanged: the same Method makes
each round's task, the same robust round (server.robust: validation, retries, min_fit_fraction) collects
the updates, which are aggregated in partition order (so the floating-point sums are the in-process
ones); the server runs its own text-LoRA alignment step, evaluates and writes the same run directory.
Only two things differ: the server builds no client data (``with_clients=False``), and a
``SuperNodeClients`` runner sends each attempt's task to the asked partitions' SuperNodes at once.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run --run-config``):
``config`` (preset name or TOML path on the SuperLink's machine), ``overrides`` (``--set``-style
``key=value`` items separated by spaces; quote values with spaces), ``out`` (run directory; empty:
``runs/flower-<run id>`` under the ServerApp's working directory).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict, UserConfig
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.config import ConfigError, ExperimentConfig, load_config, to_toml
from feddtl.federation import Federation, build_federation
from feddtl.flower import records
from feddtl.server.experiment import run_experiment

POLL_S = 0.2
"""Pull interval while waiting for replies (Grid.send_and_receive sleeps 3 s between pulls)."""

app = ServerApp()


def flower_log(line: str) -> None:
    """Log through Flower's logger, so lines show in `flwr run --stream` and `flwr log`."""
    log(INFO, "%s", line)


def settings_from_run_config(run_config: UserConfig, run_id: int) -> tuple[ExperimentConfig, str]:
    """(validated experiment config, run directory) from the Flower run config."""
    allowed = {"config", "overrides", "out"}
    unknown = sorted(set(run_config) - allowed)
    if unknown:
        raise ConfigError(f"unknown Flower run-config keys {unknown}; allowed: {sorted(allowed)}")
    name = run_config.get("config", "")
    overrides = run_config.get("overrides", "")
    out = run_config.get("out", "")
    for key, value in (("config", name), ("overrides", overrides), ("out", out)):
        if not isinstance(value, str):
            raise ConfigError(f"run-config {key} must be a string, got {value!r}")
    try:
        items = shlex.split(str(overrides))
    except ValueError as exc:
        raise ConfigError(f"run-config overrides={overrides!r}: {exc}") from None
    config = load_config(str(name) or None, items)
    return config, str(out) or f"runs/flower-{run_id}"


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if pending:
            time.sleep(POLL_S)
    return replies


class SuperNodeClients:
    """Runs client steps on SuperNodes: partition k's on the node whose node_config says partition-id=k."""

    def __init__(self, grid: Grid, config: ExperimentConfig, log_fn: Callable[[str], None] = flower_log) -> None:
        self.grid = grid
        self.config = config
        self.log_fn = log_fn
        self.experiment = to_toml(config)
        self.nodes: dict[int, int] = {}
        """partition id -> Flower node id"""
        self.fed: Federation | None = None
        self.replies: dict[int, Message | Exception] = {}
        """client id -> its reply to the last dispatch, or why there is none"""

    def connect(self, fed: Federation) -> tuple[list[list[int]], list[int]]:
        """Wait for one SuperNode per partition; return each partition's base classes (for local accuracy
        and update validation) and training-image count (the bound on its aggregation weight).

        Nodes may connect after the run starts (``get_node_ids`` is empty at first), so this asks each
        newly seen node which partition it holds until all are known or ``flower.node_wait_timeout`` passes.
        """
        self.fed = fed
        k, timeout = self.config.num_clients, self.config.flower.node_wait_timeout
        num_classes = len(fed.classes.base)
        deadline = time.monotonic() + timeout
        found: dict[int, tuple[int, list[int], int]] = {}
        asked: set[int] = set()
        while len(found) < k:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(k)) - set(found))
                raise TimeoutError(
                    f"after {timeout:.0f} s (flower.node_wait_timeout) no SuperNode answered for partitions {missing} "
                    f"of {k}; start one flower-supernode per partition with --node-config "
                    f"'partition-id=K num-partitions={k}' (Simulation Engine: num-supernodes={k})"
                )
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if not new:
                time.sleep(min(1.0, remaining))
                continue
            asked.update(new)
            query = records.hello_query(self.experiment)
            messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in exchange(self.grid, messages, remaining):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    raise RuntimeError(f"SuperNode {node} failed the handshake: {reply.error.reason}")
                pid, n, classes, count = records.parse_hello_reply(reply.content, num_classes)
                if n != k:
                    raise ConfigError(f"SuperNode {node} has num-partitions={n}, the config has num_clients={k}")
                if pid in found:
                    raise ConfigError(f"SuperNodes {found[pid][0]} and {node} both hold partition-id={pid}")
                found[pid] = (node, classes, count)
        self.nodes = {pid: found[pid][0] for pid in sorted(found)}
        self.log_fn(
            "SuperNodes ready: "
            + ", ".join(f"partition {p} = node {found[p][0]} ({found[p][2]} images)" for p in sorted(found))
        )
        return [found[pid][1] for pid in range(k)], [found[pid][2] for pid in range(k)]

    def dispatch(self, tasks: dict[int, ClientTask]) -> None:
        """Send each client its task (``tasks[k]``) on its SuperNode, all at once; keep each reply (or why
        there is none). A task shared by several clients is encoded once."""
        if self.fed is None:
            raise RuntimeError("SuperNodeClients.connect must run before the first round")
        encoded: dict[int, RecordDict] = {}

        def content(task: ClientTask) -> RecordDict:
            if id(task) not in encoded:
                encoded[id(task)] = records.task_to_records(task, self.experiment)
            return encoded[id(task)]

        messages = [
            Message(content(task), dst_node_id=self.nodes[k], message_type=MessageType.TRAIN, group_id=str(task.round))
            for k, task in tasks.items()
        ]
        timeout = self.config.flower.round_timeout
        by_node = {r.metadata.src_node_id: r for r in exchange(self.grid, messages, timeout)}
        self.replies = {}
        for k in tasks:
            reply = by_node.get(self.nodes[k])
            if reply is None:
                self.replies[k] = TimeoutError(f"no reply within {timeout:g} s (flower.round_timeout)")
            elif reply.has_error():
                self.replies[k] = RuntimeError(f"SuperNode {self.nodes[k]} failed: {reply.error.reason}")
            else:
                self.replies[k] = reply

    def step(self, task: ClientTask, client_id: int) -> ClientUpdate:
        """Client ``client_id``'s update from the last dispatch, decoded and checked at the boundary
        (the robust round then validates it against the round's UpdateSpec, as in process)."""
        reply = self.replies.pop(client_id, None)
        if reply is None:
            raise RuntimeError(f"client {client_id} was not asked in this attempt")
        if isinstance(reply, Exception):
            raise reply
        assert self.fed is not None
        backbone = self.fed.backbone
        return records.update_from_records(
            reply.content,
            image_lora=task.image_lora,
            num_classes=len(self.fed.classes.base),
            embed_dim=backbone.info.embed_dim,
        )

    def cancel(self, client_id: int) -> None:
        """Nothing to do: a reply that arrives after the server gave up is dropped with the next dispatch."""


def engine_name(grid: Grid) -> str:
    # The Simulation Engine hands the ServerApp an in-memory grid; the Deployment Engine an HTTP one.
    return "flower-sim" if type(grid).__name__ == "InMemoryGrid" else "flower-deployment"


def serve(
    grid: Grid,
    config: ExperimentConfig,
    out_dir: str,
    engine: str | None = None,
    log_fn: Callable[[str], None] = flower_log,
) -> dict[str, Any]:
    """Run one experiment with its clients on ``grid``'s SuperNodes; returns results.json's content."""
    clients = SuperNodeClients(grid, config, log_fn)

    def build(config: ExperimentConfig, log_fn: Callable[[str], None], run_dir: Path | None = None) -> Federation:
        fed = build_federation(config, log_fn=log_fn, run_dir=run_dir, with_clients=False)
        fed.eval_set.client_classes, fed.client_sizes = clients.connect(fed)
        return fed

    log_fn(f"FedDTL ServerApp: {config.method} on {config.dataset}, {config.num_clients} clients -> {out_dir}")
    results = run_experiment(
        config, out_dir, progress=False, log_fn=log_fn, build=build, remote_clients=clients,
        engine=engine or engine_name(grid),
    )
    log_fn(
        f"done: Base {results['base_acc']:.2f}  Novel {results['novel_acc']:.2f}  HM {results['hm']:.2f}  "
        f"Local {results['local_acc']:.2f}  [{results['wall_s']:.0f} s] -> {out_dir}"
    )
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, out_dir = settings_from_run_config(context.run_config, context.run_id)
    serve(grid, config, out_dir)
