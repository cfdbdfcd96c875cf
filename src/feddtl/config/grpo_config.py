"""Configuration of the stage-2 GRPO-style local RL objective (DESIGN.md, "Stage 2")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class GRPOConfig:
    """Group-relative policy optimisation on latent-noise actions."""

    group_size: int = 3
    """G: noisy copies of each image embedding, one action each (paper: 3). Must be >= 2."""
    sigma: float = 0.1
    """Standard deviation of the Gaussian latent noise (paper: 0.1). See DESIGN.md, known trap 2."""
    noise_space: Literal["embedding", "features"] = "embedding"
    """Where the noise goes: "embedding" adds it to the L2-normalised embedding z (as DESIGN.md
    writes it, z_j = z + eps_j); "features" adds it to the tower's unnormalised output and
    normalises afterwards (the perturbation is then relative to that output's norm)."""
    action: Literal["argmax", "sample"] = "argmax"
    """How a noisy embedding becomes an action: the argmax class of its logits, or a class sampled
    from softmax of its logits."""
    clip_eps: float = 0.2
    """Clip range epsilon of the ratio (paper: 0.2)."""
    beta: float = 0.5
    """Weight of the k3 KL penalty to the hybrid reference (paper: 0.5)."""
    ref_mix: float = 0.5
    """Weight of the end-of-SFT model in the hybrid reference distribution; the latest global model
    gets 1 - ref_mix (paper: 0.5 / 0.5)."""
    adv_eps: float = 1e-4
    """delta in A = (r - mean) / (std + delta)."""

    def validate(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (a group needs two actions to compare), got {self.group_size}")
        if self.sigma < 0:
            raise ValueError(f"grpo.sigma must be >= 0, got {self.sigma}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"grpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if not 0 <= self.ref_mix <= 1:
            raise ValueError(f"grpo.ref_mix must be in [0, 1], got {self.ref_mix}")
        if self.adv_eps <= 0:
            raise ValueError(f"grpo.adv_eps must be > 0, got {self.adv_eps}")
