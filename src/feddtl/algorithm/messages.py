"""What travels between server and clients in one round: plain tensors and numbers only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Stage = Literal["sft", "rl"]


@dataclass
class ClientTask:
    """Server -> client at the start of a round."""

    round: int
    """1-based round number."""
    stage: Stage
    """Local training stage: supervised warm-start or GRPO-style RL."""
    image_lora: dict[str, torch.Tensor]
    """Global image-encoder LoRA weights."""
    class_embeddings: torch.Tensor
    """(C_base, D) L2-normalised text embeddings of the base classes from the server's text encoder."""
    sft_reference_lora: dict[str, torch.Tensor] | None = None
    """Global image LoRA at the end of the SFT stage (round M); the RL stage's KL reference mixes it
    with the latest global model. None in SFT rounds."""
    text_lora: dict[str, torch.Tensor] | None = None
    """Global text LoRA, for methods whose clients train the text tower too (FedLoRA-style baselines)."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Method-specific tensors (e.g. PromptFL's context vectors and prompt token ids). Empty for FedDTL."""


@dataclass
class ClientUpdate:
    """Client -> server at the end of a round."""

    client_id: int
    num_samples: int
    """n_k: local training images, the aggregation weight."""
    image_lora: dict[str, torch.Tensor]
    embeddings: torch.Tensor
    """(n, D) L2-normalised image embeddings of (a per-class-capped subsample of) the training images."""
    labels: torch.Tensor
    """(n,) base-class indices of those embeddings."""
    metrics: dict[str, float] = field(default_factory=dict)
    text_lora: dict[str, torch.Tensor] | None = None
    """Local text LoRA, only for methods whose clients train the text tower."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Method-specific tensors (e.g. PromptFL's trained context vectors). Empty for FedDTL."""
