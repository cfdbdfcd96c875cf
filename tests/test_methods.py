"""The baselines and ablations on a tiny random CLIP: what each trains, what travels, and that a
federation shared across methods (the bench's workers) gives the same runs as standalone ones."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import load_config
from feddtl.federation import build_federation
from feddtl.methods import available_methods, get_method
from feddtl.methods.promptfl import prompt_text_embeddings, prompt_tokens
from feddtl.methods.state import unprefixed
from feddtl.methods.text_side import with_base_text
from feddtl.server.experiment import build_method


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32, num_layers=4)


def _config(clip_dir, method: str = "feddtl", **extra):
    sets = [f"method={method}", f"backbone=hf-clip:{clip_dir}", "rounds=2", "client.switch_round=1", "eval.every=1",
            "data.image_size=32", "data.test_per_class=5", "shots=4"]
    return load_config("tiny", sets + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def fed(clip_dir):
    return build_federation(_config(clip_dir), log_fn=lambda s: None)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def _one_client_round(fed, method_name: str, round_num: int):
    config = _config(fed.config.backbone[len("hf-clip:"):], method_name)
    method = build_method(type(fed)(**{**vars(fed), "config": config}))
    data = with_base_text(fed.clients[0], fed.base_text)  # what the engines hand a text-training client
    if round_num > 1:  # reach the RL stage the way the loop does: SFT rounds first
        for t in range(1, round_num):
            task = method.make_task(t)
            method.server_update([method.client_step(fed.backbone, data, task, config, t)], t)
    task = method.make_task(round_num)
    update = method.client_step(fed.backbone, data, task, config, 123)
    return method, task, update


def test_registry_lists_every_baseline():
    assert {"zeroshot", "fedlora", "promptfl", "fedpgp", "feddtl-decoupled", "feddtl-twostage", "feddtl"} <= set(
        available_methods()
    )


def test_fedlora_trains_both_towers_and_uploads_no_embeddings(fed):
    _, task, update = _one_client_round(fed, "fedlora", 1)
    assert task.stage == "sft" and unprefixed(task.extra, "text")  # the global text LoRA travels in extra
    assert _changed(task.image_lora, update.image_lora)
    assert _changed(unprefixed(task.extra, "text"), unprefixed(update.extra, "text"))
    assert len(update.embeddings) == 0 and len(update.labels) == 0


def test_twostage_runs_grpo_on_both_towers_after_the_switch(fed):
    method, task, update = _one_client_round(fed, "feddtl-twostage", 2)
    assert task.stage == "rl"
    # end-of-SFT image and text LoRA
    assert task.sft_reference_lora is not None and unprefixed(task.extra, "sft_reference_text")
    assert {"reward", "silent_groups", "kl", "clip_fraction"} <= set(update.metrics)
    assert _changed(unprefixed(task.extra, "text"), unprefixed(update.extra, "text"))  # the text LoRA gets the RL gradient


def test_decoupled_never_enters_rl(fed):
    config = _config(fed.config.backbone[len("hf-clip:"):], "feddtl-decoupled", rounds=4, **{"client.switch_round": 1})
    method = get_method("feddtl-decoupled")(build_method(fed).ctx)
    method.config = config
    assert [method.make_task(t).stage for t in range(1, 5)] == ["sft"] * 4


def test_promptfl_trains_only_the_context(fed):
    image_before, text_before = fed.backbone.image_lora_state(), fed.backbone.text_lora_state()
    _, task, update = _one_client_round(fed, "promptfl", 1)
    assert not torch.equal(task.extra["context"], update.extra["context"])
    assert not _changed(image_before, fed.backbone.image_lora_state())
    assert not _changed(text_before, fed.backbone.text_lora_state())


def test_promptfl_initial_context_reproduces_the_plain_prompts(fed):
    names = ["cat", "dog"]
    tokens, context = prompt_tokens(fed.backbone, "a photo of a", names)
    with torch.no_grad():
        learned = prompt_text_embeddings(fed.backbone, context, tokens)
        plain = torch.nn.functional.normalize(fed.backbone.text_tail(fed.backbone.text_trunk(
            fed.backbone.tokenize([f"a photo of a {n}." for n in names]))), dim=-1)
    torch.testing.assert_close(learned, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_shared_federation_runs_equal_standalone_runs(clip_dir, tmp_path):
    from feddtl.bench.worker import run_cells
    from feddtl.server.rundir import result_fields
    from feddtl.server.experiment import run_experiment

    cfg_lora, cfg_dtl = _config(clip_dir, "fedlora"), _config(clip_dir, "feddtl")
    run_cells([(cfg_lora, tmp_path / "a"), (cfg_dtl, tmp_path / "b")], log_fn=lambda s: None)
    run_experiment(cfg_dtl, tmp_path / "solo", progress=False, log_fn=lambda s: None)

    def strip(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [result_fields(r) for r in rows]

    assert strip(tmp_path / "b") == strip(tmp_path / "solo")
    assert (tmp_path / "b" / "final_lora.safetensors").read_bytes() == (tmp_path / "solo" / "final_lora.safetensors").read_bytes()
