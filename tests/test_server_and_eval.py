"""Server text step and evaluation on a tiny local CLIP (offline, random weights)."""

import pytest
import torch

from feddtl.algorithm.server import class_embeddings, text_alignment_loss, text_alignment_step
from feddtl.config.server_config import ServerConfig
from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.config.lora_config import LoraConfig
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.evaluation import harmonic_mean, local_accuracy
from feddtl.federation import prompt_features


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    path = build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")
    backbone = HFClipBackbone(str(path))
    backbone.add_lora(LoraConfig(rank=2))
    return backbone


def test_server_text_step_lowers_its_loss(tiny_backbone):
    # prepare: embeddings clustered around 3 random directions, labelled by cluster
    text = prompt_features(tiny_backbone, ["cat", "dog", "car"], "a photo of a {}.")
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, tiny_backbone.info.embed_dim, generator=g), dim=-1)
    labels = torch.arange(3).repeat(20)
    emb = torch.nn.functional.normalize(centres[labels] + 0.1 * torch.randn(60, centres.shape[1], generator=g), dim=-1)
    before_T = class_embeddings(tiny_backbone, text)
    opt = torch.optim.Adam(tiny_backbone.text_lora_parameters(), lr=1e-2)
    # execute
    metrics = text_alignment_step(tiny_backbone, text, emb, labels, opt, ServerConfig(text_epochs=5), g)
    # assert
    assert metrics["text_loss_after"] < metrics["text_loss_before"]
    assert metrics["text_loss_after"] == pytest.approx(text_alignment_loss(tiny_backbone, text, emb, labels))
    assert not torch.allclose(class_embeddings(tiny_backbone, text), before_T)


def test_harmonic_mean():
    assert harmonic_mean(90.0, 60.0) == pytest.approx(72.0)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_local_accuracy_restricts_to_client_classes():
    # logits favour class 2 everywhere; client 0 holds classes {0, 1} so class 2 is not a choice for it
    logits = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 5.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2])
    acc = local_accuracy(logits, labels, [[0, 1], [2]])
    assert acc == [100.0, 100.0]
