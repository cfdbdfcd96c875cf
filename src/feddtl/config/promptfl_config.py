"""Configuration of PromptFL's learnable text context (CoOp-style soft prompt)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptConfig:
    """CoOp context vectors prepended to the class name in the text tower's input."""

    ctx_init: str = "a photo of a"
    """Words whose token embeddings initialise the context vectors; their token count is n_ctx
    (4 for "a photo of a" with both lite's and CLIP's tokenizers). Prompts are "<ctx> {class}."."""
    lr: float | None = None
    """Adam learning rate of the context vectors; None: client.lr."""

    def validate(self) -> None:
        if not self.ctx_init.strip():
            raise ValueError("prompt.ctx_init must be non-empty words, e.g. 'a photo of a'")
        if "{}" in self.ctx_init:
            raise ValueError("prompt.ctx_init is the context words only; the class name follows it, no {} needed")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"prompt.lr must be > 0 or none, got {self.lr}")
