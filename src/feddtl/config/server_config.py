"""Configuration of the server's text-encoder alignment step (DESIGN.md, "One round", step 3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Cross-entropy training of the text LoRA on the uploaded (embedding, label) pairs."""

    text_epochs: int = 1
    """Passes over the round's uploaded embeddings (ours; the paper does not give it)."""
    text_lr: float = 1e-3
    """Adam learning rate of the text LoRA (ours). The server's Adam state carries across rounds."""
    text_batch_size: int = 64
    """Mini-batch size of the text step."""

    def validate(self) -> None:
        if self.text_epochs < 0:
            raise ValueError(f"server.text_epochs must be >= 0, got {self.text_epochs}")
        if self.text_lr <= 0:
            raise ValueError(f"server.text_lr must be > 0, got {self.text_lr}")
        if self.text_batch_size < 1:
            raise ValueError(f"server.text_batch_size must be >= 1, got {self.text_batch_size}")
