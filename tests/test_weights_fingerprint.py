"""The backbone weights fingerprint: what it reads, what it tells apart, and that it costs little."""

from __future__ import annotations

import time

import pytest

from feddtl.backbones.base import BackboneError
from feddtl.backbones.fingerprint import (
    HEAD_TAIL_BYTES,
    SAMPLE_BLOCK_BYTES,
    SAMPLE_BLOCKS,
    WHOLE_FILE_BYTES,
    model_dir_files,
    sample_spans,
    weights_fingerprint,
)


def _model_dir(folder, weights: bytes, config: str = "{}"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config)
    (folder / "vocab.json").write_text('{"a": 0}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_sample_spans_cover_small_files_whole_and_bound_large_ones() -> None:
    assert sample_spans(100) == [(0, 100)]
    size = 1 << 30
    spans = sample_spans(size)
    assert spans[0] == (0, HEAD_TAIL_BYTES) and spans[-1] == (size - HEAD_TAIL_BYTES, HEAD_TAIL_BYTES)
    assert len(spans) == SAMPLE_BLOCKS + 2 and all(0 <= o and o + n <= size for o, n in spans)
    assert sum(n for _, n in spans) == 2 * HEAD_TAIL_BYTES + SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES
    assert sample_spans(WHOLE_FILE_BYTES + 1)[-1][0] + HEAD_TAIL_BYTES == WHOLE_FILE_BYTES + 1


def test_model_dir_files_prefer_safetensors_and_ignore_extras(tmp_path) -> None:
    folder = _model_dir(tmp_path / "m", b"w" * 10)
    (folder / "pytorch_model.bin").write_bytes(b"old")
    (folder / "README.md").write_text("notes")
    (folder / "tokenizer.json").write_text("{}")
    assert [p.name for p in model_dir_files(folder)] == ["config.json", "model.safetensors", "vocab.json"]
    with pytest.raises(BackboneError, match="no \\*.safetensors or \\*.bin"):
        model_dir_files(tmp_path)


def test_fingerprint_tells_apart_weights_config_and_size_not_place_or_extras(tmp_path) -> None:
    # prepare: one model, a copy elsewhere with an extra read-me, and three variants
    big = bytes(range(256)) * ((WHOLE_FILE_BYTES // 256) + 4096)  # sampled, not read whole
    base = weights_fingerprint(f"hf-clip:{_model_dir(tmp_path / 'a', big)}")
    copy = _model_dir(tmp_path / "b", big)
    (copy / "README.md").write_text("a copy")
    changed_block = bytearray(big)
    changed_block[HEAD_TAIL_BYTES + 10] ^= 1  # inside the first sampled block
    # execute / assert
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 16
    assert weights_fingerprint(f"hf-clip:{copy}") == base
    assert weights_fingerprint(f"hf-clip:{_model_dir(tmp_path / 'c', bytes(changed_block))}") != base
    assert weights_fingerprint(f"hf-clip:{_model_dir(tmp_path / 'd', big[:-1])}") != base
    other_config = _model_dir(tmp_path / "e", big, config='{"x": 1}')
    assert weights_fingerprint(f"hf-clip:{other_config}") != base


def test_unknown_or_missing_weights_raise() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        weights_fingerprint("resnet")
    with pytest.raises(BackboneError, match="not in this machine's Hugging Face cache"):
        weights_fingerprint("hf-clip:feddtl-tests/no-such-model")


def test_lite_fingerprint_is_cheap() -> None:
    weights_fingerprint("lite")  # the page cache warm, as on a node that ran before
    started = time.perf_counter()
    fingerprint = weights_fingerprint("lite")
    elapsed = time.perf_counter() - started
    assert fingerprint.startswith("sha256:")
    assert elapsed < 1.0, f"lite fingerprint took {elapsed:.2f} s"  # ~0.03 s measured; a full hash 0.3 s
