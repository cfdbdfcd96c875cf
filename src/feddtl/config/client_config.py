"""Configuration of a client's local round (DESIGN.md, "One round", step 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ClientConfig:
    """Local training of the image-encoder LoRA."""

    lr: float = 1e-3
    """Adam learning rate (paper: 1e-3). Adam starts fresh every local round: clients keep no optimiser state."""
    text_lr: float | None = None
    """Adam learning rate of the text LoRA on clients that train it (fedlora, feddtl-twostage); None:
    client.lr, one learning rate for both towers (the paper's FedLoRA). A tuning knob ("local text lr")."""
    batch_size: int = 64
    """Local mini-batch size (paper: 64)."""
    sft_epochs: int = 2
    """Local epochs in stage 1, supervised cross-entropy (paper: 2)."""
    rl_epochs: int = 3
    """Local epochs in stage 2, GRPO-style RL (paper: 3)."""
    switch_round: int | None = None
    """M: rounds 1..M run SFT, rounds after M run RL. None: rounds // 2 (the paper does not give M).
    Set it to `rounds` for SFT only, to 0 for RL from the start."""
    upload_cap_per_class: int | None = 64
    """At most this many image embeddings per class are uploaded per round (seeded subsample);
    None uploads all. Few-shot clients with fewer images per class upload everything."""
    upload: Literal["embeddings", "prototypes"] = "embeddings"
    """What a client uploads for the server's text step: "embeddings" (one L2-normalised embedding per
    uploaded image, as the paper does: they reveal information about the client's images) or
    "prototypes" (only the per-class mean of its images' normalised embeddings, renormalised: one vector
    per class it holds). See docs/reliability.md and BENCHMARKS.md for the accuracy cost."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}")
        if self.text_lr is not None and not self.text_lr > 0:
            raise ValueError(f"client.text_lr must be > 0 or none (client.lr), got {self.text_lr}")
        if self.batch_size < 1:
            raise ValueError(f"client.batch_size must be >= 1, got {self.batch_size}")
        if self.sft_epochs < 0 or self.rl_epochs < 0:
            raise ValueError("client.sft_epochs and client.rl_epochs must be >= 0")
        if self.switch_round is not None and self.switch_round < 0:
            raise ValueError(f"client.switch_round must be >= 0 or none, got {self.switch_round}")
        if self.upload_cap_per_class is not None and self.upload_cap_per_class < 1:
            raise ValueError(f"client.upload_cap_per_class must be >= 1 or none, got {self.upload_cap_per_class}")
