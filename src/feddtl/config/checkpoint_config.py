"""Configuration of round checkpoints (see checkpoint.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """How often the server state is written to <run>/checkpoint for `feddtl run --resume`."""

    every: int = 1
    """Write a checkpoint after every this many rounds, and always before the first round (round 0), after
    the last round and when a run stops (failing clients, SIGTERM / SIGINT). 0: only those. A resumed run
    repeats the rounds since the last one."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0 (0: only at the end and on a stop), got {self.every}")
