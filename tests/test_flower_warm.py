"""A SuperNode's warm worker (feddtl.flower.warm_worker / warm_client): it serves the ClientApp's messages with
the numbers the ClientApp computes itself, one worker per node is reused across messages, a ClientApp process on
the warm path never imports torch, and every way the worker can fail leaves the message served in process.

The ClientApp's side runs in this process (its handlers, with ``per_message_process`` patched true) and the
worker's SuperNode is this process, so no worker outlives the test session; each test stops its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.logger import FLOWER_LOGGER
from flwr.common.serde import context_to_proto, message_to_proto, recorddict_to_proto

import feddtl
import feddtl.flower.node as node_module
from feddtl.algorithm.messages import ClientTask
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import ConfigError, load_config, to_toml
from feddtl.config.warm_worker_config import WarmWorkerConfig
from feddtl.flower import client_app, records, warm_client
from feddtl.flower.warm_protocol import (
    FOLDER_NAME,
    WarmError,
    process_start,
    running_workers,
    stop_workers,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"
ME = (os.getpid(), process_start(os.getpid()) or 0)
"""The workers' SuperNode: this test process."""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32)
    return load_config("tiny", ["num_clients=2", "classes_per_client=3", f"backbone='hf-clip:{path}'"])


@pytest.fixture(scope="module")
def shapes(config, tmp_path_factory):
    """(image LoRA spec, base classes, embedding size) of partition 0, from an in-process node state."""
    folder = tmp_path_factory.mktemp("shapes")
    node_config = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(folder)}
    state = client_app.node_state(to_toml(config), 2, node_config, [])  # no run classes: the run's own dataset
    backbone, _ = client_app.client_data(state, 0)
    return backbone.image_lora_state(), len(state.data.partition(0).base), backbone.info.embed_dim


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node config with its own cache folder; this process plays the node's flwr-clientapp process, whose
    SuperNode is this process too. Workers left running are stopped at the end."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker inherits it: the thread count of this process
    monkeypatch.setattr(warm_client, "per_message_process", lambda: True)
    monkeypatch.setattr(warm_client, "node_process", lambda: ME)
    # the fallback readies this process as a fresh one (optimizers without dynamo): not the test session
    monkeypatch.setattr(node_module, "optimizers_without_dynamo", lambda: True)
    yield {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "cache")}
    stop_workers(tmp_path / "cache")
    for pid in running_workers(tmp_path):
        os.kill(pid, signal.SIGTERM)
    _wait(lambda: not running_workers(tmp_path), 10, "the test's workers to exit")


@pytest.fixture
def flower_log():
    """The Flower log lines of the test (what a SuperNode's log would show)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    FLOWER_LOGGER.addHandler(handler)
    yield lines
    FLOWER_LOGGER.removeHandler(handler)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def received(content: RecordDict, message_type: str, group: str = "") -> Message:
    """A message as a ClientApp process receives it."""
    metadata = Metadata(
        run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id=group, created_at=time.time(), ttl=3600.0, message_type=message_type,
    )
    return make_message(metadata, content)


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def hello(config, node_config: dict) -> Message:
    return client_app.hello(received(records.hello_query(to_toml(config)), "query"), context(node_config))


def train_message(config, shapes, round_num: int) -> Message:
    lora, num_classes, dim = shapes
    g = torch.Generator().manual_seed(round_num)
    task = ClientTask(
        round=round_num, stage="sft",
        image_lora={k: torch.randn(v.shape, generator=g) * 0.01 for k, v in lora.items()},
        class_embeddings=torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=-1),
    )
    return received(records.task_to_records(task, to_toml(config)), "train", str(round_num))


def wire(reply: Message) -> bytes:
    """A reply's content as Flower sends it: equal bytes, equal numbers."""
    return recorddict_to_proto(reply.content).SerializeToString()


def served_by(lines: list[str]) -> list[int]:
    return [int(line.split("warm worker pid ")[1].split()[0]) for line in lines if " served the " in line]


# ----- settings -----------------------------------------------------------------------------------------


def test_node_config_keys_are_checked_with_one_line_errors() -> None:
    assert WarmWorkerConfig.from_node_config({}) == WarmWorkerConfig(enabled=True, idle_s=600.0)
    assert WarmWorkerConfig.from_node_config({"warm-worker": False, "warm-idle-s": 5}) == WarmWorkerConfig(False, 5.0)
    for bad, message in [
        ({"warm-worker": "yes"}, "node config warm-worker='yes' must be true or false"),
        ({"warm-worker": 1}, "node config warm-worker=1 must be true or false"),
        ({"warm-idle-s": "10"}, "node config warm-idle-s='10' must be a number of seconds > 0"),
        ({"warm-idle-s": 0}, "node config warm-idle-s must be a number of seconds > 0, got 0.0"),
    ]:
        with pytest.raises(ConfigError) as info:
            WarmWorkerConfig.from_node_config(bad)
        assert str(info.value) == message and "\n" not in str(info.value)


def test_the_warm_path_is_only_for_flowers_per_message_process(monkeypatch) -> None:
    # this process is no flwr-clientapp (as a Simulation Engine actor is not): its handlers serve in process
    assert not warm_client.warm_path({})
    monkeypatch.setattr(warm_client, "per_message_process", lambda: True)
    assert warm_client.warm_path({}) and not warm_client.warm_path({"warm-worker": False})
    monkeypatch.setattr(warm_client, "IN_WORKER", True)
    assert not warm_client.warm_path({})
    with pytest.raises(ConfigError, match="warm-worker"):
        warm_client.warm_path({"warm-worker": "on"})


# ----- serving --------------------------------------------------------------------------------------------


def test_worker_serves_what_the_clientapp_computes_and_is_reused(config, shapes, node, tmp_path, flower_log) -> None:
    # prepare: the replies this process computes itself (warm path off) on a node cache of its own
    local = {**node, "cache-dir": str(tmp_path / "local-cache")}
    with pytest.MonkeyPatch.context() as off:
        off.setattr(warm_client, "per_message_process", lambda: False)
        expected = [wire(hello(config, local))] + [
            wire(client_app.train(train_message(config, shapes, r), context(local))) for r in (1, 2)
        ]
    # execute: the same messages through the node's warm worker
    got = [wire(hello(config, node))] + [
        wire(client_app.train(train_message(config, shapes, r), context(node))) for r in (1, 2)
    ]
    # assert: the same bytes; one worker, started once, served all three; private folder and socket
    assert got == expected
    pids = served_by(flower_log)
    assert len(pids) == 3 and len(set(pids)) == 1, flower_log
    assert sum("warm worker: started pid" in line for line in flower_log) == 1
    folder = tmp_path / "cache" / FOLDER_NAME
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (sock,) = folder.glob("*.sock")
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    # the round's log line of the client step is the SuperNode's again, from the worker
    assert any("partition 0, round 2:" in line and "node cache: in memory" in line for line in flower_log)


def test_a_warm_clientapp_process_imports_neither_torch_nor_the_computing_modules(config, node, tmp_path) -> None:
    # prepare: a hello message and its context as Flower's bytes, for a fresh interpreter (as flwr-clientapp is)
    message = received(records.hello_query(to_toml(config)), "query")
    (tmp_path / "message.pb").write_bytes(message_to_proto(message).SerializeToString())
    (tmp_path / "context.pb").write_bytes(context_to_proto(context(node)).SerializeToString())
    code = (
        "import sys\n"
        "sys.argv[0] = '/venv/bin/flwr-clientapp'\n"
        "from flwr.common.serde import message_from_proto, context_from_proto\n"
        "from flwr.proto.message_pb2 import Message, Context\n"
        "from feddtl.flower.client_app import app\n"
        "m, c = Message(), Context()\n"
        f"m.ParseFromString(open({str(tmp_path / 'message.pb')!r}, 'rb').read())\n"
        f"c.ParseFromString(open({str(tmp_path / 'context.pb')!r}, 'rb').read())\n"
        "reply = app(message_from_proto(m), context_from_proto(c))\n"
        "heavy = ['torch', 'feddtl.flower.node', 'feddtl.flower.records', 'feddtl.backbones', 'feddtl.algorithm']\n"
        "print(dict(reply.content['feddtl.hello'])['partition-id'], sorted(h for h in heavy if h in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    # execute: twice, the second finding the worker the first started (its SuperNode: this test process)
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    # assert: served, and neither process imported torch
    for out in outs:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    assert "warm worker: started pid" in outs[0].stderr and "warm worker: started pid" not in outs[1].stderr


def test_a_worker_killed_mid_message_leaves_the_message_to_the_clientapp(config, shapes, node, tmp_path, flower_log) -> None:
    # prepare: the worker runs (it served the handshake); the expected reply from this process alone
    hello(config, node)
    (pid,) = served_by(flower_log)
    local = {**node, "cache-dir": str(tmp_path / "local-cache")}
    with pytest.MonkeyPatch.context() as off:
        off.setattr(warm_client, "per_message_process", lambda: False)
        expected = wire(client_app.train(train_message(config, shapes, 1), context(local)))
    # execute: the worker is stopped before it reads the message and killed while the message waits on it
    os.kill(pid, signal.SIGSTOP)
    replies: list[Message] = []
    thread = threading.Thread(
        target=lambda: replies.append(client_app.train(train_message(config, shapes, 1), context(node)))
    )
    thread.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    # assert: one line says why, and the message was served here, with the same numbers
    assert [wire(r) for r in replies] == [expected]
    why = [line for line in flower_log if "died mid-message" in line]
    assert len(why) == 1 and f"pid {pid}" in why[0] and "serves the train message itself" in why[0]
    # the next message starts a new worker in place of the dead one's stale socket
    hello(config, node)
    assert served_by(flower_log)[-1] != pid


def test_a_worker_that_cannot_start_leaves_its_messages_to_the_clientapp(config, node, flower_log, monkeypatch) -> None:
    # prepare: a worker that dies while starting (as one whose imports fail would)
    monkeypatch.setattr(warm_client, "BOOTSTRAP", "import sys; print('no torch here'); sys.exit(3)")
    # execute: two messages
    replies = [hello(config, node) for _ in range(2)]
    # assert: both served in process; the first says why, the second does not try again
    assert [dict(r.content[records.HELLO])["partition-id"] for r in replies] == [0, 0]
    why = [line for line in flower_log if "serves the query message itself" in line]
    assert len(why) == 2 and "exited with code 3 while starting: no torch here" in why[0], why
    assert "not started: its last start for this code and run failed" in why[1]
    assert sum("warm worker: started pid" in line for line in flower_log) == 1


def test_a_fault_of_the_handoff_itself_leaves_the_message_to_the_clientapp(config, node, flower_log, monkeypatch) -> None:
    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(warm_client.Handoff, "run", broken)
    assert dict(hello(config, node).content[records.HELLO])["partition-id"] == 0
    assert any("warm worker: RuntimeError: boom; this process serves the query message itself" in line
               for line in flower_log), flower_log


def test_another_feddtl_version_or_run_restarts_the_worker(config, node, flower_log, monkeypatch) -> None:
    # prepare: a worker for this code and run
    hello(config, node)
    first = served_by(flower_log)[-1]
    # execute: a message of another feddtl version, then one of another run's config
    monkeypatch.setattr(feddtl, "__version__", "9.9.9")
    hello(config, node)
    second = served_by(flower_log)[-1]
    hello(load_config("tiny", ["num_clients=2", "classes_per_client=3", f"backbone='{config.backbone}'", "seed=1"]), node)
    third = served_by(flower_log)[-1]
    # assert: three workers, each told why it was replaced; the replaced ones exit
    assert len({first, second, third}) == 3
    restarts = [line for line in flower_log if "serves another" in line]
    assert len(restarts) == 2 and "another feddtl" in restarts[0] and "another experiment" in restarts[1], restarts
    _wait(lambda: process_start(first) is None and process_start(second) is None, 10, "the replaced workers to exit")


def test_idle_worker_exits_and_so_does_one_whose_supernode_is_gone(config, node, tmp_path, flower_log, monkeypatch) -> None:
    # execute: a worker with a one-second idle timeout
    hello(config, {**node, "warm-idle-s": 1})
    idle = served_by(flower_log)[-1]
    # assert: it exits by itself and removes its socket
    _wait(lambda: process_start(idle) is None, 15, "the idle worker to exit")
    assert not list((tmp_path / "cache" / FOLDER_NAME).glob("*.sock"))
    # execute: a worker whose SuperNode is a process that then dies
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        monkeypatch.setattr(warm_client, "node_process", lambda: (supernode.pid, process_start(supernode.pid)))
        hello(config, node)
        orphan = served_by(flower_log)[-1]
    finally:
        supernode.kill()
        supernode.wait()
    # assert: it follows its SuperNode within a few seconds
    _wait(lambda: process_start(orphan) is None, 15, "the orphaned worker to exit")


def test_concurrent_first_messages_start_one_worker(config, node, flower_log) -> None:
    replies: list[Message] = []
    threads = [threading.Thread(target=lambda: replies.append(hello(config, node))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(replies) == 3 and len({wire(r) for r in replies}) == 1
    assert len(set(served_by(flower_log))) == 1
    assert sum("warm worker: started pid" in line for line in flower_log) == 1


def test_an_error_of_the_handler_reaches_flower_as_if_raised_in_process(config, node) -> None:
    # a node config that disagrees with the run (3 partitions for a 2-client config): a ConfigError in the worker
    bad = {**node, "num-partitions": 3, "partition-id": 2}
    with pytest.raises(Exception) as info:
        hello(config, bad)
    # Flower's reason for the ServerApp is str(type(exc)) + str(exc): the same as in process
    assert str(type(info.value)) == "<class 'feddtl.config.errors.ConfigError'>"
    assert "restart the SuperNodes with num-partitions=2" in str(info.value)


def test_cache_clear_stops_the_workers_of_its_folder(config, node, tmp_path, flower_log) -> None:
    from feddtl.cli import main

    hello(config, node)
    pid = served_by(flower_log)[-1]
    assert main(["cache", "clear", "--dir", str(tmp_path / "cache")]) == 0
    _wait(lambda: process_start(pid) is None, 10, "the worker to exit after cache clear")


def test_the_folder_is_private_and_a_foreign_peer_is_refused(config, node, tmp_path, flower_log) -> None:
    # a folder of ours that others may enter is closed before use
    folder = tmp_path / "cache" / FOLDER_NAME
    folder.mkdir(parents=True, mode=0o755)
    os.chmod(folder, 0o755)
    hello(config, node)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    if os.getuid() != 0:
        pytest.skip("the checks against other users need root to impersonate one")
    # another user's connection (through a link the folder and file modes would otherwise stop) is refused
    (sock,) = folder.glob("*.sock")
    open_dir = Path(tempfile.mkdtemp(dir=tmp_path.anchor + "tmp"))  # outside the pytest folders (0700)
    os.chmod(open_dir, 0o777)
    os.link(sock, open_dir / "link.sock")
    os.chmod(open_dir / "link.sock", 0o666)
    code = (
        "import os, socket, sys\nos.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'x' * 16)\n"
        "try:\n    print('answered' if s.recv(100) else 'closed')\n"
        "except ConnectionResetError:\n    print('closed')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(open_dir / "link.sock")], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "closed", out.stdout + out.stderr  # closed without a word
    log = next(folder.glob("*.log")).read_text()
    assert "refused a connection" in log and "uid 65534" in log
    # a folder of another user is not used: the message is served in process
    os.chown(folder, 65534, 65534)
    with pytest.raises(WarmError, match="belongs to uid 65534"):
        warm_client.Handoff(received(records.hello_query(to_toml(config)), "query"), context(node)).run()
    os.chown(folder, 0, 0)
    shutil.rmtree(open_dir)
