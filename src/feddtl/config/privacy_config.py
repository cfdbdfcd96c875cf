"""Configuration of differential privacy on what clients upload ([privacy]); off by default.

Two independent channels, each with its own unit of privacy and its own (epsilon, delta) target over the
whole run (docs/reliability.md, "Security"):
- the uploaded embeddings or prototypes: one image (its content; labels and counts are uploaded in the
  clear), Gaussian noise added by each client before upload, vectors renormalised afterwards;
- the image-LoRA update: one client, Flower's central DP with fixed clipping (the server clips each
  client's update, averages them uniformly and adds Gaussian noise to the average).
The noise multipliers are calibrated to the targets by an accountant (Google's dp-accounting, RDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIVATE_METHODS = ("feddtl", "feddtl-decoupled")
"""Methods that implement [privacy]: the ones with FedDTL's upload (image LoRA + embeddings or prototypes)."""


@dataclass
class PrivacyConfig:
    """Differential privacy of the uploads; every channel is off unless its epsilon is set."""

    upload_epsilon: float | None = None
    """Target epsilon of the uploaded embeddings or prototypes over all rounds, unit of privacy one image;
    none: no noise (the uploads are not private). Each client adds Gaussian noise to each vector before
    upload (sensitivity 2 for an embedding, 2 / n_c for the prototype of a class with n_c local images) and
    renormalises it."""
    upload_delta: float = 1e-5
    """Target delta of the upload channel, in (0, 1); well below 1 / (images per client)."""
    lora_epsilon: float | None = None
    """Target epsilon of the global image LoRA over all rounds, unit of privacy one client; none: off.
    Needs lora_clip_norm. Central DP as Flower's fixed clipping: the server clips each client's update,
    averages them with equal weights and adds N(0, (z C / m)^2) to the average (m clients aggregated).
    It needs many clients per round to leave any accuracy (BENCHMARKS.md)."""
    lora_delta: float = 1e-5
    """Target delta of the image-LoRA channel, in (0, 1); well below 1 / num_clients."""
    lora_clip_norm: float | None = None
    """C: the L2 norm each client's image-LoRA update (uploaded minus sent, all tensors together) is clipped
    to. Required with lora_epsilon; honest update norms are in metrics.jsonl (update_norm_max)."""
    seeded_noise: bool = True
    """True: the noise comes from generators of its own seeded from `seed` (reproducible runs). Whoever knows
    the seed can recompute the noise, so against a server that knows it (it chose it) the upload guarantee
    then holds only in the simulation's sense; false: noise from the OS's entropy (what a deployment needs;
    runs are then not reproducible)."""

    @property
    def upload_private(self) -> bool:
        return self.upload_epsilon is not None

    @property
    def lora_private(self) -> bool:
        return self.lora_epsilon is not None

    @property
    def enabled(self) -> bool:
        return self.upload_private or self.lora_private

    def validate(self, method: str) -> None:
        for name in ("upload", "lora"):
            epsilon, delta = getattr(self, f"{name}_epsilon"), getattr(self, f"{name}_delta")
            if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
                raise ValueError(f"privacy.{name}_epsilon must be > 0 and finite, or none (off); got {epsilon}")
            if not 0 < delta < 1:
                raise ValueError(f"privacy.{name}_delta must be in (0, 1); got {delta}")
        if self.lora_private and self.lora_clip_norm is None:
            raise ValueError("privacy.lora_epsilon needs privacy.lora_clip_norm (> 0): the noise is calibrated to the clip")
        if self.lora_clip_norm is not None and not (self.lora_clip_norm > 0 and math.isfinite(self.lora_clip_norm)):
            raise ValueError(f"privacy.lora_clip_norm must be > 0 and finite, or none; got {self.lora_clip_norm}")
        if self.lora_clip_norm is not None and not self.lora_private:
            raise ValueError("privacy.lora_clip_norm is set but privacy.lora_epsilon is none: set both, or neither")
        if self.enabled and method not in PRIVATE_METHODS:
            raise ValueError(
                f"privacy.upload_epsilon / privacy.lora_epsilon apply to method {', '.join(PRIVATE_METHODS)}; "
                f"got method={method!r}"
            )
