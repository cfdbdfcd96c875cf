"""Configuration of FedPGP's personalised low-rank prompt and its contrastive loss."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FedPGPConfig:
    """FedPGP: client i's context is sigma + U_i V_i (global sigma, personal low-rank U_i V_i).

    The context words and their learning rate come from ``[prompt]`` (``ctx_init``, ``lr``), as for PromptFL.
    """

    rank: int = 8
    """r, the bottleneck rank of the personal adaptation U_i (n_ctx x r) V_i (r x H) (reference code: 8)."""
    contrastive_weight: float = 1.0
    """lambda, the weight of the contrastive loss added to the local cross-entropy (reference code: 1.0);
    0 trains the personal prompt with cross-entropy alone."""
    temperature: float = 1.0
    """tau, the temperature dividing the two cosines of the contrastive loss (reference code: 1.0)."""

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"fedpgp.rank must be an integer >= 1, got {self.rank}")
        if not self.contrastive_weight >= 0:
            raise ValueError(f"fedpgp.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if not self.temperature > 0:
            raise ValueError(f"fedpgp.temperature must be > 0, got {self.temperature}")
