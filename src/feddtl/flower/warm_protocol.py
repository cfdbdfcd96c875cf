"""What a ClientApp process and its node's warm worker share: where the worker lives, who may talk to it,
what identifies the code and settings it serves, and the frames on its socket.

Imports nothing heavy (no torch, numpy only through flwr): the ClientApp process of a warm node loads this
and flwr, and nothing else of feddtl's computing code.

Files, in ``<node cache folder>/.warm-worker/`` (created 0700, owned by the node's user; refused otherwise):
``node-<pid>-<start>.sock`` (the worker's socket, 0600), ``.lock`` (held while a worker starts), ``.log``
(the worker's output) and ``.failed`` (why the last start failed, for that identity), where ``<pid>`` and
``<start>`` name the process that launches the node's ClientApp processes (the SuperNode's
``flower-superexec``): one worker per SuperNode, also when SuperNodes share a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

import feddtl
from feddtl.config.node_cache_config import NodeCacheConfig

FOLDER_NAME = ".warm-worker"
MAGIC = b"FDW1"
MAX_HEADER = 1 << 20
"""Bytes; a longer header is not one of ours."""
EXPERIMENT_FIELD = "experiment"
"""The ConfigRecord field that carries the run's configuration TOML (task and handshake alike)."""


class WarmError(RuntimeError):
    """The warm path cannot serve this message (the ClientApp serves it itself)."""


# ----- where ------------------------------------------------------------------------------------------


def worker_folder(node_config: Mapping[str, object]) -> Path:
    """The folder of the node's warm worker: ``.warm-worker`` in its node cache folder."""
    return NodeCacheConfig.from_node_config(node_config).folder() / FOLDER_NAME


def open_private_folder(path: Path) -> int:
    """A descriptor of ``path``, created 0700 if missing; refused unless it is a directory owned by this user
    that no one else may enter (a folder of ours that is open to others is closed first).

    Everything else goes through this descriptor (``fd_path``): the folder checked is the folder used, and
    socket paths stay short (a Unix socket path has at most 107 bytes)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise WarmError(f"{path} belongs to uid {st.st_uid}, not to this node's user (uid {os.getuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(folder_fd: int, name: str) -> str:
    """``name`` inside the folder open as ``folder_fd`` (Linux's /proc/self/fd)."""
    return f"/proc/self/fd/{folder_fd}/{name}"


def process_start(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks (None: no such process, or one that has exited and
    waits to be reaped): with the pid, it names one process for good (a pid alone may be reused)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def node_process() -> tuple[int, int]:
    """(pid, start) of the process that launched this ClientApp process: the SuperNode's, which outlives its
    messages (``flower-superexec``; it exits with its SuperNode)."""
    pid = os.getppid()
    return pid, process_start(pid) or 0


def process_age_s() -> float | None:
    """Seconds since this process started (None: not on Linux)."""
    start = process_start(os.getpid())
    if start is None:
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")


def socket_name(node_pid: int, node_start: int) -> str:
    return f"node-{node_pid}-{node_start}"


def alive(pid: int, start: int) -> bool:
    return process_start(pid) == start


# ----- who --------------------------------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (SO_PEERCRED, Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def stop_workers(cache_folder: Path) -> int:
    """Make the warm workers of a node cache folder unreachable (their sockets removed): the next message
    starts a fresh worker, which reads the cache anew; an old worker finishes the message it serves, finds
    its socket gone and exits within a second. Returns how many sockets were removed."""
    folder = cache_folder / FOLDER_NAME
    removed = 0
    for path in folder.glob("*.sock") if folder.is_dir() else []:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def running_workers(under: Path) -> list[int]:
    """Pids of the warm workers whose folder lies under ``under`` (found by their command lines)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(b"feddtl.flower.warm_worker" in a for a in args) and any(str(under).encode() in a for a in args)
        if ours and process_start(int(cmdline.parent.name)) is not None:
            out.append(int(cmdline.parent.name))
    return out


# ----- what -------------------------------------------------------------------------------------------


def code_stamp() -> str:
    """sha256 over every feddtl source file's path, size and modification time: code changed in place (an
    editable install) is other code, at the cost of a stat per file (a few milliseconds)."""
    root = Path(feddtl.__file__).parent
    h = hashlib.sha256(str(root).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith((".py", ".toml")):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def experiment_key(content: RecordDict) -> str:
    """sha256 of the configuration TOML(s) a message carries (the ``experiment`` field of its ConfigRecords)."""
    texts = sorted(
        value for record in content.config_records.values() if isinstance(value := record.get(EXPERIMENT_FIELD), str)
    )
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def identity(content: RecordDict, node_config: Mapping[str, object]) -> dict[str, str]:
    """What a worker must share with a message to serve it: the code (feddtl version, its sources, the
    interpreter and import path), the process's surroundings (working directory, environment: thread counts
    and paths change results), the node's config and the run's configuration. Values are strings; the
    environment and the configuration as digests."""
    env = hashlib.sha256(json.dumps(sorted(os.environ.items())).encode()).hexdigest()
    return {
        "feddtl": feddtl.__version__,
        "code": code_stamp(),
        "python": f"{sys.executable} {sys.version}",
        "sys.path": json.dumps(sys.path),
        "cwd": os.getcwd(),
        "environment": env,
        "node config": json.dumps(dict(node_config), sort_keys=True, default=str),
        "experiment": experiment_key(content),
    }


def digest(ident: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(ident), sort_keys=True).encode()).hexdigest()


# ----- frames -----------------------------------------------------------------------------------------
# A frame: MAGIC, the header's length (u32, big-endian), the header (JSON object), then the blobs whose
# lengths the header lists under "blobs". Blobs are Flower's own protobuf serialisation (flwr.common.serde):
# the exact bytes of every array, nothing pickled.


def send_frame(sock: socket.socket, header: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> None:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    sock.sendall(MAGIC + struct.pack(">I", len(head)) + head)
    for blob in blobs:
        if blob:  # sending b"" to a peer that has read everything and closed fails (EPIPE)
            sock.sendall(blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    start = _recv_exact(sock, len(MAGIC) + 4)
    if start[: len(MAGIC)] != MAGIC:
        raise ConnectionError("not a feddtl warm-worker frame")
    (size,) = struct.unpack(">I", start[len(MAGIC):])
    if size > MAX_HEADER:
        raise ConnectionError(f"frame header of {size} bytes")
    header = json.loads(_recv_exact(sock, size))
    blobs = header.get("blobs", [])
    if not isinstance(header, dict) or not all(isinstance(n, int) and n >= 0 for n in blobs):
        raise ConnectionError("malformed frame header")
    return header, [_recv_exact(sock, n) for n in blobs]
