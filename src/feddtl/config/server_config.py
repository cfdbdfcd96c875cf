"""Configuration of the server step (DESIGN.md, "One round", step 3): how the clients' weights are
aggregated, which uploaded embeddings the text step trusts, and the text-encoder alignment step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Aggregation = Literal["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"]


def aggregation_min_clients(aggregation: str, attackers: int) -> tuple[int, str]:
    """(fewest updates a round needs, the bound as text) for ``aggregation`` to withstand ``attackers``.

    Krum scores each update by its n - f - 2 nearest neighbours, so it needs n > 2f + 2; Bulyan runs
    Krum n - 2f times and then trims 2f per coordinate, so it needs n >= 4f + 3 (El Mhamdi et al., 2018);
    the trimmed mean cuts f from each side and the median tolerates fewer than half, so both need n > 2f.
    """
    f = attackers
    if aggregation in ("krum", "multi-krum"):
        return 2 * f + 3, f"n > 2f + 2 = {2 * f + 2}"
    if aggregation == "bulyan":
        return 4 * f + 3, f"n >= 4f + 3 = {4 * f + 3}"
    if aggregation in ("trimmed-mean", "median"):
        return 2 * f + 1, f"n > 2f = {2 * f}"
    return 1, "n >= 1"


@dataclass
class ServerConfig:
    """Aggregation of the clients' weights, the embedding check, and cross-entropy training of the text
    LoRA on the uploaded (embedding, label) pairs."""

    aggregation: Aggregation = "fedavg"
    """How the clients' weights (FedDTL's image LoRA; every method's shared trained tensors) are combined:
    "fedavg" (sample-weighted mean, the paper's), or a Byzantine-robust rule: "median" and "trimmed-mean"
    (coordinate-wise, unweighted), "krum" (the one update closest to its n - f - 2 nearest), "multi-krum"
    (the sample-weighted mean of the server.multikrum_select best Krum scores), "bulyan" (Krum n - 2f
    times, then a coordinate-wise trimmed mean of those around their median). See docs/reliability.md."""
    assumed_attackers: int = 0
    """f, the number of attackers per round the robust rules must withstand: krum and multi-krum need
    more than 2f + 2 clients a round, bulyan 4f + 3 or more, trimmed-mean (which cuts f from each side of
    every coordinate) and median more than 2f. Ignored by fedavg."""
    multikrum_select: int | None = None
    """How many updates multi-krum averages; None: n - f (the round's updates minus the assumed attackers)."""
    embedding_min_relative_agreement: float | None = None
    """The embedding check (FedDTL's uploads). A client's agreement is the fraction of its uploaded
    embeddings whose label is their nearest class text embedding of the global model (the T it was sent),
    among the classes it uploaded; an upload whose agreement is below this fraction of the round's median
    agreement is left out of the text step (its image LoRA still goes to server.aggregation) and recorded
    in metrics.jsonl as embeddings_rejected. Relative to the round, not absolute: at the start the global
    geometry may send every embedding to one class (the `lite` backbone on digits does), and an absolute
    bound would reject every honest client. None: off."""
    text_epochs: int = 1
    """Passes over the round's uploaded embeddings (ours; the paper does not give it)."""
    text_lr: float = 1e-3
    """Adam learning rate of the text LoRA (ours). The server's Adam state carries across rounds."""
    text_batch_size: int = 64
    """Mini-batch size of the text step."""

    def validate(self) -> None:
        if self.assumed_attackers < 0:
            raise ValueError(f"server.assumed_attackers must be >= 0, got {self.assumed_attackers}")
        if self.multikrum_select is not None and self.multikrum_select < 1:
            raise ValueError(f"server.multikrum_select must be >= 1 or none, got {self.multikrum_select}")
        if self.embedding_min_relative_agreement is not None and not 0 < self.embedding_min_relative_agreement <= 1:
            raise ValueError(
                f"server.embedding_min_relative_agreement must be in (0, 1] or none, got {self.embedding_min_relative_agreement}"
            )
        if self.text_epochs < 0:
            raise ValueError(f"server.text_epochs must be >= 0, got {self.text_epochs}")
        if self.text_lr <= 0:
            raise ValueError(f"server.text_lr must be > 0, got {self.text_lr}")
        if self.text_batch_size < 1:
            raise ValueError(f"server.text_batch_size must be >= 1, got {self.text_batch_size}")

    def validate_round_size(self, clients_per_round: int) -> None:
        """The robust rule's bound holds for rounds of ``clients_per_round`` clients (a config error otherwise)."""
        need, bound = aggregation_min_clients(self.aggregation, self.assumed_attackers)
        if clients_per_round < need:
            raise ValueError(
                f"server.aggregation = {self.aggregation!r} with server.assumed_attackers = {self.assumed_attackers} "
                f"needs {bound} clients a round, but num_clients x client_fraction gives {clients_per_round}; "
                "add clients, raise client_fraction, or assume fewer attackers"
            )
        if self.aggregation == "multi-krum" and self.multikrum_select is not None and self.multikrum_select > clients_per_round:
            raise ValueError(
                f"server.multikrum_select = {self.multikrum_select} is more than the {clients_per_round} clients a round"
            )
