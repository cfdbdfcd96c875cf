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
``runs/flower-<run id>`` under the ServerApp's working directory), ``resume`` (a run directory to continue
from its checkpoint, after the ServerApp or the SuperLink died; empty: a new run).

SuperNodes are found, and re-found after a restart, by a handshake that also compares their versions
and backbone weights with the server's (``SuperNodeClients``; docs/flower.md). A node may bring its own
data (node-config ``data``): its handshake reports its per-class counts and the classes the run does not
know (logged as a warning), all written to ``nodes.json`` in the run directory. In a ``node-local`` run the
server holds no data at all and the nodes evaluate (``SuperNodeClients.evaluate``).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MessageType, RecordDict, UserConfig
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.config import ConfigError, ExperimentConfig, load_config, to_toml
from feddtl.config.node_data_config import NODE_LOCAL
from feddtl.evaluation import EvalCounts, pool_counts
from feddtl.federation import Federation, build_federation
from feddtl.flower import eval_records, records
from feddtl.flower.versions import Versions, differences, local_versions
from feddtl.server.checkpoint import load_run_config
from feddtl.server.experiment import run_experiment
from feddtl.server.robust import RoundFailed
from feddtl.server.rundir import atomic_write_text, read_results

NODES_FILE = "nodes.json"
"""In the run directory: what each partition's SuperNode reported in its handshake at the start of the run."""
POLL_S = 0.2
"""Pull interval while waiting for replies (Grid.send_and_receive sleeps 3 s between pulls)."""

app = ServerApp()


def flower_log(line: str) -> None:
    """Log through Flower's logger, so lines show in `flwr run --stream` and `flwr log`."""
    log(INFO, "%s", line)


RUN_CONFIG_KEYS = ("config", "overrides", "out", "resume")


@dataclass(frozen=True)
class RunSettings:
    """What the Flower run config asks the ServerApp to do."""

    config: ExperimentConfig
    out: str
    """The run directory (on the ServerApp's machine)."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint (run-config ``resume``)."""


def settings_from_run_config(run_config: UserConfig, run_id: int) -> RunSettings:
    """The validated experiment config, run directory and mode from the Flower run config.

    ``resume = "<run dir>"`` continues that run with its own config.toml (like ``feddtl run --resume``):
    ``config`` is not read then, ``out`` must be empty or the same directory, and ``overrides`` may change
    only the operational sections (checkpoint, robustness, faults, flower).
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown Flower run-config keys {unknown}; allowed: {sorted(RUN_CONFIG_KEYS)}")
    values = {key: run_config.get(key, "") for key in RUN_CONFIG_KEYS}
    for key, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(f"run-config {key} must be a string, got {value!r}")
    name, overrides, out, resume = (str(values[key]) for key in RUN_CONFIG_KEYS)
    try:
        items = shlex.split(overrides)
    except ValueError as exc:
        raise ConfigError(f"run-config overrides={overrides!r}: {exc}") from None
    if resume:
        if out and Path(out).resolve() != Path(resume).resolve():
            raise ConfigError(f"run-config out={out!r} with resume={resume!r}: leave out empty (a resumed run "
                              "continues in its own directory)")
        return RunSettings(load_run_config(resume, items), resume, resume=True)
    return RunSettings(load_config(name or None, items), out or f"runs/flower-{run_id}")


GONE = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
"""Error codes of the replies the SuperLink makes up itself: the node stopped sending heartbeats (it died or
lost its network), or the message or its reply expired. The node is gone, not merely failing."""

NODE_SCAN_S = 2.0
"""While the server waits for replies, how often it looks for SuperNodes it has not greeted yet: a node
restarted mid-round (a new node id) is greeted, and takes its partition over, without waiting for the
SuperLink to declare the old node gone (it does so 2 x 30 s after the node's last heartbeat)."""


class SuperNodeClients:
    """Runs client steps on SuperNodes: partition k's on the node whose node_config says partition-id=k.

    Nodes are found by a handshake (``hello``): at the start (``connect``) and whenever a node the server
    has not greeted shows up, which is how a restarted SuperNode rejoins (with a new node id, or with its
    old one once the SuperLink saw it go). A partition's node that dies mid-round is noticed when its
    replacement greets the server, when the SuperLink reports it gone (no heartbeat), or at
    ``flower.round_timeout``; its client then fails that attempt, and the robust round completes the round
    through ``robustness.min_fit_fraction`` or asks again (``max_round_retries``): a retry waits up to
    ``flower.node_wait_timeout`` for the partition's node to rejoin. Each handshake reply carries the node's
    versions (``flower.versions``): a node that differs from the server is refused, or admitted with a
    warning when ``flower.allow_version_mismatch`` is set.
    """

    def __init__(self, grid: Grid, config: ExperimentConfig, log_fn: Callable[[str], None] = flower_log) -> None:
        self.grid = grid
        self.config = config
        self.log_fn = log_fn
        self.experiment = to_toml(config)
        self.nodes: dict[int, int] = {}
        """partition id -> the Flower node id serving it"""
        self.partitions: dict[int, tuple[list[int], int]] = {}
        """partition id -> (its base classes, its training-image count), as the handshake at connect said"""
        self.reports: dict[int, dict[str, Any]] = {}
        """partition id -> its node's data report (``nodes.json``), from its latest handshake"""
        self.classes: list[str] = []
        """The run's class names, sent with every message (a node with its own data matches its classes onto them)"""
        self.greeted: dict[int, int | None] = {}
        """node id -> the partition it serves (None: refused or replaced) for every node that answered a
        handshake; a node that leaves the SuperLink's online list is forgotten, and greeted again if it returns"""
        self.hellos: dict[str, int] = {}
        """handshakes in flight: message id -> node id"""
        self.sent: dict[str, tuple[int, int]] = {}
        """tasks of the current attempt in flight: message id -> (partition, node id)"""
        self.lost: dict[int, str] = {}
        """partition id -> why it has no node now (its node went away or was refused)"""
        self.running = False
        """False during connect (any handshake problem fails the run), True after (it is logged)"""
        self.round = 0
        self.versions: Versions | None = None
        self.fed: Federation | None = None
        self.replies: dict[int, Message | Exception] = {}
        """client id -> its reply to the last dispatch, or why there is none"""

    # ----- handshakes -----------------------------------------------------------------------------
    def connect(self, fed: Federation) -> tuple[list[list[int]], list[int]]:
        """Wait for one SuperNode per partition; return each partition's base classes (for local accuracy
        and update validation) and training-image count (the bound on its aggregation weight).

        Nodes may connect after the run starts (``get_node_ids`` is empty at first), so this greets each
        newly seen node until all partitions are known or ``flower.node_wait_timeout`` passes. A node that
        fails its handshake, disagrees with the run (num-partitions, versions) or holds a partition that
        another node holds fails the run: at the start, that is a deployment to fix.
        """
        self.fed = fed
        self.classes = list(fed.classes.classnames)
        self.versions = local_versions(self.config.backbone)
        k, timeout = self.config.num_clients, self.config.flower.node_wait_timeout
        self._pump(lambda: len(self.nodes) == k, time.monotonic() + timeout)
        if len(self.nodes) < k:
            missing = sorted(set(range(k)) - set(self.nodes))
            raise TimeoutError(
                f"after {timeout:.0f} s (flower.node_wait_timeout) no SuperNode answered for partitions {missing} "
                f"of {k}; start one flower-supernode per partition with --node-config "
                f"'partition-id=K num-partitions={k}' (Simulation Engine: num-supernodes={k})"
            )
        self.running = True
        self.log_fn(
            "SuperNodes ready: "
            + ", ".join(f"partition {p} = node {self.nodes[p]} ({self.partitions[p][1]} images)" for p in sorted(self.nodes))
        )
        return [self.partitions[p][0] for p in range(k)], [self.partitions[p][1] for p in range(k)]

    def _scan(self) -> None:
        """Forget nodes that left the SuperLink's online list (their partitions are lost), greet new ones."""
        online = set(self.grid.get_node_ids())
        for node in [n for n in self.greeted if n not in online]:
            partition = self.greeted.pop(node)
            if partition is not None and self.nodes.get(partition) == node:
                self._lose(partition, f"its SuperNode {node} went offline")
        asked = set(self.hellos.values())
        new = sorted(n for n in online if n not in self.greeted and n not in asked)
        if new:
            query = records.hello_query(self.experiment, self.classes)
            messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            self.hellos.update(zip(self.grid.push_messages(messages), new))

    def _lose(self, partition: int, why: str) -> None:
        """``partition`` has no node until one greets the server again; its node, if still online, is greeted
        again at the next scan (a node restarted under its old id must say again who it is)."""
        node = self.nodes.pop(partition, None)
        if node is not None:
            self.greeted.pop(node, None)
        self.lost[partition] = why
        if self.running:
            self.log_fn(f"partition {partition} lost: {why}; waiting for a SuperNode to rejoin for it")

    def _refuse(
        self, node: int, problem: str, error: type[Exception] = ConfigError, partition: int | None = None
    ) -> None:
        """At connect: fail the run with ``problem``. Later: log it, leave the node unused (until it goes
        offline and returns) and, if it claimed a partition that has no node, say why in that client's failure."""
        self.greeted[node] = None
        if not self.running:
            raise error(problem)
        self.log_fn(f"WARNING: {problem}")
        if partition is not None and partition not in self.nodes:
            self.lost[partition] = problem

    def _on_hello(self, node: int, reply: Message) -> None:
        """Take a handshake reply: admit the node for its partition, or refuse it."""
        if reply.has_error():
            if reply.error.code in GONE:  # it went away before answering; if it returns, it is greeted again
                return
            return self._refuse(node, f"SuperNode {node} failed the handshake: {reply.error.reason}", RuntimeError)
        k = self.config.num_clients
        assert self.fed is not None and self.versions is not None
        split = self.fed.classes
        try:
            pid, n, classes, count = records.parse_hello_reply(reply.content, len(split.base))
            theirs = Versions.from_dict(records.hello_versions(reply.content))
            report = records.hello_report(reply.content, len(split.base), len(split.novel))
        except records.RecordError as exc:
            return self._refuse(node, f"SuperNode {node} sent a malformed handshake reply: {exc}")
        if n != k:
            return self._refuse(node, f"SuperNode {node} has num-partitions={n}, the config has num_clients={k}")
        if not 0 <= pid < k:
            return self._refuse(node, f"SuperNode {node} has partition-id={pid}, outside [0, {k})")
        if diff := differences(self.versions, theirs):
            text = f"SuperNode {node} (partition {pid}) differs from the server: {'; '.join(diff)}"
            if not self.config.flower.allow_version_mismatch:
                return self._refuse(
                    node,
                    f"{text}. It is refused: it would compute different updates. Install the server's versions "
                    "and weights on the node, or set flower.allow_version_mismatch = true to admit it with a warning",
                    partition=pid,
                )
            self.log_fn(f"WARNING: {text}; admitted (flower.allow_version_mismatch = true)")
        if self.running and (classes, count) != self.partitions[pid]:
            return self._refuse(
                node,
                f"SuperNode {node} rejoined for partition {pid} with {count} images of classes {classes}, but the "
                f"partition had {self.partitions[pid][1]} images of classes {self.partitions[pid][0]}: another dataset "
                "or config; refused",
                partition=pid,
            )
        old = self.nodes.get(pid)
        if old is not None and old != node:
            if not self.running:
                raise ConfigError(f"SuperNodes {old} and {node} both hold partition-id={pid}")
            # the newest node to claim a partition serves it: the usual case is a node restarted mid-run
            # under a new node id while the SuperLink still lists the dead one
            self.greeted[old] = None
            for mid, (p, _) in list(self.sent.items()):
                if p == pid:
                    del self.sent[mid]
                    self.replies[pid] = RuntimeError(
                        f"SuperNode {old} was replaced by SuperNode {node} (partition {pid} rejoined) before it replied"
                    )
            self.log_fn(f"partition {pid} rejoined: SuperNode {node} replaces SuperNode {old}")
        elif self.running and old is None:
            self.log_fn(f"partition {pid} rejoined on SuperNode {node}")
        self.nodes[pid] = node
        self.greeted[node] = pid
        self.lost.pop(pid, None)
        if not self.running:
            self.partitions[pid] = (classes, count)
        self.reports[pid] = self._report(node, pid, classes, count, report)

    def _report(
        self, node: int, pid: int, classes: list[int], count: int, report: records.NodeReport | None
    ) -> dict[str, Any]:
        """The node's entry of nodes.json; a node with its own data is logged, and the classes the run does not
        know with a warning (the node left them out)."""
        split = self.fed.classes if self.fed is not None else None
        assert split is not None
        base = split.base_names
        entry: dict[str, Any] = {"node": node, "data": self.config.dataset, "train_images": count}
        if report is None:
            return entry
        entry["train_per_class"] = {base[c]: n for c, n in zip(classes, report.class_counts)}
        if report.source is None:
            return entry
        test_base = dict(zip(base, report.test_base_counts))
        test_novel = dict(zip(split.novel_names, report.test_novel_counts))
        entry |= {
            "data": report.source, "test_per_class": {"base": test_base, "novel": test_novel},
            "excluded_classes": report.excluded,
        }
        shown = ", ".join(f"{name} {n}" for name, n in entry["train_per_class"].items())
        self.log_fn(
            f"SuperNode {node} (partition {pid}) brings its own data {report.source}: {count} training images "
            f"({shown}), {sum(test_base.values())} base and {sum(test_novel.values())} novel test images"
        )
        if report.excluded:
            self.log_fn(
                f"WARNING: SuperNode {node} (partition {pid}): its classes {report.excluded} are not in the run's "
                f"class list; excluded (their images are not used)"
            )
        return entry

    def write_nodes(self, run_dir: Path) -> None:
        """``nodes.json``: each partition's node and data report, as the handshakes at connect said."""
        body = {"partitions": {str(p): self.reports[p] for p in sorted(self.reports)}}
        atomic_write_text(run_dir / NODES_FILE, json.dumps(body, indent=2) + "\n")

    def _on_task_reply(self, partition: int, node: int, reply: Message) -> None:
        if not reply.has_error():
            self.replies[partition] = reply
            return
        self.replies[partition] = RuntimeError(f"SuperNode {node} failed: {reply.error.reason}")
        if reply.error.code in GONE and self.nodes.get(partition) == node:
            self._lose(partition, f"its SuperNode {node} is gone ({reply.error.reason})")

    def _pump(self, done: Callable[[], bool], deadline: float) -> None:
        """Pull the replies of the handshakes and tasks in flight, and greet new nodes every ``NODE_SCAN_S``,
        until ``done()`` or ``deadline`` (time.monotonic)."""
        next_scan = time.monotonic()
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_scan:
                self._scan()
                next_scan = now + NODE_SCAN_S
            waiting = set(self.hellos) | set(self.sent)
            for reply in self.grid.pull_messages(waiting) if waiting else ():
                mid = reply.metadata.reply_to_message_id
                if mid in self.hellos:
                    self._on_hello(self.hellos.pop(mid), reply)
                elif mid in self.sent:
                    partition, node = self.sent.pop(mid)
                    self._on_task_reply(partition, node, reply)
            if not done():
                time.sleep(POLL_S)

    # ----- the ClientRunner protocol --------------------------------------------------------------
    def dispatch(self, tasks: dict[int, ClientTask]) -> None:
        """Send each client its task (``tasks[k]``) on its SuperNode, all at once; keep each reply (or why
        there is none). A task shared by several clients is encoded once. A retry (a second dispatch in
        one round) first waits up to ``flower.node_wait_timeout`` for lost partitions' nodes to rejoin."""
        if self.fed is None:
            raise RuntimeError("SuperNodeClients.connect must run before the first round")
        round_num = next(iter(tasks.values())).round if tasks else self.round
        retry, self.round = round_num == self.round, round_num
        self._scan()
        if retry and any(k not in self.nodes for k in tasks):
            self._pump(lambda: all(k in self.nodes for k in tasks), time.monotonic() + self.config.flower.node_wait_timeout)
        encoded: dict[int, RecordDict] = {}

        def content(task: ClientTask) -> RecordDict:
            if id(task) not in encoded:
                encoded[id(task)] = records.task_to_records(task, self.experiment, self.classes)
            return encoded[id(task)]

        self._exchange({k: content(tasks[k]) for k in tasks}, MessageType.TRAIN, round_num)

    def _exchange(self, contents: dict[int, RecordDict], message_type: str, round_num: int) -> None:
        """Send ``contents[k]`` to partition k's SuperNode, all at once, and wait up to ``flower.round_timeout``:
        ``replies[k]`` is then its reply, or why there is none."""
        self.replies = {}
        asked = [k for k in contents if k in self.nodes]
        for k in contents:
            if k not in self.nodes:
                self.replies[k] = RuntimeError(f"no SuperNode serves partition {k}: {self.lost.get(k) or 'none joined'}")
        messages = [
            Message(contents[k], dst_node_id=self.nodes[k], message_type=message_type, group_id=str(round_num))
            for k in asked
        ]
        self.sent = {mid: (k, self.nodes[k]) for mid, k in zip(self.grid.push_messages(messages), asked)}
        timeout = self.config.flower.round_timeout
        self._pump(lambda: not self.sent, time.monotonic() + timeout)
        for partition, node in self.sent.values():
            self.replies[partition] = TimeoutError(f"no reply within {timeout:g} s (flower.round_timeout)")
            if self.nodes.get(partition) == node:
                self._lose(partition, f"its SuperNode {node} did not reply within {timeout:g} s")
        self.sent = {}

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
        """Nothing to do: a reply that arrives after the server gave up is never pulled."""

    # ----- evaluation on the nodes (a node-local run: the server holds no test images) ----------------
    def evaluate(self, base_T: torch.Tensor, novel_T: torch.Tensor, client_T: list[torch.Tensor] | None) -> dict[str, Any]:
        """The model loaded in the server's backbone, evaluated by every partition's SuperNode on its own test
        images; their per-class counts pooled (``evaluation.pool_counts``). A node that does not answer is
        left out, with a warning and its reason under ``eval_missing``; none answering fails the run."""
        if self.fed is None:
            raise RuntimeError("SuperNodeClients.connect must run before an evaluation")
        split, k = self.fed.classes, self.config.num_clients
        self._scan()
        lora = self.fed.backbone.image_lora_state()
        shared = None if client_T is not None else eval_records.eval_to_records(
            self.experiment, self.classes, self.round, lora, base_T, novel_T
        )
        contents = {
            p: shared if shared is not None else eval_records.eval_to_records(
                self.experiment, self.classes, self.round, lora, base_T, novel_T, client_T[p]  # type: ignore[index]
            )
            for p in range(k)
        }
        self._exchange(contents, MessageType.EVALUATE, self.round)
        counts: dict[int, EvalCounts] = {}
        missing: dict[int, str] = {}
        for p in range(k):
            reply = self.replies.pop(p, None)
            if reply is None or isinstance(reply, Exception):
                missing[p] = str(reply or "no reply")
                continue
            try:
                counts[p] = eval_records.counts_from_records(reply.content, len(split.base), len(split.novel))
            except records.RecordError as exc:
                missing[p] = f"malformed evaluation reply: {exc}"
        if not counts:
            raise RuntimeError(f"no SuperNode evaluated the model (round {self.round}): {missing}")
        for p, why in missing.items():
            self.log_fn(f"WARNING: partition {p} left out of the evaluation of round {self.round}: {why}")
        out = pool_counts(counts, k, split.base_names, split.novel_names)
        if missing:
            out["eval_missing"] = [{"client": p, "reason": why} for p, why in missing.items()]
        return out


def engine_name(grid: Grid) -> str:
    # The Simulation Engine hands the ServerApp an in-memory grid; the Deployment Engine an HTTP one.
    return "flower-sim" if type(grid).__name__ == "InMemoryGrid" else "flower-deployment"


def serve(
    grid: Grid,
    config: ExperimentConfig,
    out_dir: str,
    engine: str | None = None,
    log_fn: Callable[[str], None] = flower_log,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one experiment with its clients on ``grid``'s SuperNodes; returns results.json's content.

    ``resume``: continue the run in ``out_dir`` from its checkpoint (``config``: its config.toml, see
    checkpoint.load_run_config). A finished run is reported and left as it is, and no SuperNode is asked.
    """
    if resume and (finished := read_results(out_dir)) is not None:
        log_fn(
            f"{out_dir} is finished ({finished.get('method')}, {finished.get('rounds')} rounds, engine "
            f"{finished.get('engine')}): nothing to resume, nothing changed"
        )
        return finished
    clients = SuperNodeClients(grid, config, log_fn)

    def build(config: ExperimentConfig, log_fn: Callable[[str], None], run_dir: Path | None = None) -> Federation:
        fed = build_federation(config, log_fn=log_fn, run_dir=run_dir, with_clients=False)
        fed.eval_set.client_classes, fed.client_sizes = clients.connect(fed)
        if config.dataset == NODE_LOCAL:  # no test image here: the nodes evaluate on theirs
            fed.evaluator = clients.evaluate
        if run_dir is not None:
            clients.write_nodes(Path(run_dir))
        return fed

    what = "resuming" if resume else "->"
    log_fn(f"FedDTL ServerApp: {config.method} on {config.dataset}, {config.num_clients} clients {what} {out_dir}")
    try:
        results = run_experiment(
            config, out_dir, progress=False, log_fn=log_fn, build=build, remote_clients=clients,
            engine=engine or engine_name(grid), resume=resume,
        )
    except RoundFailed as exc:
        log_fn(
            f"{exc}. The run stopped with a checkpoint after round {exc.round - 1}; continue it with "
            f"`flwr run <app> <federation> --run-config \"resume='{out_dir}'\"` (overrides may change "
            "robustness.*, faults.*, checkpoint.*, flower.*)"
        )
        raise
    log_fn(
        f"done: Base {results['base_acc']:.2f}  Novel {results['novel_acc']:.2f}  HM {results['hm']:.2f}  "
        f"Local {results['local_acc']:.2f}  [{results['wall_s']:.0f} s] -> {out_dir}"
    )
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = settings_from_run_config(context.run_config, context.run_id)
    serve(grid, settings.config, settings.out, resume=settings.resume)
