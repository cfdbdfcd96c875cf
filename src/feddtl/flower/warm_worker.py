"""A SuperNode's warm worker: one process per SuperNode that serves its ClientApp messages and keeps torch, the
feddtl modules and the node's state (``client_app.node_state``: the config, partition, backbone and trunk
features) in memory between them.

Started by the first ClientApp process that finds none (``feddtl.flower.warm_client``), in a session of its
own. It runs the very ClientApp Flower would (``feddtl.flower.client_app.app``) on the message and context that
process received, rebuilt from Flower's own protobuf bytes, so a message computes what it computes in a fresh
process: the same handlers, the same node cache, the same seeds. It serves one message at a time and exits
when idle for ``warm-idle-s``, when its SuperNode is gone, when its socket was removed (``feddtl cache
clear``), on SIGTERM, or when a message comes from other code or another run (the message's ClientApp then
starts a new worker). Only processes of the node's own user may connect: its folder is 0700, the socket 0600,
and every peer's uid is checked (SO_PEERCRED).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Sequence
from logging import ERROR, INFO
from types import FrameType

from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.common.serde import (
    context_from_proto,
    message_from_proto,
    message_to_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

from feddtl.flower import warm_client
from feddtl.flower.warm_protocol import (
    alive,
    digest,
    fd_path,
    open_private_folder,
    peer_credentials,
    recv_frame,
    send_frame,
)

POLL_S = 1.0
"""Between messages, how often the worker checks its idle time, its SuperNode and its socket."""
IO_TIMEOUT_S = 60.0
"""Reading a request and writing a reply (a local socket: milliseconds, unless the peer is stuck)."""


class Capture(logging.Handler):
    """The Flower log lines of one message, sent back for its ClientApp process to log (the SuperNode's log
    then reads as without the worker)."""

    def __init__(self) -> None:
        super().__init__(INFO)
        self.lines: list[list[object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([record.levelno, record.getMessage()])


class Worker:
    def __init__(self, folder: str, name: str, ident: dict[str, str], idle_s: float, node: tuple[int, int]) -> None:
        from pathlib import Path

        self.folder_fd = open_private_folder(Path(folder))
        self.name, self.identity, self.digest = name, ident, digest(ident)
        self.idle_s, self.node = idle_s, node
        self.sock_path = fd_path(self.folder_fd, name + ".sock")
        # What the messages need, imported now rather than by the first message. The handlers import the
        # heavy modules lazily (the ClientApp process of a warm node must not), so name them here.
        import feddtl.evaluation
        import feddtl.flower.eval_records
        import feddtl.flower.node  # torch, the node cache
        import feddtl.flower.records
        import feddtl.flower.versions
        import feddtl.methods
        import feddtl.server.clients  # noqa: F401
        from feddtl.flower import client_app

        warm_client.IN_WORKER = True
        self.app = client_app.app
        self.client_app = client_app
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600
        try:
            self.listener.bind(self.sock_path)
        finally:
            os.umask(old)
        self.socket_id = self._socket_id()
        self.listener.listen(16)

    # ----- lifetime ---------------------------------------------------------------------------------
    def serve(self) -> str:
        """Serve messages until a reason to stop; returns it."""
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([self.listener], [], [], POLL_S)
            if ready:
                conn, _ = self.listener.accept()
                with conn:
                    stop = self.serve_connection(conn)
                last = time.monotonic()
                if stop:
                    return stop
                continue
            if time.monotonic() - last > self.idle_s:
                return f"no message for {self.idle_s:g} s (warm-idle-s)"
            pid, start = self.node
            if start and not alive(pid, start):
                return f"its SuperNode's process {pid} is gone"
            if not self.owns_socket():
                return "its socket was removed"

    def _socket_id(self) -> tuple[int, int] | None:
        """The socket file's inode and change time: an inode number alone may be reused by the next worker's."""
        try:
            st = os.stat(self.sock_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_ctime_ns

    def owns_socket(self) -> bool:
        return self._socket_id() == self.socket_id

    def retire(self) -> None:
        """Unreachable from now on: the socket file goes (if it is still ours), the listener closes."""
        if self.owns_socket():
            try:
                os.unlink(self.sock_path)
            except FileNotFoundError:
                pass
        self.listener.close()

    def close(self) -> None:
        self.retire()
        state = getattr(self.client_app, "_state", None)
        if state is not None:
            state.data.close()  # temporary trunk stores (node cache off)
        os.close(self.folder_fd)

    # ----- one message ------------------------------------------------------------------------------
    def serve_connection(self, conn: socket.socket) -> str | None:
        """Serve one request; returns why to stop serving, or None."""
        pid, uid, _ = peer_credentials(conn)
        if uid != os.getuid():
            log(ERROR, "feddtl warm worker: refused a connection of pid %d, uid %d (not this node's user)", pid, uid)
            return None
        conn.settimeout(IO_TIMEOUT_S)
        try:
            header, blobs = recv_frame(conn)
        except (OSError, ConnectionError, ValueError) as exc:
            log(ERROR, "feddtl warm worker: unreadable request of pid %d: %s", pid, exc)
            return None
        if header.get("digest") != self.digest:
            theirs = header.get("identity") if isinstance(header.get("identity"), dict) else {}
            differs = sorted(k for k in set(self.identity) | set(theirs) if self.identity.get(k) != theirs.get(k))
            self.retire()  # before answering: the asker starts the next worker on this socket path
            self._reply(conn, {"status": "mismatch", "differs": differs})
            return f"a message of another {', '.join(differs) or 'identity'} came"
        if header.get("op") != "message" or len(blobs) != 2:
            self._reply(conn, {"status": "refused"})
            return None
        self._reply(conn, *self.handle(blobs))
        release_memory()  # after the reply: off the message's path
        return None

    def handle(self, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        started = time.perf_counter()
        proto, context_proto = ProtoMessage(), ProtoContext()
        proto.ParseFromString(blobs[0])
        context_proto.ParseFromString(blobs[1])
        message, context = message_from_proto(proto), context_from_proto(context_proto)
        capture = Capture()
        FLOWER_LOGGER.addHandler(capture)
        try:
            reply = self.app(message, context)
        except Exception as exc:  # noqa: BLE001  the handler's own error: reported as Flower reports it
            log(ERROR, "feddtl warm worker: the ClientApp raised:\n%s", traceback.format_exc().rstrip())
            error = {"module": type(exc).__module__, "qualname": type(exc).__qualname__, "text": str(exc)}
            return {"status": "raised", "error": error, "logs": capture.lines}, []
        finally:
            FLOWER_LOGGER.removeHandler(capture)
        blobs_out = [message_to_proto(reply).SerializeToString(), recorddict_to_proto(context.state).SerializeToString()]
        return {"status": "ok", "logs": capture.lines, "handled_s": time.perf_counter() - started}, blobs_out

    def _reply(self, conn: socket.socket, header: dict, blobs: Sequence[bytes] = ()) -> None:
        try:
            send_frame(conn, {**header, "pid": os.getpid()}, blobs)
        except OSError as exc:  # the ClientApp process is gone (its SuperNode stopped it): nothing to answer
            log(ERROR, "feddtl warm worker: could not reply: %s", exc)


def release_memory() -> None:
    """Give the heap the message freed back to the OS (glibc's malloc_trim): a node's first message builds the
    backbone in full, and a worker would otherwise idle on that build's freed memory (880 -> 640 MiB for
    ``lite``; a worker that loaded the backbone from the node cache holds about 300 MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"signal {signum}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="feddtl-warm-worker", description="a SuperNode's warm worker")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--identity", required=True, help="JSON: what this worker serves (warm_protocol.identity)")
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--node", required=True, help="PID:START of the SuperNode's process")
    args = parser.parse_args(argv)
    pid, start = (int(x) for x in args.node.split(":"))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    started = time.perf_counter()
    worker = Worker(args.folder, args.name, json.loads(args.identity), args.idle_s, (pid, start))
    log(INFO, "feddtl warm worker: pid %d ready after %.2f s, for %s", os.getpid(), time.perf_counter() - started,
        args.folder)
    why = "stopped"
    try:
        why = worker.serve()
    except SystemExit as exc:
        why = str(exc)
    finally:
        worker.close()
        log(INFO, "feddtl warm worker: pid %d exits: %s", os.getpid(), why)
