"""Shared by the methods whose clients run the text tower themselves (FedLoRA, the two-stage ablation,
PromptFL, FedPGP), unlike FedDTL, whose clients only see the server's fixed class embeddings T.

Their local training uses FedDTL's per-batch objectives (``algorithm.client.sft_loss`` / ``rl_loss``)
with T recomputed, with grad, at every step, so the text side trains along.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from feddtl.algorithm.client import ClientData, Params, rl_loss, sft_loss, train_epochs
from feddtl.backbones.base import Backbone, TextFeatures
from feddtl.config.client_config import ClientConfig
from feddtl.config.grpo_config import GRPOConfig


@dataclass
class TextClientData(ClientData):
    """A client's data plus the text-trunk features of the base-class prompts (class names are public)."""

    base_text: TextFeatures = field(default_factory=dict)


def with_base_text(data: ClientData, base_text: TextFeatures) -> TextClientData:
    """``data`` as a text-training client sees it: with the base prompts' text-trunk features."""
    return TextClientData(client_id=data.client_id, features=data.features, labels=data.labels, base_text=base_text)


def client_base_text(data: ClientData, method: str) -> TextFeatures:
    """The base prompts' text-trunk features a text-training client needs; a clear error without them."""
    if not isinstance(data, TextClientData) or not data.base_text:
        raise ValueError(
            f"client {data.client_id}: {method} runs the text tower on the client and needs its data as "
            "TextClientData with the base prompts' text-trunk features (see with_base_text)"
        )
    return data.base_text


def lora_params(backbone: Backbone, config: ClientConfig) -> Params:
    """Both towers' LoRA parameters for a client that trains them; with client.text_lr set, the text LoRA
    in a param group of its own with that learning rate (the image LoRA keeps client.lr)."""
    image, text = backbone.image_lora_parameters(), backbone.text_lora_parameters()
    if config.text_lr is None:
        return image + text  # one group, exactly as before text_lr existed
    return [{"params": image}, {"params": text, "lr": config.text_lr}]


def text_sft_epochs(
    backbone: Backbone,
    data: ClientData,
    text_fn: Callable[[], torch.Tensor],
    params: Params,
    epochs: int,
    config: ClientConfig,
    generator: torch.Generator,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Stage 1 with T = ``text_fn()`` at every step. ``extra_loss(T)``, if given, is added to each step's
    loss (FedPGP's contrastive term); its mean is reported as ``loss_extra``."""

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        T = text_fn()
        if extra_loss is None:
            return sft_loss(backbone, data, idx, T)
        loss, row = sft_loss(backbone, data, idx, T)
        extra = extra_loss(T)
        loss = loss + extra
        return loss, {**row, "loss": loss.item(), "loss_extra": extra.item()}

    # lora.dropout acts in these training steps only (both towers); seeded as in FedDTL's sft_epochs.
    with backbone.lora_dropout(generator.initial_seed()):
        return train_epochs(params, epochs, len(data), config, generator, batch)


def text_rl_epochs(
    backbone: Backbone,
    data: ClientData,
    text_fn: Callable[[], torch.Tensor],
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    params: Params,
    epochs: int,
    config: ClientConfig,
    grpo: GRPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Stage 2 with T = ``text_fn()`` at every step (actions are still sampled with T detached)."""
    return train_epochs(
        params, epochs, len(data), config, generator,
        lambda idx: rl_loss(backbone, data, idx, text_fn(), old_logprobs, ref_logprobs, grpo, generator),
    )
