"""Options of the dual-encoder backbone ([backbone_options])."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BackboneConfig:
    """Options of the dual-encoder backbone."""

    template: str = "a photo of a {}."
    """Prompt template; {} is replaced by the class name."""
    logit_scale: float | None = None
    """s in softmax(s <z, t>). None: the backbone's own (CLIP's learned 1/tau; 100 for lite)."""
    bridge_top_k: int | None = 10
    """lite only: ImageNet classes kept in the probability-weighted bridge (None: all 1000)."""
    bridge_temperature: float = 1.0
    """lite only: temperature of the ImageNet classifier softmax in the bridge."""
