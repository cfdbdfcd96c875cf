"""HFClipBackbone on a tiny random CLIP built offline: exact trunk/tail split, LoRA, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch

from feddtl.backbones.base import BackboneError
from feddtl.backbones.hf_clip import HFClipBackbone, clip_patch_size
from feddtl.config.lora_config import LoraConfig
from feddtl.backbones.tiny_clip import build_tiny_clip

NUM_LAYERS = 4
PROMPTS = ["a photo of a cat.", "a photo of a golden retriever dog.", "Hi", "an image of a 747 jet!"]


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, an output with pooler_output in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32, num_layers=NUM_LAYERS)


@pytest.fixture
def backbone(clip_dir):
    return HFClipBackbone(str(clip_dir))


def _pixels(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _image_embed(bb: HFClipBackbone, x: torch.Tensor) -> torch.Tensor:
    return bb.image_tail(bb.image_trunk(x))


def _text_embed(bb: HFClipBackbone, prompts: list[str]) -> torch.Tensor:
    return bb.text_tail(bb.text_trunk(bb.tokenize(prompts)))


def test_info_matches_the_saved_model(backbone):
    # prepare / execute: the backbone loaded in the fixture
    info = backbone.info
    # assert
    assert info.name.startswith("hf-clip:")
    assert (info.embed_dim, info.image_size) == (16, 32)
    assert (info.num_image_blocks, info.num_text_blocks) == (NUM_LAYERS, NUM_LAYERS)
    assert (backbone.image_start_block, backbone.text_start_block) == (NUM_LAYERS - 2, NUM_LAYERS - 2)
    assert backbone.logit_scale == pytest.approx(float(backbone.model.logit_scale.detach().exp()))
    assert backbone.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert not backbone.training


@pytest.mark.parametrize("image_start,text_start", [(0, 0), (3, 2)])
def test_tail_of_trunk_equals_clip_features(backbone, image_start, text_start):
    # prepare
    backbone.set_split(image_start, text_start)
    pixels = _pixels()
    tokens = backbone.tokenize(PROMPTS)
    # execute
    with torch.no_grad():
        image = _image_embed(backbone, pixels)
        text = backbone.text_tail(backbone.text_trunk(tokens))
        ref_image = _features(backbone.model.get_image_features(pixel_values=pixels))
        ref_text = _features(backbone.model.get_text_features(**tokens))
    # assert
    assert tokens["attention_mask"].min() == 0  # the batch really is padded
    assert image.shape == (3, 16) and text.shape == (len(PROMPTS), 16)
    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, ref_text, rtol=0, atol=1e-5)


def test_legacy_eos_id_pools_at_the_highest_token_id(backbone):
    # prepare: configs from before transformers PR #24773 carry eos_token_id == 2 and pool at argmax(id)
    backbone.model.text_model.eos_token_id = 2
    backbone.set_split(None, 1)
    tokens = backbone.tokenize(PROMPTS)
    # execute
    with torch.no_grad():
        text = backbone.text_tail(backbone.text_trunk(tokens))
        ref = _features(backbone.model.get_text_features(**tokens))
    # assert
    torch.testing.assert_close(text, ref, rtol=0, atol=1e-5)


def test_other_image_size_interpolates_positions(clip_dir):
    # prepare
    bb = HFClipBackbone(str(clip_dir), image_size=48)
    pixels = _pixels(size=48)
    # execute
    with torch.no_grad():
        image = _image_embed(bb, pixels)
        ref = _features(bb.model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True))
    # assert
    assert bb.info.image_size == 48
    torch.testing.assert_close(image, ref, rtol=0, atol=1e-5)


def test_image_size_of_one_patch_is_the_minimum(clip_dir):
    # prepare / execute: the tiny CLIP cuts 8 x 8 patches; 8 px is one patch, 7 px none
    bb = HFClipBackbone(str(clip_dir), image_size=8)
    with torch.no_grad():
        image = _image_embed(bb, _pixels(size=8))
    # assert
    assert image.shape == (3, bb.info.embed_dim) and torch.isfinite(image).all()
    assert clip_patch_size(str(clip_dir)) == 8
    with pytest.raises(BackboneError, match=r"image_size 7 is too small; .* the minimum is 8 px"):
        HFClipBackbone(str(clip_dir), image_size=7)


def test_add_lora_wraps_q_and_v_of_the_tail_only(backbone):
    # prepare
    pixels = _pixels()
    with torch.no_grad():
        before_image, before_text = _image_embed(backbone, pixels), _text_embed(backbone, PROMPTS)
    # execute
    backbone.add_lora(LoraConfig(rank=2, image_start_block=1, text_start_block=2))
    # assert: exactly q_proj / v_proj of blocks >= l in each tower carry LoRA
    wrapped = sorted(
        name for name, module in backbone.named_modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0
    )
    expected_image = [
        f"model.vision_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(1, NUM_LAYERS)
        for p in ("q_proj", "v_proj")
    ]
    expected_text = [
        f"model.text_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(2, NUM_LAYERS)
        for p in ("q_proj", "v_proj")
    ]
    assert wrapped == sorted(expected_image + expected_text)
    assert len(wrapped) == 2 * (NUM_LAYERS - 1) + 2 * (NUM_LAYERS - 2)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(backbone.image_lora_parameters()) == 2 * len(expected_image)  # lora_A and lora_B
    assert len(backbone.text_lora_parameters()) == 2 * len(expected_text)
    with torch.no_grad():  # LoRA starts at B = 0: outputs unchanged
        torch.testing.assert_close(_image_embed(backbone, pixels), before_image, rtol=0, atol=1e-6)
        torch.testing.assert_close(_text_embed(backbone, PROMPTS), before_text, rtol=0, atol=1e-6)


def test_gradient_step_on_image_loss_moves_image_lora_only(backbone):
    # prepare
    backbone.add_lora(LoraConfig(rank=2))
    image_before, text_before = backbone.image_lora_state(), backbone.text_lora_state()
    frozen_before = backbone.model.vision_model.encoder.layers[-1].self_attn.q_proj.base_layer.weight.clone()
    params = backbone.image_lora_parameters() + backbone.text_lora_parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    with torch.no_grad():
        text = _text_embed(backbone, PROMPTS[:2])
    # execute
    logits = backbone.logit_scale * torch.nn.functional.normalize(_image_embed(backbone, _pixels()), dim=-1) @ (
        torch.nn.functional.normalize(text, dim=-1).T
    )
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # assert
    image_after, text_after = backbone.image_lora_state(), backbone.text_lora_state()
    assert any(not torch.equal(image_before[k], image_after[k]) for k in image_before)
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert torch.equal(frozen_before, backbone.model.vision_model.encoder.layers[-1].self_attn.q_proj.base_layer.weight)


def test_image_lora_state_round_trip(clip_dir):
    # prepare: a trained-looking state on one backbone, a fresh backbone to receive it
    source, target = HFClipBackbone(str(clip_dir)), HFClipBackbone(str(clip_dir))
    for bb in (source, target):
        bb.add_lora(LoraConfig(rank=2))
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in source.image_lora_state().items()}
    source.load_image_lora(state)
    pixels = _pixels()
    # execute
    target.load_image_lora(source.image_lora_state())
    # assert
    loaded = target.image_lora_state()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(_image_embed(target, pixels), _image_embed(source, pixels), rtol=0, atol=0)
    with pytest.raises(ValueError):
        target.load_image_lora({k: v for k, v in list(state.items())[1:]})


@pytest.mark.parametrize("kind", ["missing", "empty_dir"])
def test_bad_path_gives_helpful_error(tmp_path, kind):
    # prepare
    path = tmp_path / "no_such_model"
    if kind == "empty_dir":
        path.mkdir()
    # execute / assert
    with pytest.raises(RuntimeError) as err:
        HFClipBackbone(str(path))
    message = str(err.value)
    assert "could not be found locally or downloaded" in message
    assert "huggingface-cli download" in message and "local directory" in message
