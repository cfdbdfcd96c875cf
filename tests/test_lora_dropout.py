"""lora.dropout acts on the LoRA branch in the SFT stage's training steps only, seeded, on both backbones."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch

from feddtl.algorithm.client import client_step, rl_reference_logprobs
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.base import Backbone
from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import load_config
from feddtl.config.lora_config import LoraConfig
from feddtl.federation import Federation, build_federation
from feddtl.methods.fedlora import FedLoRA
from feddtl.methods.state import unprefixed
from feddtl.methods.text_side import with_base_text
from feddtl.server.experiment import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32, num_layers=4)


def _random_lora(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero LoRA weights: at peft's init (B = 0) the LoRA branch, and so its dropout, adds nothing."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


# ----- the backbone's switch ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["lite", "tiny-clip"])
def backbone(request, clip_dir) -> Backbone:
    if request.param == "lite":
        from feddtl.backbones.lite import LiteBackbone

        bb: Backbone = LiteBackbone(image_size=32)
    else:
        bb = HFClipBackbone(str(clip_dir))
    bb.add_lora(LoraConfig(dropout=0.5))
    bb.load_image_lora(_random_lora(bb.image_lora_state(), 1))
    bb.load_text_lora(_random_lora(bb.text_lora_state(), 2))
    return bb


@torch.no_grad()
def _embed(bb: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = bb.image_tail(bb.image_trunk(pixels))
    text = bb.text_tail(bb.text_trunk(bb.tokenize(["a photo of a cat.", "a photo of a dog."])))
    return image, text


def test_lora_dropout_acts_only_inside_the_block_and_only_on_lora(backbone):
    # prepare
    plain = _embed(backbone)
    rng_before = torch.get_rng_state()
    # execute
    with backbone.lora_dropout(seed=7):
        training = [name for name, m in backbone.named_modules() if m.training]
        first = _embed(backbone)
    with backbone.lora_dropout(seed=7):
        again = _embed(backbone)
    with backbone.lora_dropout(seed=8):
        other_seed = _embed(backbone)
    after = _embed(backbone)
    # assert: both towers change inside, reproducibly from the seed; only LoRA dropout modules train
    # (the towers' own dropout, e.g. MiniLM's, stays off); everything is back to eval mode after
    for tower in (0, 1):
        assert not torch.equal(first[tower], plain[tower])
        assert torch.equal(first[tower], again[tower])
        assert not torch.equal(first[tower], other_seed[tower])
        assert torch.equal(after[tower], plain[tower])
    assert training and all(".lora_dropout." in name for name in training)
    assert not any(m.training for m in backbone.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG outside is untouched


def test_zero_dropout_builds_no_dropout_and_the_block_is_a_no_op(clip_dir):
    # prepare
    bb = HFClipBackbone(str(clip_dir))
    bb.add_lora(LoraConfig(dropout=0.0))
    bb.load_image_lora(_random_lora(bb.image_lora_state(), 1))
    plain = _embed(bb)
    # execute
    with bb.lora_dropout(seed=7):
        training = [name for name, m in bb.named_modules() if m.training]
        inside = _embed(bb)
    # assert
    assert training == []
    assert torch.equal(inside[0], plain[0]) and torch.equal(inside[1], plain[1])


# ----- the client step ---------------------------------------------------------------------------------


def _federation(clip_dir, dropout: float) -> Federation:
    config = load_config(
        "tiny",
        [f"backbone=hf-clip:{clip_dir}", f"lora.dropout={dropout}", "data.image_size=32", "data.test_per_class=5",
         "shots=4"],
    )
    return build_federation(config, log_fn=lambda s: None)


@pytest.fixture(scope="module")
def feds(clip_dir) -> dict[float, Federation]:
    return {p: _federation(clip_dir, p) for p in (0.0, 0.5)}


def _task(fed: Federation, stage: str) -> ClientTask:
    bb = fed.backbone
    return ClientTask(
        round=1 if stage == "sft" else 3,
        stage=stage,  # type: ignore[arg-type]
        image_lora=_random_lora(bb.image_lora_state(), 3),
        class_embeddings=class_embeddings(bb, fed.base_text),
        sft_reference_lora=_random_lora(bb.image_lora_state(), 4) if stage == "rl" else None,
    )


def _step(fed: Federation, task: ClientTask, seed: int = 11) -> ClientUpdate:
    config = fed.config
    return client_step(fed.backbone, fed.clients[0], task, config.client, config.grpo, seed)


def _same(a: ClientUpdate, b: ClientUpdate) -> bool:
    return (
        all(torch.equal(a.image_lora[k], b.image_lora[k]) for k in a.image_lora)
        and torch.equal(a.embeddings, b.embeddings)
        and a.metrics == b.metrics
    )


def test_dropout_changes_the_sft_step_and_the_same_seed_repeats_it(feds):
    # prepare
    task = _task(feds[0.0], "sft")
    # execute
    without = _step(feds[0.0], task)
    with_dropout = _step(feds[0.5], task)
    torch.manual_seed(12345)  # whatever ran before must not matter: the masks come from the step's seed
    repeated = _step(feds[0.5], task)
    # assert
    assert any(not torch.equal(without.image_lora[k], with_dropout.image_lora[k]) for k in task.image_lora)
    assert _same(with_dropout, repeated)
    assert not any(m.training for m in feds[0.5].backbone.modules())


def test_dropout_changes_the_text_side_sft_step_too(feds):
    # prepare: FedLoRA's clients train both towers through methods.text_side (as PromptFL and FedPGP do)
    updates = {}
    for p, fed in feds.items():
        config = dataclasses.replace(fed.config, method="fedlora")
        method = build_method(dataclasses.replace(fed, config=config))
        task = method.make_task(1)
        task.image_lora = _random_lora(fed.backbone.image_lora_state(), 3)
        text_lora = _random_lora(fed.backbone.text_lora_state(), 5)
        task.extra = {**task.extra, **{f"text.{k}": v for k, v in text_lora.items()}}
        # execute
        updates[p] = FedLoRA.client_step(fed.backbone, with_base_text(fed.clients[0], fed.base_text), task, config, 11)
    # assert: both towers' LoRA come out different
    assert any(not torch.equal(updates[0.0].image_lora[k], updates[0.5].image_lora[k]) for k in updates[0.0].image_lora)
    text0, text5 = unprefixed(updates[0.0].extra, "text"), unprefixed(updates[0.5].extra, "text")
    assert any(not torch.equal(text0[k], text5[k]) for k in text0)


def test_rl_stage_runs_without_dropout(feds):
    # prepare: the same RL task on backbones with dropout 0 and 0.5
    task = _task(feds[0.0], "rl")
    batch, ref_mix = feds[0.0].config.client.batch_size, feds[0.0].config.grpo.ref_mix
    # execute
    refs = {}
    for p, fed in feds.items():
        bb = fed.backbone
        bb.load_image_lora(task.image_lora)
        refs[p] = rl_reference_logprobs(
            bb, fed.clients[0], lambda: task.class_embeddings, batch, ref_mix,
            load_sft=lambda: bb.load_image_lora(task.sft_reference_lora),
            load_global=lambda: bb.load_image_lora(task.image_lora),
        )
    steps = {p: _step(fed, task) for p, fed in feds.items()}
    # assert: pi_old and the hybrid reference, then the whole RL step (policy logits, ratios, uploaded
    # embeddings), are bit-identical: dropout never acts there
    assert torch.equal(refs[0.0][0], refs[0.5][0]) and torch.equal(refs[0.0][1], refs[0.5][1])
    assert _same(steps[0.0], steps[0.5])
