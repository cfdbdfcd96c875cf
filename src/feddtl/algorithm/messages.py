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
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Empty for FedDTL. The one opaque slot other methods carry their own tensors in (FedLoRA's text LoRA,
    PromptFL's context and prompt tokens, ...): the server loop, the wire format and the accounting pass
    it through untouched, so a method stays one file."""


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
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Empty for FedDTL; other methods' own tensors (see ``ClientTask.extra``), checked against
    ``Method.update_extra_reference`` before aggregation."""
