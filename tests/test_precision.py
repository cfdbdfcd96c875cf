"""`precision = "bfloat16"`: mixed precision of the hf-clip towers. On CUDA it is torch.autocast(bfloat16); on a
CPU the run keeps float32 with a warning and results.json says so. The autocast code path itself is exercised here
with torch's CPU autocast (bfloat16), which the backbone honours when asked directly."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch
import torch.nn.functional as F

import feddtl.federation as federation
from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cache import CacheConfig, TrunkCache
from feddtl.config import ConfigError, load_config
from feddtl.config.lora_config import LoraConfig
from feddtl.server.experiment import run_experiment
from feddtl.server.rundir import result_fields

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32, num_layers=4)


def _config(clip_dir, *extra: str):
    return load_config("tiny", [f'backbone="hf-clip:{clip_dir}"', "device=cpu", "rounds=2", "client.switch_round=1",
                                "eval.every=1", *extra])


def test_precision_is_checked_with_the_backbone():
    with pytest.raises(ConfigError, match="precision='bfloat16' needs an hf-clip backbone"):
        load_config("tiny", ["precision=bfloat16"])  # tiny is the lite backbone
    with pytest.raises(ConfigError, match="precision='float16' is not allowed; allowed: 'float32', 'bfloat16'"):
        load_config("tiny", ["precision=float16"])
    assert load_config("tiny").precision == "float32"


def test_cpu_autocast_runs_the_bf16_path_and_returns_float32(clip_dir):
    # prepare: two copies of one backbone with one LoRA, one in bfloat16 autocast
    torch.manual_seed(0)
    exact = HFClipBackbone(str(clip_dir))
    exact.add_lora(LoraConfig())
    mixed = HFClipBackbone(str(clip_dir))
    mixed.add_lora(LoraConfig())
    mixed.load_state_dict(exact.state_dict())
    mixed.set_precision(torch.bfloat16)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = exact.tokenize(["a photo of a cat.", "a photo of a dog."])
    # execute
    outs = {}
    for name, bb in (("exact", exact), ("mixed", mixed)):
        image = bb.image_tail(bb.image_trunk(pixels))
        text = bb.text_tail(bb.text_trunk(tokens))
        loss = F.cross_entropy(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T * 10, torch.tensor([0, 1, 0]))
        loss.backward()
        outs[name] = (image, text, [p.grad for p in bb.image_lora_parameters()])
    # assert: float32 out of both; bfloat16 arithmetic inside the mixed one (close, not equal)
    (ie, te, ge), (im, tm, gm) = outs["exact"], outs["mixed"]
    assert im.dtype == tm.dtype == torch.float32 and (mixed.precision, exact.precision) == ("bfloat16", "float32")
    assert not torch.equal(im, ie) and torch.allclose(im, ie, atol=0.1, rtol=0.05)
    assert torch.allclose(tm, te, atol=0.1, rtol=0.05)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in gm)
    assert any(g.abs().sum() > 0 for g in gm)  # the LoRA B of the mixed copy gets a gradient


def test_bf16_on_cpu_warns_runs_float32_and_says_so(clip_dir, tmp_path, caplog):
    # execute: the same seed in float32 and with precision = "bfloat16" on a CPU device
    plain = run_experiment(_config(clip_dir), tmp_path / "fp32", progress=False, log_fn=lambda s: None)
    with caplog.at_level(logging.WARNING, logger="feddtl.federation"):
        asked = run_experiment(_config(clip_dir, "precision=bfloat16"), tmp_path / "bf16", progress=False,
                               log_fn=lambda s: None)
    # assert: one warning, float32 recorded and used (the same numbers); a float32 run's results.json is as before
    assert any("runs in float32" in r.getMessage() for r in caplog.records)
    assert "precision" not in plain and asked["precision"] == "float32"
    assert json.loads((tmp_path / "bf16" / "results.json").read_text())["precision"] == "float32"
    metrics = [[result_fields(json.loads(line)) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("fp32", "bf16")]
    assert metrics[0] == metrics[1]
    weights = [(tmp_path / d / "final_lora.safetensors").read_bytes() for d in ("fp32", "bf16")]
    assert weights[0] == weights[1]


def test_a_whole_run_in_cpu_autocast(clip_dir, tmp_path, monkeypatch):
    # prepare: let the run take bfloat16 on the CPU, as it would on CUDA
    monkeypatch.setattr(federation, "autocast_dtype", lambda config, device: torch.bfloat16)
    # execute
    results = run_experiment(_config(clip_dir, "precision=bfloat16", "method=feddtl"), tmp_path / "run",
                             progress=False, log_fn=lambda s: None)
    # assert: finished, recorded as bfloat16, accuracies are numbers
    assert results["precision"] == "bfloat16"
    assert all(0.0 <= results[k] <= 100.0 for k in ("base_acc", "novel_acc", "local_acc"))


def test_trunk_cache_stays_in_ram_on_a_cpu_run(clip_dir):
    backbone = HFClipBackbone(str(clip_dir))
    cache = TrunkCache(CacheConfig(device_budget_mb=1024.0), backbone, image_size=32, log_fn=lambda s: None)
    assert cache.device_budget == 0  # the device budget is for CUDA runs only
    assert cache.summary()["stores_on_device"] == 0
    with pytest.raises(ConfigError, match="cache.device_budget_mb must be >= 0"):
        load_config("tiny", ["cache.device_budget_mb=-1"])
