"""A persistent, content-keyed store of tensors on one machine: a Flower SuperNode's node cache.

Flower 1.42 runs every ClientApp message in a fresh process, so what a node computes once per run and
reuses (the backbone's derived tensors, its dataset partition, its frozen-trunk features) must live on
disk to survive to the next message. Each entry is a safetensors file keyed by a fingerprint: the
sha256 of a canonical JSON of everything the value depends on (the caller's ``key``); a different key
is a different entry, so a stale value is never looked up, only evicted.

Folder layout (``root``)::

    <kind>-<fingerprint>.safetensors   the tensors
    <kind>-<fingerprint>.json          manifest: kind, key, file, bytes, sha256, created; its mtime is the last use
    .locks/<name>.lock                 flock of one entry: held while it is built and published, and evicted
    .lock                              flock of the folder: eviction and clear
    .tmp-*                             files being written (renamed into place when complete)

Safe with several processes at once (two messages of one node, or several nodes sharing a folder):
an entry is written to a temporary file in the same folder, fsynced and renamed into place (the
tensors first, then the manifest), under the entry's lock, so a reader sees a whole entry or none.
Every load checks the file's size and sha256 against the manifest; a truncated or corrupt entry is
logged, rebuilt and replaced, never used. The folder is bounded: after each publish, the least
recently used entries go until the total is under ``max_bytes`` (entries this process uses, and entries
another process holds locked, stay).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

MANIFEST_VERSION = 1
_KIND = re.compile(r"^[a-z][a-z0-9-]*$")
_CHUNK = 1 << 20
_STALE_TMP_S = 3600.0
"""A temporary file older than this whose entry lock is free was left by a writer that died."""

# safetensors dtype names of the dtypes feddtl stores
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class CorruptEntry(ValueError):
    """An entry whose files do not match its manifest (or a manifest that does not parse)."""


def fingerprint(key: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``key`` as canonical JSON (sorted keys, no whitespace). Values must be JSON
    data (str, int, float, bool, None, lists and dicts of them): anything else is a programming error."""

    def reject(value: object) -> None:
        raise TypeError(f"a node-cache key holds a {type(value).__name__}, not JSON data: {value!r}")

    text = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=reject)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class EntryInfo:
    """One entry, as ``NodeCache.entries()`` lists it."""

    name: str
    kind: str
    key: dict[str, Any]
    nbytes: int
    created: float
    last_used: float
    """Unix time of the last load or publish (the manifest's mtime)."""


class Entry:
    """A verified entry: its manifest and its tensors file, open (the open file pins the verified content
    even if another process evicts the entry meanwhile)."""

    def __init__(self, name: str, manifest: dict[str, Any], file: IO[bytes], data: bytes | None, built: bool) -> None:
        self.name = name
        self.manifest = manifest
        self.file = file
        self._data = data
        self.built = built
        """True when this process built the entry, False when it was loaded."""

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors, in memory (copies: they outlive the file)."""
        from safetensors.torch import load

        if self._data is None:
            self.file.seek(0)
            self._data = self.file.read()
        return load(self._data)

    def memmap(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only numpy memmap of the file (for sets larger than memory)."""
        header, data_start = read_header(self.file)
        spec = header.get(name)
        if not isinstance(spec, dict):
            raise CorruptEntry(f"{self.name}: no tensor {name!r}")
        dtype = np.dtype(_NP_DTYPES[spec["dtype"]])
        start, end = spec["data_offsets"]
        shape = tuple(int(d) for d in spec["shape"])
        if (end - start) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CorruptEntry(f"{self.name}: tensor {name!r} does not fill its data range")
        return np.memmap(self.file, dtype=dtype, mode="r", offset=data_start + start, shape=shape)

    def close(self) -> None:
        self.file.close()


def read_header(file: IO[bytes]) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    file.seek(0)
    raw = file.read(8)
    if len(raw) != 8:
        raise CorruptEntry("safetensors file shorter than its header size")
    n = int.from_bytes(raw, "little")
    if n > 100 * 2**20:
        raise CorruptEntry(f"safetensors header of {n} bytes")
    try:
        header = json.loads(file.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntry(f"safetensors header does not parse: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptEntry("safetensors header is not an object")
    return header, 8 + n


def write_tensor_stream(
    path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype, chunks: Iterable[torch.Tensor]
) -> None:
    """Write one tensor of ``shape`` as a safetensors file, chunk by chunk along the first dimension
    (so a set larger than memory streams through); the chunks must fill the shape exactly."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    header = {name: {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    written = 0
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for chunk in chunks:
            raw = chunk.detach().to(device="cpu", dtype=dtype).contiguous().numpy().tobytes()
            written += len(raw)
            if written > nbytes:
                raise ValueError(f"write_tensor_stream: the chunks exceed the shape {shape}")
            f.write(raw)
    if written != nbytes:
        raise ValueError(f"write_tensor_stream: the chunks hold {written} bytes, the shape {shape} needs {nbytes}")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(file: IO[bytes], keep: bool) -> tuple[str, int, bytes | None]:
    file.seek(0)
    h, size, parts = hashlib.sha256(), 0, []
    while chunk := file.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
        if keep:
            parts.append(chunk)
    return h.hexdigest(), size, (b"".join(parts) if keep else None)


class NodeCache:
    """The entries under ``root`` (see the module docstring); ``max_bytes`` bounds their total size."""

    def __init__(self, root: str | Path, max_bytes: int, log_fn: Callable[[str], None] = lambda s: None) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.log_fn = log_fn
        self.in_use: set[str] = set()
        """Entries this process loaded or built: eviction leaves them alone."""
        self.events: list[str] = []
        """What happened, one line per entry touched ("hit", "built", "corrupt ...", "evicted ...")."""

    # ----- names and paths --------------------------------------------------------------------------------
    @staticmethod
    def entry_name(kind: str, key: Mapping[str, Any]) -> str:
        if not _KIND.match(kind):
            raise ValueError(f"node-cache kind {kind!r} must match {_KIND.pattern}")
        return f"{kind}-{fingerprint({'kind': kind, 'key': key})[:32]}"

    def _tensors_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def _manifest_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    @contextmanager
    def _lock(self, path: Path, blocking: bool = True) -> Iterator[bool]:
        """flock ``path`` (created if missing); yields False when ``blocking`` is off and another holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    yield False
                    return
                raise
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def _entry_lock(self, name: str, blocking: bool = True):
        return self._lock(self.root / ".locks" / f"{name}.lock", blocking)

    # ----- load -------------------------------------------------------------------------------------------
    def _open(self, name: str, keep_bytes: bool) -> Entry | None:
        """The verified entry, or None when absent; raises CorruptEntry when its files do not verify."""
        manifest_path = self._manifest_path(name)
        try:
            text = manifest_path.read_text()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
            file_name, size, digest = manifest["file"], int(manifest["bytes"]), str(manifest["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"manifest does not parse ({exc})") from None
        if file_name != self._tensors_path(name).name:
            raise CorruptEntry(f"manifest names the file {file_name!r}")
        try:
            file = open(self.root / file_name, "rb")
        except FileNotFoundError:
            raise CorruptEntry("the manifest's tensors file is missing") from None
        try:
            actual_size = os.fstat(file.fileno()).st_size
            if actual_size != size:
                raise CorruptEntry(f"tensors file has {actual_size} bytes, the manifest says {size} (truncated?)")
            actual, _, data = _sha256(file, keep_bytes)
            if actual != digest:
                raise CorruptEntry("tensors file's sha256 differs from the manifest's")
        except BaseException:
            file.close()
            raise
        try:
            os.utime(manifest_path)  # the last use, for eviction
        except OSError:
            pass
        return Entry(name, manifest, file, data, built=False)

    def load(self, kind: str, key: Mapping[str, Any], keep_bytes: bool = True) -> Entry | None:
        """The verified entry of ``key``, or None (absent, or corrupt: logged). ``keep_bytes=False``:
        the caller will memmap the file rather than read all its tensors."""
        name = self.entry_name(kind, key)
        try:
            entry = self._open(name, keep_bytes)
        except CorruptEntry as exc:
            self._note(f"{name}: corrupt entry ignored ({exc})")
            return None
        if entry is not None:
            self.in_use.add(name)
            self._note(f"{name}: hit", log=False)
        return entry

    def get_or_build(
        self, kind: str, key: Mapping[str, Any], build: Callable[[Path], None], keep_bytes: bool = True
    ) -> Entry:
        """The entry of ``key``: loaded when a valid one exists, else built by ``build(path)`` (which writes a
        safetensors file at ``path``), published and returned. One process builds; others wait for it."""
        name = self.entry_name(kind, key)
        self.in_use.add(name)
        try:
            entry = self._open(name, keep_bytes)
        except CorruptEntry as exc:
            self._note(f"{name}: corrupt, rebuilding ({exc})")
            entry = None
        if entry is not None:
            self._note(f"{name}: hit", log=False)
            return entry
        with self._entry_lock(name):
            try:  # another process may have published it while this one waited for the lock
                entry = self._open(name, keep_bytes)
            except CorruptEntry:
                entry = None
            if entry is not None:
                self._note(f"{name}: hit (built by another process)", log=False)
                return entry
            started = time.perf_counter()
            self._publish(name, kind, key, build)
            entry = self._open(name, keep_bytes)
            if entry is None:
                raise RuntimeError(f"node cache: {name} vanished right after it was published")
            entry.built = True
            self._note(f"{name}: built in {time.perf_counter() - started:.1f} s ({entry.nbytes / 2**20:.2f} MiB)")
        self.evict()
        return entry

    def _publish(self, name: str, kind: str, key: Mapping[str, Any], build: Callable[[Path], None]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp_tensors = self.root / f".tmp-{name}-{token}.safetensors"
        tmp_manifest = self.root / f".tmp-{name}-{token}.json"
        try:
            build(tmp_tensors)
            _fsync(tmp_tensors)
            with open(tmp_tensors, "rb") as f:
                digest, size, _ = _sha256(f, keep=False)
            now = time.time()
            manifest = {
                "version": MANIFEST_VERSION, "name": name, "kind": kind, "key": key,
                "file": self._tensors_path(name).name, "bytes": size, "sha256": digest, "created": now,
            }
            tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync(tmp_manifest)
            # Tensors first, manifest last: the manifest is the commit. A reader holding an older manifest
            # finds a checksum mismatch, takes this entry's lock and reads the new whole entry.
            os.replace(tmp_tensors, self._tensors_path(name))
            os.replace(tmp_manifest, self._manifest_path(name))
            _fsync(self.root)
        finally:
            for tmp in (tmp_tensors, tmp_manifest):
                tmp.unlink(missing_ok=True)

    # ----- listing, eviction, clear -------------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        """Every entry with a readable manifest, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for path in self.root.glob("*.json"):
            try:
                manifest = json.loads(path.read_text())
                out.append(EntryInfo(
                    name=path.stem, kind=str(manifest["kind"]), key=dict(manifest.get("key") or {}),
                    nbytes=int(manifest["bytes"]), created=float(manifest["created"]), last_used=path.stat().st_mtime,
                ))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda e: (e.last_used, e.name))

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries())

    def _remove(self, name: str) -> None:
        self._manifest_path(name).unlink(missing_ok=True)  # the manifest first: the entry is gone for readers
        self._tensors_path(name).unlink(missing_ok=True)
        # The lock file stays (empty): unlinking it while a process waits on it would let a second process
        # lock a new file of the same name and build the entry at the same time.

    def evict(self) -> list[str]:
        """Remove least recently used entries until the total is at most ``max_bytes``; also files left by
        writers that died. Entries in use by this process, or locked by another, stay."""
        if not self.root.is_dir():
            return []
        evicted = []
        with self._lock(self.root / ".lock"):
            self._sweep()
            entries = self.entries()
            total = sum(e.nbytes for e in entries)
            for info in entries:
                if total <= self.max_bytes:
                    break
                if info.name in self.in_use:
                    continue
                with self._entry_lock(info.name, blocking=False) as free:
                    if not free:
                        continue
                    self._remove(info.name)
                total -= info.nbytes
                evicted.append(info.name)
                self._note(f"{info.name}: evicted ({info.nbytes / 2**20:.2f} MiB, last used {time.ctime(info.last_used)})")
        return evicted

    def _sweep(self) -> None:
        """Temporary files of dead writers and tensors files whose manifest is missing."""
        now = time.time()
        for path in self.root.glob(".tmp-*"):
            name = path.name[len(".tmp-"):].rsplit(".", 1)[0].rsplit("-", 2)[0]  # .tmp-<name>-<pid>-<hex>.<ext>
            try:
                old = now - path.stat().st_mtime > _STALE_TMP_S
            except FileNotFoundError:
                continue
            if old:
                with self._entry_lock(name, blocking=False) as free:
                    if free:
                        path.unlink(missing_ok=True)
        for path in self.root.glob("*.safetensors"):
            if path.name.startswith(".tmp-"):  # pathlib's "*" matches dotfiles: another writer's, in progress
                continue
            if not self._manifest_path(path.stem).exists() and path.stem not in self.in_use:
                with self._entry_lock(path.stem, blocking=False) as free:
                    if free and not self._manifest_path(path.stem).exists():
                        path.unlink(missing_ok=True)

    def clear(self) -> tuple[int, int, int]:
        """Remove every entry not locked by a process at work: (entries removed, bytes freed, entries kept)."""
        removed = freed = kept = 0
        if not self.root.is_dir():
            return 0, 0, 0
        with self._lock(self.root / ".lock"):
            for info in self.entries():
                with self._entry_lock(info.name, blocking=False) as free:
                    if not free:
                        kept += 1
                        continue
                    self._remove(info.name)
                removed += 1
                freed += info.nbytes
            self._sweep()
        return removed, freed, kept

    def _note(self, line: str, log: bool = True) -> None:
        self.events.append(line)
        if log:
            self.log_fn(f"node cache: {line}")
