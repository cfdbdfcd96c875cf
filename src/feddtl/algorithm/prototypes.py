"""Class prototypes: what a client uploads instead of per-image embeddings when client.upload = "prototypes".

A prototype is the mean of a class's L2-normalised image embeddings, renormalised to unit length. It
reveals far less about individual images than the embeddings themselves (one vector per class instead of
one per image), at an accuracy cost measured in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, D) per-class means of the L2-normalised embeddings (not renormalised), their (P,) labels (sorted,
    one per distinct label) and (P,) image counts."""
    if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
        raise ValueError(f"expected (N, D) embeddings and (N,) labels, got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    classes, counts = torch.unique(labels, return_counts=True)  # sorted
    means = torch.stack([F.normalize(embeddings[labels == c], dim=-1).mean(0) for c in classes]) if len(classes) else embeddings[:0]
    return means, classes.to(torch.long), counts


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) unit-norm per-class means and their (P,) labels, one per distinct label, labels sorted."""
    means, classes, _ = class_means(embeddings, labels)
    return F.normalize(means, dim=-1), classes
