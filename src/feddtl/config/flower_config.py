"""Settings of the Flower engines (Simulation Engine and Deployment Engine); ignored in process."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FlowerConfig:
    """How the ServerApp waits for SuperNodes, which it admits, and how the Simulation Engine sizes its
    virtual clients."""

    node_wait_timeout: float = 300.0
    """Seconds the ServerApp waits, at the start of a run, for one SuperNode per partition to connect
    and answer; then it fails with an error naming the missing partitions."""
    round_timeout: float = 3600.0
    """Seconds the ServerApp waits for the replies of one round before failing the run."""
    sim_client_cpus: float = 1.0
    """`--engine flower-sim` only: CPUs the Simulation Engine (Ray) reserves per virtual client;
    clients run in parallel up to the machine's CPU count divided by this."""
    allow_version_mismatch: bool = False
    """A SuperNode whose feddtl, torch or transformers version or backbone weights differ from the
    server's is refused (false), or admitted with a warning in the log (true): it computes updates the
    server's own code and weights would not."""

    def validate(self) -> None:
        if not self.node_wait_timeout > 0:
            raise ValueError(f"flower.node_wait_timeout must be > 0 seconds, got {self.node_wait_timeout}")
        if not self.round_timeout > 0:
            raise ValueError(f"flower.round_timeout must be > 0 seconds, got {self.round_timeout}")
        if not self.sim_client_cpus > 0:
            raise ValueError(f"flower.sim_client_cpus must be > 0, got {self.sim_client_cpus}")
