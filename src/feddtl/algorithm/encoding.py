"""Embeddings from trunk features: the only way the algorithm touches a backbone's towers."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from feddtl.backbones.base import Backbone, TextFeatures


class TrunkFeatures(Protocol):
    """Indexable trunk outputs of a fixed list of images (a tensor, a cache, or an on-the-fly store)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


def image_features(backbone: Backbone, trunk: torch.Tensor) -> torch.Tensor:
    """The image tower's unnormalised output u for a batch of trunk features (with grad)."""
    device = next(backbone.parameters()).device
    return backbone.image_tail(trunk.to(device=device, dtype=torch.float32))


@torch.no_grad()
def image_embeddings(
    backbone: Backbone, features: TrunkFeatures, batch_size: int, index: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) of ``features[index]`` (all if index is None), on the CPU."""
    if index is None:
        index = torch.arange(len(features))
    chunks = [
        F.normalize(image_features(backbone, features[index[i : i + batch_size]]), dim=-1).cpu()
        for i in range(0, len(index), batch_size)
    ]
    if not chunks:
        return torch.zeros((0, backbone.info.embed_dim))
    return torch.cat(chunks)


def text_embeddings(backbone: Backbone, text_features: TextFeatures) -> torch.Tensor:
    """L2-normalised class text embeddings (P, D) from cached text-trunk features (with grad)."""
    device = next(backbone.parameters()).device
    feats = {k: v.to(device) for k, v in text_features.items()}
    return F.normalize(backbone.text_tail(feats), dim=-1)
