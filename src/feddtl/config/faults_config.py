"""Configuration of injected client faults ([faults]): the opt-in test harness in feddtl.server.faults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from feddtl.config.robustness_config import RobustnessConfig

FaultMode = Literal[
    "none",
    "raise",
    "timeout",
    "slow",
    "drop",
    "nan_lora",
    "inf_embeddings",
    "bad_shape",
    "bad_keys",
    "huge_norm",
    "bad_embed_dim",
    "bad_labels",
    "too_many_embeddings",
    "unnormalised",
    "bad_num_samples",
    "wrong_client_id",
    "sign_flip",
    "scaled",
    "label_flip",
    "collude",
]

ATTACKS = ("sign_flip", "scaled", "label_flip", "collude")
"""The fault modes that are attacks: well-formed updates that pass validation (robust aggregation and the
embedding check are what meet them)."""


@dataclass
class FaultConfig:
    """Faults injected around the in-process client call, for tests and demos (never inside the algorithm)."""

    mode: FaultMode = "none"
    """What a hit client does: "raise" (an exception), "timeout" (hangs past robustness.client_timeout_s
    until released), "slow" (sleeps faults.delay_s, then trains and answers normally), "drop" (no reply), or uploads a corrupt update: "nan_lora" (a NaN in its LoRA), "inf_embeddings" (an inf in its
    embeddings), "bad_shape", "bad_keys", "huge_norm" (LoRA weights x 1e6), "bad_embed_dim",
    "bad_labels" (a class it does not hold), "too_many_embeddings" (one more than the cap),
    "unnormalised" (embeddings x 3), "bad_num_samples" (claims 1e9 images), "wrong_client_id". Or an
    attack that passes validation: "sign_flip" (its change to the global weights, negated and x
    faults.attack_scale), "scaled" (its change x faults.attack_scale), both shrunk to stay inside
    robustness.max_update_norm; "label_flip" (its uploaded embeddings relabelled by a cyclic shift of its
    own classes); "collude" (every hit client of a round sends the first one's sign_flip weights). Methods
    without an image LoRA (promptfl, fedpgp) get the LoRA corruptions and attacks in their uploaded
    prompt tensors."""
    clients: list[int] | None = None
    """Client ids that may be hit; None: every client."""
    rounds: list[int] | None = None
    """Rounds in which faults happen; None: every round."""
    probability: float = 1.0
    """Chance that an eligible client is hit, drawn per (round, client, attempt) from faults.seed."""
    attempts: int | None = None
    """Hit only the first this many attempts of a round, so a retry can succeed; None: every attempt."""
    seed: int = 0
    """Seed of the probability draws (independent of the experiment seed)."""
    delay_s: float = 3600.0
    """How long a "slow" client sleeps before its step, and the longest a "timeout" client hangs."""
    attack_scale: float = 10.0
    """The factor of "sign_flip", "scaled" and "collude" on the client's change to the global weights; an
    attacked update that would exceed robustness.max_update_norm is shrunk to 0.99 of it (so it passes)."""

    def validate(self, num_clients: int, rounds: int, robustness: RobustnessConfig) -> None:
        if not 0 <= self.probability <= 1:
            raise ValueError(f"faults.probability must be in [0, 1], got {self.probability}")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"faults.attempts must be >= 1 or none, got {self.attempts}")
        if self.delay_s < 0:
            raise ValueError(f"faults.delay_s must be >= 0, got {self.delay_s}")
        if not self.attack_scale > 0:
            raise ValueError(f"faults.attack_scale must be > 0, got {self.attack_scale}")
        bad = [k for k in self.clients or [] if not 0 <= k < num_clients]
        if bad:
            raise ValueError(f"faults.clients {bad} are not client ids; allowed: 0..{num_clients - 1}")
        bad = [t for t in self.rounds or [] if not 1 <= t <= rounds]
        if bad:
            raise ValueError(f"faults.rounds {bad} are not rounds; allowed: 1..{rounds}")
        if self.mode == "collude" and self.clients is not None and len(set(self.clients)) < 2:
            raise ValueError(f'faults.mode = "collude" needs at least two faults.clients (or none: all), got {self.clients}')
        if self.mode == "timeout" and robustness.client_timeout_s is None:
            raise ValueError('faults.mode = "timeout" needs robustness.client_timeout_s (a client can only time out under a limit)')
        if self.mode == "huge_norm" and robustness.max_update_norm is None and robustness.validate_updates:
            raise ValueError('faults.mode = "huge_norm" needs robustness.max_update_norm to be caught; set a bound')
