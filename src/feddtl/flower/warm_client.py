"""The ClientApp's side of the warm worker: hand a message to the node's worker and return its reply.

Flower 1.42 starts a fresh ``flwr-clientapp`` process per message. With ``warm-worker`` on (the default), that
process imports flwr and this module only (no torch, no feddtl computing code) and hands the message, as
Flower's own protobuf bytes, over a Unix socket to the node's warm worker (``feddtl.flower.warm_worker``),
which runs the same ClientApp on it in a process that holds torch and the node's state between messages.
The first message that finds no worker starts one (detached; a lock file makes concurrent messages start
one). Whenever the worker cannot serve (it cannot start, died mid-message, the folder is not private), the
ClientApp serves the message itself, as without the warm worker, after one log line saying why.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from logging import INFO, WARNING

from flwr.app import Context, Message
from flwr.common import log
from flwr.common.serde import (
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from feddtl.config.warm_worker_config import WarmWorkerConfig
from feddtl.flower.warm_protocol import (
    WarmError,
    alive,
    digest,
    fd_path,
    identity,
    node_process,
    open_private_folder,
    peer_credentials,
    process_age_s,
    recv_frame,
    send_frame,
    socket_name,
    worker_folder,
)

IN_WORKER = False
"""True in the warm worker itself: there its ClientApp serves messages in process."""
START_TIMEOUT_S = 120.0
"""How long a message waits for a starting worker (its imports) before serving itself; the worker keeps
starting and serves the next message."""
CONNECT_TIMEOUT_S = 10.0
BOOTSTRAP = (
    "import sys, json; sys.path[:] = json.loads(sys.argv.pop(1)); "
    "from feddtl.flower.warm_worker import main; main(sys.argv[1:])"
)
"""The worker's command: this process's import path first, so the worker imports the very same feddtl."""


class RemoteError(Exception):
    """An exception the handler raised in the worker, raised again here under the same class name."""


def per_message_process() -> bool:
    """Whether this is Flower's per-message ``flwr-clientapp`` process (the Deployment Engine); a Simulation
    Engine actor, which outlives its messages anyway, is not."""
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "flwr-clientapp"


def warm_path(node_config) -> bool:
    """Whether this process hands its messages to the node's warm worker. Checks the node config's warm-worker
    keys (ConfigError naming the key) whatever the answer."""
    settings = WarmWorkerConfig.from_node_config(node_config)
    return settings.enabled and not IN_WORKER and sys.platform.startswith("linux") and per_message_process()


def forward(msg: Message, context: Context) -> Message | None:
    """The warm worker's reply to ``msg``; None when this process is to serve it itself: the warm path is off,
    or the worker could not serve it (then one line says why, and the process is readied as without it)."""
    if not warm_path(context.node_config):
        return None
    try:
        return Handoff(msg, context).run()
    except RemoteError:  # the handler's own error, raised in the worker: the message's outcome
        raise
    except WarmError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001  a fault of the hand-off itself must not cost the message
        reason = f"{type(exc).__name__}: {exc}"
    log(WARNING, "feddtl node: warm worker: %s; this process serves the %s message itself", reason,
        msg.metadata.message_type)
    # Serving here is serving as without a worker: the lifespan skipped this on the warm path.
    from feddtl.flower.node import optimizers_without_dynamo

    optimizers_without_dynamo()
    return None


class Handoff:
    """One message's trip to the node's worker and back."""

    def __init__(self, msg: Message, context: Context, node: tuple[int, int] | None = None) -> None:
        """``node``: (pid, start) of the SuperNode's process (default: this process's parent, see
        ``warm_protocol.node_process``); the worker serves that node and exits when it is gone."""
        self.msg, self.context = msg, context
        self.settings = WarmWorkerConfig.from_node_config(context.node_config)
        self.folder = worker_folder(context.node_config)
        self.node = node or node_process()
        self.worker_pid: int | None = None
        self.name = socket_name(*self.node)
        self.identity = identity(msg.content, context.node_config)
        self.digest = digest(self.identity)

    def run(self) -> Message:
        try:
            folder_fd = open_private_folder(self.folder)
        except OSError as exc:
            raise WarmError(f"cannot use {self.folder}: {exc}") from None
        try:
            for _ in range(2):  # a worker of other code or another run exits; the second try starts ours
                sock = self._connect(folder_fd) or self._start(folder_fd)
                with sock:
                    reply = self._exchange(sock)
                if reply is not None:
                    return reply
            raise WarmError("a new worker did not accept the message")
        finally:
            os.close(folder_fd)

    # ----- connect or start -----------------------------------------------------------------------
    def _connect(self, folder_fd: int) -> socket.socket | None:
        """A connection to the running worker; None when none listens (no socket, or a stale one)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(fd_path(folder_fd, self.name + ".sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise WarmError(f"cannot connect to {self.folder / self.name}.sock: {exc}") from None
        _, uid, _ = peer_credentials(sock)
        if uid != os.getuid():  # the folder is private: only root could have put it there
            sock.close()
            raise WarmError(f"{self.folder / self.name}.sock is served by uid {uid}, not this node's user")
        return sock

    def _start(self, folder_fd: int) -> socket.socket:
        """Start the node's worker (unless a concurrent message did) and connect to it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        lock = os.open(fd_path(folder_fd, self.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:  # a deadline, not a blocking flock: a stuck starter must not hold up every message
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarmError(f"another message held the start lock for {START_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.02)
            sock = self._connect(folder_fd)
            if sock is not None:  # started by the message that held the lock
                return sock
            failed = self._read(folder_fd, ".failed")
            if failed.get("digest") == self.digest:
                raise WarmError(f"not started: its last start for this code and run failed ({failed.get('reason')})")
            try:
                os.unlink(fd_path(folder_fd, self.name + ".sock"))  # stale: its worker is gone
            except FileNotFoundError:
                pass
            sweep(folder_fd)
            proc = self._spawn(folder_fd)
            log(INFO, "feddtl node: warm worker: started pid %d (%s)", proc.pid, self.folder / self.name)
            while True:
                sock = self._connect(folder_fd)
                if sock is not None:
                    return sock
                code = proc.poll()
                if code is not None:
                    reason = f"the worker exited with code {code} while starting: {self._log_tail(folder_fd)}"
                    self._write(folder_fd, ".failed", {"digest": self.digest, "reason": reason})
                    raise WarmError(reason)
                if time.monotonic() > deadline:
                    raise WarmError(
                        f"the worker (pid {proc.pid}) was not ready after {START_TIMEOUT_S:.0f} s; it keeps "
                        "starting and will serve the next message"
                    )
                time.sleep(0.02)
        finally:
            os.close(lock)  # and with it the flock

    def _spawn(self, folder_fd: int) -> subprocess.Popen[bytes]:
        out = os.open(fd_path(folder_fd, self.name + ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pid, start = self.node
        try:
            # A session of its own: it outlives this process, and signals to this process's group miss it.
            return subprocess.Popen(
                [
                    sys.executable, "-c", BOOTSTRAP, json.dumps(sys.path),
                    "--folder", str(self.folder), "--name", self.name, "--identity", json.dumps(self.identity),
                    "--idle-s", repr(self.settings.idle_s), "--node", f"{pid}:{start}",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=os.getcwd(), close_fds=True,
            )
        except OSError as exc:
            raise WarmError(f"cannot start the worker: {exc}") from None
        finally:
            os.close(out)

    def _read(self, folder_fd: int, suffix: str) -> dict:
        try:
            with open(fd_path(folder_fd, self.name + suffix)) as f:
                value = json.load(f)
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, folder_fd: int, suffix: str, value: dict) -> None:
        fd = os.open(fd_path(folder_fd, self.name + suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(value, f)

    def _log_tail(self, folder_fd: int) -> str:
        try:
            with open(fd_path(folder_fd, self.name + ".log"), errors="replace") as f:
                lines = [line.strip() for line in f.read()[-4000:].splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no output"

    # ----- the message ------------------------------------------------------------------------------
    def _exchange(self, sock: socket.socket) -> Message | None:
        """The reply; None when the worker serves other code or another run (it then exits)."""
        pid, _, _ = peer_credentials(sock)
        self.worker_pid = pid
        age = process_age_s()
        started = time.perf_counter()
        try:
            sock.settimeout(None)  # a message takes what it takes; a worker that dies closes the socket
            body = message_to_proto(self.msg).SerializeToString()
            context = context_to_proto(self.context).SerializeToString()
            send_frame(sock, {"op": "message", "identity": self.identity, "digest": self.digest}, [body, context])
            header, blobs = recv_frame(sock)
        except (OSError, ConnectionError, ValueError) as exc:
            raise WarmError(f"the worker (pid {pid}) died mid-message ({exc})") from None
        for level, line in header.get("logs", []):
            log(level, "%s", line)
        status = header.get("status")
        if status == "mismatch":
            log(INFO, "feddtl node: warm worker: pid %d serves another %s; starting a new one", pid,
                ", ".join(header.get("differs", [])) or "identity")
            return None
        if status == "raised":
            error = header.get("error", {})
            raise remote_exception(str(error.get("module")), str(error.get("qualname")), str(error.get("text")))
        if status != "ok" or len(blobs) != 2:
            raise WarmError(f"the worker (pid {pid}) answered {status!r}")
        proto = ProtoMessage()
        proto.ParseFromString(blobs[0])
        answer = message_from_proto(proto)
        state = ProtoRecordDict()
        state.ParseFromString(blobs[1])
        self.context.state = recorddict_from_proto(state)
        total = time.perf_counter() - started
        worker_s = float(header.get("handled_s", 0.0))
        before = "" if age is None else f"process start to hand-off {age:.1f} s, "
        log(INFO, "feddtl node: warm worker pid %d served the %s message: %s%.2f s in the worker, hand-off %.2f s",
            pid, self.msg.metadata.message_type, before, worker_s, total - worker_s)
        if answer.has_content():
            return Message(answer.content, reply_to=self.msg)
        return Message(answer.error, reply_to=self.msg)


def sweep(folder_fd: int) -> None:
    """Remove the files of SuperNodes that are gone (their workers have exited or are exiting)."""
    for name in os.listdir(fd_path(folder_fd, ".")):
        parts = name.split(".", 1)[0].split("-")
        ours = len(parts) == 3 and parts[0] == "node" and parts[1].isdigit() and parts[2].isdigit()
        if ours and not alive(int(parts[1]), int(parts[2])):
            try:
                os.unlink(fd_path(folder_fd, name))
            except FileNotFoundError:
                pass


def remote_exception(module: str, qualname: str, text: str) -> RemoteError:
    """``text`` as an exception whose class prints as the worker's (``<class 'module.qualname'>``): the reason
    Flower reports to the ServerApp reads as if this process had raised it."""
    cls = type(qualname.rpartition(".")[2] or "Error", (RemoteError,), {"__module__": module, "__qualname__": qualname})
    return cls(text)

