"""Configuration of failure handling ([robustness]): failing clients, timeouts, update validation."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RobustnessConfig:
    """What a round survives: failing clients, slow clients and malformed updates."""

    min_fit_fraction: float = 0.5
    """A round completes when at least this fraction of its selected clients (rounded up, at least one)
    returned an update that passed validation; otherwise the clients that failed are asked again."""
    max_round_retries: int = 1
    """How many times a round that fell short of min_fit_fraction re-asks its failed clients before the
    run stops with a resumable checkpoint (0: stop at once)."""
    client_timeout_s: float | None = None
    """Wall-clock limit of one client's local round; None: no limit. In process, a client that overruns
    is excluded, but its step is not killed (Python cannot): the simulator waits for it to return before
    the next client uses the shared backbone. An injected hang (faults.mode = "timeout") is released at once."""
    validate_updates: bool = True
    """Check every update before aggregation (keys, shapes, finite values, norm, embeddings, labels,
    counts) and exclude the ones that fail, with the reason in metrics.jsonl."""
    max_update_norm: float | None = 1000.0
    """Bound on the L2 norm of a client's change to the global weights (all uploaded LoRA tensors minus
    the ones it was sent); larger updates are rejected. None: no bound. The default catches blow-ups and
    crude scaling attacks only (honest updates are orders of magnitude smaller, see docs/reliability.md)."""

    def validate(self) -> None:
        if not 0 < self.min_fit_fraction <= 1:
            raise ValueError(f"robustness.min_fit_fraction must be in (0, 1], got {self.min_fit_fraction}")
        if self.max_round_retries < 0:
            raise ValueError(f"robustness.max_round_retries must be >= 0, got {self.max_round_retries}")
        if self.client_timeout_s is not None and not self.client_timeout_s > 0:
            raise ValueError(f"robustness.client_timeout_s must be > 0 or none, got {self.client_timeout_s}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"robustness.max_update_norm must be > 0 or none, got {self.max_update_norm}")

    def min_answers(self, selected: int) -> int:
        """Accepted updates a round with ``selected`` clients needs."""
        return max(1, math.ceil(self.min_fit_fraction * selected - 1e-9))
