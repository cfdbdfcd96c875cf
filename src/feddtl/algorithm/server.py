"""The server step of FedDTL (DESIGN.md, "One round", step 3).

The server averages the clients' image LoRA by sample count (``algorithm.aggregation.weighted_average``;
the robust rules of ``server.aggregation`` are in ``methods.robust_aggregation``), then trains its own
text-encoder LoRA with cross-entropy on the image embeddings the clients uploaded: the text side moves
toward the union of all clients' visual evidence instead of being pulled by each client alone. It then
recomputes the class text embeddings for the next round. ``screen_embeddings`` is the optional check
of the uploads against the global model's class geometry (``server.embedding_min_relative_agreement``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from feddtl.algorithm.client import minibatches
from feddtl.algorithm.encoding import text_embeddings
from feddtl.algorithm.grpo import class_logits
from feddtl.algorithm.messages import ClientUpdate
from feddtl.config.server_config import ServerConfig
from feddtl.backbones.base import Backbone, TextFeatures


def embedding_agreement(embeddings: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor) -> float:
    """Fraction of ``embeddings`` whose label is their nearest class text embedding (highest cosine) among
    the classes in ``labels``: how well an upload agrees with the global model's class geometry.

    Only the uploaded classes compete, so an honest client is judged on the distinction it trained on
    (its own classes), not on the global model's confusion with classes it never saw. 1.0 when empty.
    """
    if len(labels) == 0:
        return 1.0
    classes = labels.unique()  # sorted
    sims = embeddings.to(torch.float32) @ class_embeddings[classes].to(torch.float32).T
    return float((classes[sims.argmax(dim=1)] == labels).to(torch.float64).mean())


def screen_embeddings(
    updates: Sequence[ClientUpdate], class_embeddings: torch.Tensor, min_relative_agreement: float
) -> tuple[list[ClientUpdate], list[float], list[dict[str, object]]]:
    """(updates whose embeddings the text step may use, every update's agreement, the rejected ones as
    {client, reason}). ``class_embeddings``: T of the global model the clients were sent this round.

    An upload is rejected when its agreement is below ``min_relative_agreement`` x the round's median
    agreement: the median stays among the honest clients while they are more than half.
    """
    agreements = [embedding_agreement(u.embeddings, u.labels, class_embeddings) for u in updates]
    median = float(np.median(agreements)) if agreements else 0.0
    floor = min_relative_agreement * median
    kept, rejected = [], []
    for u, agreement in zip(updates, agreements):
        if agreement >= floor:
            kept.append(u)
        else:
            rejected.append({
                "client": u.client_id,
                "reason": f"embedding agreement {agreement:.3f} below {min_relative_agreement:g} x the round's median "
                f"{median:.3f} (server.embedding_min_relative_agreement)",
            })
    return kept, agreements, rejected


def pooled_embeddings(updates: Sequence[ClientUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """All uploaded (embedding, label) pairs of a round, concatenated."""
    return torch.cat([u.embeddings for u in updates]), torch.cat([u.labels for u in updates])


@torch.no_grad()
def text_alignment_loss(
    backbone: Backbone, text_features: TextFeatures, embeddings: torch.Tensor, labels: torch.Tensor
) -> float:
    """Cross-entropy of the uploaded embeddings against the current class text embeddings."""
    T = text_embeddings(backbone, text_features)
    logits = class_logits(embeddings.to(T.device), T, backbone.logit_scale)
    return F.cross_entropy(logits, labels.to(T.device)).item()


def text_alignment_step(
    backbone: Backbone,
    text_features: TextFeatures,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: ServerConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train the text LoRA: logits = s <z_i, t_c(theta_text)> over the base classes, cross-entropy.

    ``text_features`` are the cached text-trunk outputs of the base-class prompts; the optimizer
    holds the text LoRA parameters and keeps its state across rounds.
    """
    before = text_alignment_loss(backbone, text_features, embeddings, labels)
    device = next(backbone.parameters()).device
    for _ in range(config.text_epochs):
        for idx in minibatches(len(labels), config.text_batch_size, generator):
            T = text_embeddings(backbone, text_features)
            logits = class_logits(embeddings[idx].to(device), T, backbone.logit_scale)
            loss = F.cross_entropy(logits, labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    after = text_alignment_loss(backbone, text_features, embeddings, labels)
    return {"text_loss_before": before, "text_loss_after": after, "uploaded_embeddings": float(len(labels))}


@torch.no_grad()
def class_embeddings(backbone: Backbone, text_features: TextFeatures) -> torch.Tensor:
    """T = [t_1 ... t_C] from the server's text encoder (with its LoRA), on the CPU."""
    return text_embeddings(backbone, text_features).cpu()
