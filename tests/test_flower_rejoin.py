"""SuperNodeClients against a scripted grid: the handshake's version check, a SuperNode that dies and
rejoins (new node id or its old one), and resume settings. No Flower process is started: the grid
answers each message at once from the fake nodes it holds (the deployment test runs the real thing)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from flwr.app import RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from feddtl.algorithm.messages import ClientTask
from feddtl.config import ConfigError, load_config
from feddtl.evaluation import ClassCounts, EvalCounts
from feddtl.federation import ClassSplit
from feddtl.flower import eval_records, records, server_app
from feddtl.flower.server_app import SuperNodeClients, settings_from_run_config
from feddtl.flower.versions import TEST_FEDDTL_VERSION, local_versions, node_versions
from feddtl.server.checkpoint import load_run_config
from feddtl.server.rundir import RunDir

NUM_CLASSES = 5
CLASSES = {0: [0, 1, 2], 1: [2, 3, 4]}
COUNTS = {0: 12, 1: 14}


@dataclass
class FakeNode:
    partition: int
    versions: dict[str, str]
    answers: bool = True
    """False: takes messages and never replies (a process killed mid-round)."""
    dies: bool = False
    """True: killed when it takes a task, so the SuperLink stops listing it (no heartbeat)."""
    classes: list[int] = field(default_factory=list)
    count: int = 0
    report: records.NodeReport | None = None
    """What its handshake says about its data (None: nothing, as a feddtl from before the report)."""
    counts: EvalCounts | None = None
    """Its answer to an evaluation."""


class FakeGrid:
    """The parts of flwr's Grid that SuperNodeClients uses. Online nodes answer at once; a message to a
    node that is offline gets the SuperLink's NODE_UNAVAILABLE error reply, as flwr 1.42 makes it."""

    def __init__(self) -> None:
        self.nodes: dict[int, FakeNode] = {}
        self.online: set[int] = set()
        self.sent: dict[str, tuple[int, str]] = {}
        """message id -> (destination node, message type)"""
        self.replies: dict[str, object] = {}
        self._ids = itertools.count()

    def add(self, node_id: int, node: FakeNode) -> None:
        self.nodes[node_id] = node
        self.online.add(node_id)

    def get_node_ids(self) -> list[int]:
        return sorted(self.online)

    def push_messages(self, messages) -> list[str]:
        out = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            dst, kind = message.metadata.dst_node_id, message.metadata.message_type
            self.sent[mid] = (dst, kind)
            node = self.nodes.get(dst)
            if node is not None and node.dies and kind == "train":
                self.online.discard(dst)
            if node is not None and dst in self.online and node.answers:
                self.replies[mid] = self._answer(mid, node, kind)
            out.append(mid)
        return out

    def _answer(self, mid: str, node: FakeNode, kind: str) -> SimpleNamespace:
        if kind == "query":
            content = records.hello_reply(node.partition, 2, node.classes or CLASSES[node.partition],
                                          node.count or COUNTS[node.partition], node.report)
            content[records.HELLO_VERSIONS] = records.versions_record(node.versions)
        elif kind == "evaluate":
            assert node.counts is not None, "a node without counts was asked to evaluate"
            content = eval_records.counts_to_records(node.counts)
        else:
            content = RecordDict()  # a stand-in update: these tests read the replies, not the updates
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), content=content,
                               has_error=lambda: False)

    def pull_messages(self, message_ids) -> list[SimpleNamespace]:
        out = []
        for mid in message_ids:
            if mid in self.replies:
                out.append(self.replies.pop(mid))
            elif self.sent[mid][0] not in self.online:
                error = SimpleNamespace(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable")
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), error=error,
                                           has_error=lambda: True))
        return out

    def trains_to(self, node_id: int) -> int:
        return sum(1 for dst, kind in self.sent.values() if dst == node_id and kind == "train")


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch) -> None:
    monkeypatch.setattr(server_app, "POLL_S", 0.01)
    monkeypatch.setattr(server_app, "NODE_SCAN_S", 0.05)
    # flwr's Message() reads the identity of the task that runs it (a ServerApp process sets it)
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _config(*overrides: str):
    return load_config("tiny", ["num_clients=2", "classes_per_client=3", "flower.node_wait_timeout=2",
                                "flower.round_timeout=1", *overrides])


def _fed():
    names = [f"c{i}" for i in range(2 * NUM_CLASSES)]
    return SimpleNamespace(classes=ClassSplit(list(range(NUM_CLASSES)), list(range(NUM_CLASSES, 2 * NUM_CLASSES)), names))


def _task(round_num: int) -> ClientTask:
    return ClientTask(round=round_num, stage="sft", image_lora={}, class_embeddings=torch.zeros(NUM_CLASSES, 4))


@pytest.fixture
def versions() -> dict[str, str]:
    return local_versions(_config().backbone).as_dict()


def _connected(versions, *overrides: str) -> tuple[FakeGrid, SuperNodeClients, list[str]]:
    grid = FakeGrid()
    grid.add(10, FakeNode(0, versions))
    grid.add(11, FakeNode(1, versions))
    lines: list[str] = []
    clients = SuperNodeClients(grid, _config(*overrides), log_fn=lines.append)
    assert clients.connect(_fed()) == ([CLASSES[0], CLASSES[1]], [COUNTS[0], COUNTS[1]])
    return grid, clients, lines


def test_handshake_admits_nodes_that_agree(versions) -> None:
    grid, clients, lines = _connected(versions)
    assert clients.nodes == {0: 10, 1: 11}
    assert any("SuperNodes ready" in line for line in lines)


def test_handshake_refuses_a_node_with_another_feddtl_version(versions) -> None:
    # prepare: node 11 reports another feddtl version (as the TEST_FEDDTL_VERSION node-config hook makes it)
    grid = FakeGrid()
    grid.add(10, FakeNode(0, versions))
    grid.add(11, FakeNode(1, {**versions, "feddtl": "9.9.9"}))
    clients = SuperNodeClients(grid, _config(), log_fn=lambda s: None)
    # execute / assert: the run fails at the handshake, naming the node and the difference
    with pytest.raises(ConfigError, match=r"SuperNode 11 \(partition 1\).*feddtl: \S+ on the server, 9\.9\.9 on the node"):
        clients.connect(_fed())


@pytest.mark.parametrize(
    ("reported", "message"),
    [
        ({"weights": "sha256:0000000000000000"}, "backbone weights: sha256:[0-9a-f]{16} on the server, sha256:0{16} on the node"),
        (None, "feddtl: \\S+ on the server, not reported on the node; torch: "),  # a feddtl from before the check
    ],
)
def test_handshake_refuses_other_weights_and_a_node_that_reports_nothing(versions, reported, message) -> None:
    grid = FakeGrid()
    grid.add(10, FakeNode(0, versions))
    grid.add(11, FakeNode(1, {} if reported is None else {**versions, **reported}))
    clients = SuperNodeClients(grid, _config(), log_fn=lambda s: None)
    with pytest.raises(ConfigError, match=message):
        clients.connect(_fed())


def test_version_mismatch_is_admitted_with_a_warning_when_the_config_allows_it(versions) -> None:
    grid = FakeGrid()
    grid.add(10, FakeNode(0, versions))
    grid.add(11, FakeNode(1, {**versions, "torch": "0.0.1"}))
    lines: list[str] = []
    clients = SuperNodeClients(grid, _config("flower.allow_version_mismatch=true"), log_fn=lines.append)
    clients.connect(_fed())
    assert clients.nodes == {0: 10, 1: 11}
    assert any(line.startswith("WARNING: SuperNode 11 (partition 1) differs") and "torch: " in line for line in lines)


def test_node_versions_test_hook_overrides_only_the_feddtl_version() -> None:
    backbone = _config().backbone
    mine = local_versions(backbone)
    hooked = node_versions(backbone, {"partition-id": 0, "num-partitions": 2, TEST_FEDDTL_VERSION: "9.9.9"})
    assert hooked.feddtl == "9.9.9" and mine.feddtl != "9.9.9"
    assert (hooked.torch, hooked.transformers, hooked.weights) == (mine.torch, mine.transformers, mine.weights)
    assert mine.weights.startswith("sha256:")


def test_a_node_restarted_under_a_new_id_takes_its_partition_over(versions) -> None:
    # prepare: node 11 takes round 1's task and never answers (killed); its restart greets as node 12
    grid, clients, lines = _connected(versions)
    grid.nodes[11].answers = False
    grid.add(12, FakeNode(1, versions))
    # execute: round 1's first attempt, then the robust round's retry of client 1
    clients.dispatch({0: _task(1), 1: _task(1)})
    first = dict(clients.replies)
    clients.dispatch({1: _task(1)})
    # assert: client 1 failed the attempt (its node was replaced), the retry went to node 12
    assert not isinstance(first[0], Exception)
    assert isinstance(first[1], RuntimeError) and "replaced by SuperNode 12" in str(first[1])
    assert not isinstance(clients.replies[1], Exception)
    assert clients.nodes == {0: 10, 1: 12} and grid.trains_to(12) == 1
    assert any("partition 1 rejoined: SuperNode 12 replaces SuperNode 11" in line for line in lines)


def test_a_node_gone_from_the_superlink_is_greeted_again_when_it_returns(versions) -> None:
    # prepare: node 11 is killed mid-round: the SuperLink stops listing it and answers NODE_UNAVAILABLE
    grid, clients, lines = _connected(versions)
    grid.nodes[11].dies = True
    clients.dispatch({0: _task(2), 1: _task(2)})
    assert "Node Unavailable" in str(clients.replies[1]) and 1 not in clients.nodes
    # execute: it restarts under its old id (its key) and the round retries client 1
    grid.nodes[11].dies = False
    grid.online.add(11)
    clients.dispatch({1: _task(2)})
    # assert: a new handshake (two hellos to node 11 in all), then its task
    assert not isinstance(clients.replies[1], Exception) and clients.nodes[1] == 11
    hellos = sum(1 for dst, kind in grid.sent.values() if dst == 11 and kind == "query")
    assert hellos == 2


def test_a_retry_waits_for_the_partition_then_names_why_it_has_no_node(versions) -> None:
    grid, clients, _ = _connected(versions, "flower.node_wait_timeout=0.3")
    grid.online.discard(11)
    clients.dispatch({0: _task(3), 1: _task(3)})
    clients.dispatch({1: _task(3)})  # retry: nobody rejoins within node_wait_timeout
    assert isinstance(clients.replies[1], RuntimeError)
    assert "no SuperNode serves partition 1" in str(clients.replies[1]) and "went offline" in str(clients.replies[1])


def test_a_rejoining_node_with_other_versions_or_data_is_refused_and_named(versions) -> None:
    grid, clients, lines = _connected(versions, "flower.node_wait_timeout=0.5")
    grid.online.discard(11)
    grid.add(12, FakeNode(1, {**versions, "transformers": "1.0.0"}))
    grid.add(13, FakeNode(1, versions, classes=[0, 1], count=99))
    clients.dispatch({0: _task(4), 1: _task(4)})
    clients.dispatch({1: _task(4)})
    assert 1 not in clients.nodes and isinstance(clients.replies[1], RuntimeError)
    assert any("SuperNode 12 (partition 1) differs" in line and "refused" in line for line in lines)
    assert any("SuperNode 13 rejoined for partition 1 with 99 images" in line for line in lines)


def test_run_config_resume_reads_the_run_directory(tmp_path) -> None:
    # prepare: a run directory as a stopped run leaves it
    run = RunDir(tmp_path / "run")
    run.write_config(load_config("tiny", ["rounds=3"]))
    # execute
    settings = settings_from_run_config({"config": "tiny", "resume": str(run.path), "out": "",
                                         "overrides": "robustness.max_round_retries=2 flower.round_timeout=60"}, 7)
    # assert: its config.toml with the operational overrides; the run continues in its own directory
    assert settings.resume and settings.out == str(run.path)
    assert settings.config.rounds == 3 and settings.config.robustness.max_round_retries == 2
    assert settings.config == load_run_config(run.path, ["robustness.max_round_retries=2", "flower.round_timeout=60"])
    with pytest.raises(ConfigError, match="only keys of checkpoint, robustness, faults, flower may change"):
        settings_from_run_config({"resume": str(run.path), "overrides": "rounds=5"}, 7)
    with pytest.raises(ConfigError, match="leave out empty"):
        settings_from_run_config({"resume": str(run.path), "out": str(tmp_path / "elsewhere")}, 7)
    with pytest.raises(ConfigError, match="no config.toml"):
        settings_from_run_config({"resume": str(tmp_path / "nothing")}, 7)


# ----- SuperNodes with their own data --------------------------------------------------------------


def _own(source: str, excluded: list[str], test_base: list[int]) -> records.NodeReport:
    return records.NodeReport([4, 4, 4], source, excluded, test_base, [1] * NUM_CLASSES)


def test_own_data_are_logged_unknown_classes_warned_and_reports_written(versions, tmp_path) -> None:
    # prepare: node 10 brings its own data, with a class the run does not know; node 11 a partition as before
    grid = FakeGrid()
    grid.add(10, FakeNode(0, versions, report=_own("imagefolder:/org0", ["zebra"], [2, 2, 2, 0, 0])))
    grid.add(11, FakeNode(1, versions, report=records.NodeReport([5, 4, 5])))
    lines: list[str] = []
    clients = SuperNodeClients(grid, _config(), log_fn=lines.append)
    # execute
    clients.connect(_fed())
    clients.write_nodes(tmp_path)
    # assert: the server logs the unknown class as a warning; nodes.json holds both reports
    assert any("SuperNode 10 (partition 0) brings its own data imagefolder:/org0: 12 training images "
               "(c0 4, c1 4, c2 4), 6 base and 5 novel test images" in line for line in lines)
    assert "WARNING: SuperNode 10 (partition 0): its classes ['zebra'] are not in the run's class list; excluded " \
           "(their images are not used)" in lines
    nodes = json.loads((tmp_path / server_app.NODES_FILE).read_text())["partitions"]
    assert nodes["0"]["excluded_classes"] == ["zebra"] and nodes["0"]["test_per_class"]["base"]["c1"] == 2
    assert nodes["1"] == {"node": 11, "data": "digits", "train_images": 14, "train_per_class": {"c2": 5, "c3": 4, "c4": 5}}


def test_evaluation_on_the_nodes_pools_their_counts_and_names_a_node_that_did_not_answer(versions) -> None:
    # prepare: both nodes evaluate; node 11 then stops answering
    def counts(correct: int, total: int) -> EvalCounts:
        c = ClassCounts(torch.tensor([correct] + [0] * (NUM_CLASSES - 1)), torch.tensor([total] + [0] * (NUM_CLASSES - 1)))
        return EvalCounts(c, c, c)

    grid, clients, lines = _connected(versions)
    grid.nodes[10].counts, grid.nodes[11].counts = counts(1, 2), counts(6, 6)
    T = torch.zeros(NUM_CLASSES, 4)
    clients.fed.backbone = SimpleNamespace(image_lora_state=dict)
    # execute
    both = clients.evaluate(T, T, None)
    grid.nodes[11].answers = False
    one = clients.evaluate(T, T, None)
    # assert: pooled by count (7 of 8); then node 0's alone, with node 1 named
    assert both["evaluation"] == "nodes" and both["base_acc"] == pytest.approx(87.5)
    assert both["local_acc_per_client"] == [50.0, 100.0] and "eval_missing" not in both
    assert one["base_acc"] == pytest.approx(50.0) and one["eval_missing"][0]["client"] == 1
    assert any(line.startswith("WARNING: partition 1 left out of the evaluation") for line in lines)
