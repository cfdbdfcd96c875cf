"""Client-level differential privacy of the global image LoRA (privacy.lora_epsilon): Flower's central DP
with fixed clipping, applied where FedDTL aggregates.

Flower's semantics (``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` with an
accountant): the server clips each client's update (uploaded minus sent, all tensors as one vector) to L2
norm C, averages the clipped updates with equal weights, and adds N(0, (z C / m)^2) to every coordinate of
the average, m the number of clients aggregated. One Gaussian release per round, accounted without
amplification by sampling (clients are picked by a public seeded draw) under add-or-remove-one-client.
Equal weights, not FedDTL's n_k / n: with sample weights one client could move the average by more than
C / m, and Flower's accounted mode refuses unequal weights for that reason.

Here in methods (not algorithm, which stays free of flwr): it wraps FedDTL's aggregation step, and it calls
Flower's own helpers (``compute_clip_model_update``, ``compute_stdv``) for the clip and the noise scale. The
noise itself is drawn from a seeded generator of the server's own (Flower's ``add_gaussian_noise_inplace``
draws from numpy's global generator, which would make runs irreproducible). The trust model is Flower's:
the server sees every update before the noise, so this protects clients from whoever sees the global
model (other clients, its users), not from the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from feddtl.algorithm.aggregation import weighted_average
from feddtl.algorithm.privacy import LORA_NOISE_TAG, epsilon_spent, noise_generator, noise_multiplier
from feddtl.config.privacy_config import PrivacyConfig


class CentralDP:
    """Clip, average with equal weights, add calibrated Gaussian noise; account one release per round."""

    def __init__(self, privacy: PrivacyConfig, rounds: int, seed: int) -> None:
        assert privacy.lora_epsilon is not None and privacy.lora_clip_norm is not None  # validated in config
        self.clip_norm = privacy.lora_clip_norm
        self.delta = privacy.lora_delta
        self.multiplier = noise_multiplier(privacy.lora_epsilon, privacy.lora_delta, rounds)
        """z, calibrated so that ``rounds`` releases spend the target (epsilon, delta)."""
        self.generator = noise_generator(seed, LORA_NOISE_TAG, privacy.seeded_noise)

    def aggregate(
        self, states: Sequence[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], round_num: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The noisy global image LoRA from the clients' ``states`` and the ``reference`` they were sent, and
        the round's metrics (spent epsilon after ``round_num`` releases, clipped fraction, noise std)."""
        from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

        keys = list(reference)
        sent = [reference[k].detach().cpu().numpy() for k in keys]
        clipped_states, clipped = [], 0
        for state in states:
            arrays = [state[k].detach().cpu().numpy().copy() for k in keys]
            norm = get_norm([a - s for a, s in zip(arrays, sent)])
            if norm > 0:  # Flower's clip divides by the norm; an unchanged update has nothing to clip
                compute_clip_model_update(arrays, sent, self.clip_norm)  # arrays := sent + clipped update
            clipped += norm > self.clip_norm
            clipped_states.append({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)})
        average = weighted_average(clipped_states, [1.0] * len(clipped_states))
        std = compute_stdv(self.multiplier, self.clip_norm, len(clipped_states))
        noisy = {
            k: v + (torch.randn(v.shape, generator=self.generator, dtype=torch.float32) * std).to(v.dtype)
            for k, v in average.items()
        }
        return noisy, {
            "dp_lora_epsilon": epsilon_spent(self.multiplier, round_num, self.delta),
            "dp_lora_delta": self.delta,
            "dp_lora_noise_multiplier": self.multiplier,
            "dp_lora_noise_std": std,
            "dp_lora_clipped_fraction": clipped / len(clipped_states),
        }
