"""The node cache (feddtl.cache.node_cache): keyed entries that load verified, rebuild when corrupt, survive
two processes racing, stay under their size cap, and `feddtl cache ls|clear`."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from feddtl.cache.node_cache import NodeCache, fingerprint, save_tensors, write_tensor_stream
from feddtl.cli import main

KEY = {"dataset": "digits", "client_id": 0, "data": {"image_size": 96, "invert": False}, "seed": 0}


class Builder:
    """A build function that counts its calls."""

    def __init__(self, tensors: dict[str, torch.Tensor], delay: float = 0.0) -> None:
        self.tensors = tensors
        self.delay = delay
        self.calls = 0

    def __call__(self, path: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        save_tensors(path, self.tensors)


def _tensors(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 8, generator=g), "i": torch.arange(n, dtype=torch.int64)}


def _only_file(root: Path, suffix: str) -> Path:
    files = [p for p in root.iterdir() if p.suffix == suffix]
    assert len(files) == 1, files
    return files[0]


def test_fingerprint_changes_with_every_input_and_nothing_else() -> None:
    # prepare: one change per key (nested included), and the same key written in another order
    variants = [
        {**KEY, "dataset": "fashion-mnist"},
        {**KEY, "client_id": 1},
        {**KEY, "data": {"image_size": 64, "invert": False}},
        {**KEY, "data": {"image_size": 96, "invert": True}},
        {**KEY, "seed": 1},
        {**KEY, "extra": None},
    ]
    reordered = {"seed": 0, "data": {"invert": False, "image_size": 96}, "client_id": 0, "dataset": "digits"}
    # execute
    base = fingerprint(KEY)
    # assert
    assert fingerprint(reordered) == base
    assert len({fingerprint(v) for v in variants} | {base}) == len(variants) + 1
    assert NodeCache.entry_name("trunk", KEY) != NodeCache.entry_name("partition", KEY)
    with pytest.raises(TypeError, match="not JSON data"):
        fingerprint({"path": Path("/tmp")})


def test_second_load_returns_identical_tensors_without_building(tmp_path) -> None:
    # prepare
    build = Builder(_tensors())
    first = NodeCache(tmp_path, max_bytes=2**30).get_or_build("partition", KEY, build)
    # execute: another NodeCache on the folder, as the next message's process has
    again = NodeCache(tmp_path, max_bytes=2**30).get_or_build("partition", KEY, build)
    # assert
    assert build.calls == 1 and first.built and not again.built
    a, b = first.tensors(), again.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a[k], v) for k, v in _tensors().items())


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest-file", "bad-manifest"])
def test_a_damaged_entry_is_detected_logged_and_rebuilt(tmp_path, damage) -> None:
    # prepare: a published entry, then damaged
    build = Builder(_tensors())
    NodeCache(tmp_path, max_bytes=2**30).get_or_build("trunk", KEY, build).close()
    data, manifest = _only_file(tmp_path, ".safetensors"), _only_file(tmp_path, ".json")
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        data.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0x01]) + raw[-4:])
    elif damage == "no-manifest-file":
        data.unlink()
    else:
        manifest.write_text("{not json")
    lines: list[str] = []
    cache = NodeCache(tmp_path, max_bytes=2**30, log_fn=lines.append)
    # execute
    missed = cache.load("trunk", KEY)
    entry = cache.get_or_build("trunk", KEY, build)
    # assert: never used, rebuilt, the event logged, and the rebuilt entry verifies
    assert missed is None and build.calls == 2 and entry.built
    assert any("corrupt" in line for line in lines), lines
    assert torch.equal(entry.tensors()["x"], _tensors()["x"])
    assert NodeCache(tmp_path, max_bytes=2**30).load("trunk", KEY) is not None


def _race(root: str, start: float, out: str) -> None:
    build = Builder(_tensors(), delay=0.5)
    while time.time() < start:
        time.sleep(0.001)
    entry = NodeCache(root, max_bytes=2**30).get_or_build("backbone", KEY, build)
    save_tensors(Path(out), entry.tensors())
    Path(out + ".built").write_text(str(build.calls))


def test_two_processes_racing_publish_one_valid_entry(tmp_path) -> None:
    # prepare: two processes that ask for the same missing entry at the same moment
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 0.5
    outs = [str(tmp_path / f"out{k}.safetensors") for k in range(2)]
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "cache"), start, out)) for out in outs]
    # execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    # assert: one build between them, one entry, both got the same tensors, and it verifies
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(int(Path(o + ".built").read_text()) for o in outs) == [0, 1]
    got = [load_file(o) for o in outs]
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)
    assert [e.kind for e in cache.entries()] == ["backbone"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    assert cache.load("backbone", KEY) is not None


def test_eviction_leaves_another_writers_temporary_file_alone(tmp_path) -> None:
    # prepare: another process is writing an entry (its temporary tensors file, no manifest yet); this one
    # publishes an entry of its own, which sweeps the folder
    cache = NodeCache(tmp_path, max_bytes=2**30)
    cache.root.mkdir(parents=True, exist_ok=True)
    theirs = tmp_path / ".tmp-partition-0123456789abcdef0123456789abcdef-999-deadbeef.safetensors"
    theirs.write_bytes(b"half written")
    # execute
    cache.get_or_build("backbone", KEY, lambda path: save_tensors(path, {"w": torch.zeros(2)}))
    # assert: theirs is still there (a sweep once took it, and the other writer failed)
    assert theirs.exists()


def test_eviction_keeps_the_folder_under_its_cap_least_recently_used_first(tmp_path) -> None:
    # prepare: three entries of one size, used in the order 0, 1, 2; then 0 used again
    for k in range(3):
        NodeCache(tmp_path, max_bytes=2**30).get_or_build("trunk", {**KEY, "client_id": k}, Builder(_tensors(k, 1024)))
        time.sleep(0.02)
    os.utime(tmp_path / f"{NodeCache.entry_name('trunk', {**KEY, 'client_id': 0})}.json")
    size = NodeCache(tmp_path, max_bytes=2**30).entries()[0].nbytes
    cache = NodeCache(tmp_path, max_bytes=int(2.5 * size))
    # execute: a fourth entry, this process's own, under a cap of two and a half entries
    cache.get_or_build("trunk", {**KEY, "client_id": 3}, Builder(_tensors(3, 1024)))
    # assert: at most the cap; the least recently used (1, then 2) went; the new one stayed
    kept = {e.key["client_id"] for e in cache.entries()}
    assert cache.total_bytes() <= cache.max_bytes
    assert kept == {0, 3}, kept


def test_streamed_tensor_file_is_a_safetensors_file_and_maps(tmp_path) -> None:
    # prepare
    chunks = [torch.randn(5, 3, 2), torch.randn(4, 3, 2)]
    # execute
    cache = NodeCache(tmp_path, max_bytes=2**30)
    entry = cache.get_or_build(
        "trunk", KEY, lambda p: write_tensor_stream(p, "features", (9, 3, 2), torch.float16, iter(chunks)), keep_bytes=False
    )
    # assert: safetensors reads it; the memmap holds the same values
    expected = torch.cat(chunks).to(torch.float16)
    assert torch.equal(load_file(tmp_path / f"{entry.name}.safetensors")["features"], expected)
    assert torch.equal(torch.from_numpy(entry.memmap("features").copy()), expected)
    with pytest.raises(ValueError, match="need"):
        write_tensor_stream(tmp_path / "short", "f", (10, 3, 2), torch.float32, iter(chunks))


def test_cache_ls_and_clear(tmp_path, capsys) -> None:
    # prepare: two entries
    for kind in ("partition", "backbone"):
        NodeCache(tmp_path, max_bytes=2**30).get_or_build(kind, KEY, Builder(_tensors()))
    # execute
    assert main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    cleared = capsys.readouterr().out
    assert main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    after = capsys.readouterr().out
    # assert
    assert "2 entries" in listed and "partition-" in listed and "backbone-" in listed
    assert "removed 2 entries" in cleared
    assert "0 entries" in after
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.json"))


def test_cache_folder_defaults(tmp_path, monkeypatch) -> None:
    from feddtl.config import ConfigError
    from feddtl.config.node_cache_config import DIR_ENV, NodeCacheConfig

    monkeypatch.chdir(tmp_path)
    assert NodeCacheConfig().folder({}) == tmp_path / "feddtl-node-cache"
    assert NodeCacheConfig().folder({"FLWR_HOME": "/f"}) == Path("/f/feddtl-node-cache")
    assert NodeCacheConfig().folder({"FLWR_HOME": "/f", DIR_ENV: "/e"}) == Path("/e")
    config = NodeCacheConfig.from_node_config({"cache-dir": "/n", "cache-max-mb": 0, "partition-id": 1})
    assert config.folder({DIR_ENV: "/e"}) == Path("/n") and not config.enabled
    with pytest.raises(ConfigError, match="cache-max-mb"):
        NodeCacheConfig.from_node_config({"cache-max-mb": "lots"})
