"""When and how the global model is evaluated ([eval])."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """When and how the global model is evaluated."""

    every: int = 5
    """Evaluate every this many rounds (and always after the last round)."""
    batch_size: int = 256
    """Batch size of evaluation forward passes (separate from the training batch size)."""
