"""Configuration of the LoRA adapters put on each tower's tail."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoraConfig:
    """LoRA (W = W0 + (alpha / r) * B A) on the tail blocks of both towers."""

    rank: int = 4
    """LoRA rank r (paper: 4)."""
    alpha: float = 8.0
    """LoRA scaling numerator; the update is scaled by alpha / rank (peft's default alpha, 8)."""
    dropout: float = 0.0
    """Dropout probability on the input of the LoRA branch (both towers), active only in the SFT stage's
    training steps: FedDTL's stage 1 and the local SFT of FedLoRA and the two-stage ablation (PromptFL and
    FedPGP share those steps but keep the LoRA at its zero init, so it changes nothing there). Everything
    else runs with it off: the RL stage (pi_old, the reference, the policy's log-probs and ratios), the
    uploaded embeddings, the server's text step and evaluation. The masks are seeded from the client step's
    seed, so a run stays reproducible. 0 (default): no dropout anywhere."""
    image_start_block: int | None = None
    """First image block that gets LoRA (the paper's l; blocks before it are the frozen trunk).
    None: the backbone's default (lite: 14 of 16 blocks; hf-clip: L - 2, i.e. 10 of 12 for ViT-B/16)."""
    text_start_block: int | None = None
    """First text block that gets LoRA (None: the backbone's default, the last two blocks)."""

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
