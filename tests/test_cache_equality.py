"""A run with the trunk cache equals the same run without it (same seed), and records its accounting."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import load_config
from feddtl.server.experiment import run_experiment

# One SFT round and one RL round, evaluated after each: every code path that reads trunk features.
SHORT = ["rounds=2", "client.switch_round=1", "eval.every=1"]
COMPARED = ("client_", "text_loss", "base_acc", "novel_acc", "hm", "local_acc")


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _compared(row: dict) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key.startswith(COMPARED):
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                out[f"{key}[{i}]"] = v
    return out


@pytest.mark.parametrize(
    "backbone",
    [
        "tiny-clip",  # seconds: a random 4-layer CLIP, the trunk/tail split of a ViT
        pytest.param("lite", marks=pytest.mark.slow),  # the tiny preset as shipped (BatchNorm convs)
    ],
)
def test_cached_and_uncached_runs_agree(tmp_path, backbone):
    # prepare
    quiet = dict(progress=False, log_fn=lambda s: None)
    options = list(SHORT)
    if backbone == "tiny-clip":
        options.append(f"backbone=hf-clip:{build_tiny_clip(tmp_path / 'clip', image_size=32)}")
    # execute
    cached = run_experiment(load_config("tiny", options), tmp_path / "on", **quiet)
    uncached = run_experiment(load_config("tiny", options + ["cache.enabled=false"]), tmp_path / "off", **quiet)
    # assert: same losses and accuracies, round by round, to 1e-5
    on, off = _metrics(tmp_path / "on"), _metrics(tmp_path / "off")
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        va, vb = _compared(a), _compared(b)
        assert va.keys() == vb.keys() and "client_loss[0]" in va and "base_acc[0]" in va
        for key in va:
            assert math.isclose(va[key], vb[key], rel_tol=1e-5, abs_tol=1e-5), (a["round"], key, va[key], vb[key])
    assert cached["cache"]["enabled"] and cached["cache"]["memory_mb"] > 0
    assert not uncached["cache"]["enabled"] and uncached["cache"]["memory_mb"] == 0
    # the accounting is the same either way, and consistent with the per-round rows
    for key in ("bytes_up_total", "upload_per_client_round_bytes", "upload_fraction_of_backbone"):
        assert cached[key] == uncached[key]
    per_client = [r["bytes_up_per_client"] for r in on]
    assert cached["upload_per_client_round_bytes"] == pytest.approx(sum(per_client) / len(per_client))
    assert cached["upload_fraction_of_backbone"] == pytest.approx(
        cached["upload_per_client_round_bytes"] / cached["backbone_param_bytes"]
    )
    assert sum(cached["bytes_up_parts_total"].values()) == cached["bytes_up_total"]
    assert all(r["rss_peak_client_mb"] > 0 and r["rss_peak_eval_mb"] > 0 for r in on)
    assert not (tmp_path / "on" / "cache").exists()
