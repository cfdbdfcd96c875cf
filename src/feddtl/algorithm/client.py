"""The client step of FedDTL (DESIGN.md, "One round", step 2).

Only the image-encoder LoRA trains; the class text embeddings T are fixed for the round. Rounds
t <= M run supervised cross-entropy, rounds t > M the GRPO-style objective. The client uploads its
image LoRA, its sample count, and L2-normalised image embeddings of its training images with labels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from feddtl.config.client_config import ClientConfig
from feddtl.algorithm.encoding import TrunkFeatures, image_embeddings, image_features
from feddtl.algorithm.grpo import class_logits, grpo_loss, hybrid_reference_logprobs, sample_actions
from feddtl.config.grpo_config import GRPOConfig
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.privacy import UploadNoise, private_embeddings, private_prototypes
from feddtl.algorithm.prototypes import class_prototypes
from feddtl.backbones.base import Backbone


@dataclass
class ClientData:
    """A client's local training set, as trunk features (the trunk never trains)."""

    client_id: int
    features: TrunkFeatures
    labels: torch.Tensor
    """(N,) int64 base-class indices."""

    def __len__(self) -> int:
        return len(self.labels)

    def require_images(self) -> None:
        """Every method's client step starts here: an empty client cannot train."""
        if len(self) == 0:
            raise ValueError(f"client {self.client_id} has no training images")


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Seeded shuffled index batches covering 0..n-1 once."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


BatchLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""One training step's objective on the minibatch of these local indices: (loss, metrics of the step)."""


Params = list[torch.nn.Parameter] | list[dict[str, Any]]
"""What a local Adam trains: parameters, or torch param groups (a group's own "lr" overrides client.lr)."""


def train_epochs(
    params: Params,
    epochs: int,
    n: int,
    config: ClientConfig,
    generator: torch.Generator,
    batch_loss: BatchLoss,
) -> dict[str, float]:
    """Local training: a fresh Adam over ``params`` (parameters or param groups), ``epochs`` passes of seeded minibatches over the
    ``n`` local images; returns the steps' metrics, averaged."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    rows = []
    for _ in range(epochs):
        for idx in minibatches(n, config.batch_size, generator):
            loss, row = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows.append(row)
    return _mean_metrics(rows)


def sft_loss(
    backbone: Backbone, data: ClientData, idx: torch.Tensor, T: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1 on one minibatch: cross-entropy of softmax(s <f_v(x), t_c>) over the base classes."""
    z = F.normalize(image_features(backbone, data.features[idx]), dim=-1)
    logits = class_logits(z, T, backbone.logit_scale)
    labels = data.labels[idx].to(logits.device)
    loss = F.cross_entropy(logits, labels)
    return loss, {"loss": loss.item(), "train_acc": (logits.argmax(-1) == labels).float().mean().item()}


def rl_loss(
    backbone: Backbone,
    data: ClientData,
    idx: torch.Tensor,
    T: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    grpo: GRPOConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 2 on one minibatch: G noisy-latent actions per image (sampled with T detached), then the
    GRPO objective of the noise-free policy against pi_old's and the reference's log-probabilities."""
    device = T.device
    u = image_features(backbone, data.features[idx])
    actions = sample_actions(u.detach(), T.detach(), backbone.logit_scale, grpo, generator)
    logits = class_logits(F.normalize(u, dim=-1), T, backbone.logit_scale)
    loss, diag = grpo_loss(
        logits, old_logprobs[idx].to(device), ref_logprobs[idx].to(device), actions, data.labels[idx].to(device), grpo
    )
    return loss, {"loss": loss.item(), **vars(diag)}


def sft_epochs(
    backbone: Backbone,
    data: ClientData,
    class_embeddings: torch.Tensor,
    params: list[torch.nn.Parameter],
    epochs: int,
    config: ClientConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Stage 1: supervised warm-start with the round's fixed class text embeddings T."""
    T = class_embeddings.to(next(backbone.parameters()).device)
    # lora.dropout acts in these training steps only; seeded from this step's generator, not its stream.
    with backbone.lora_dropout(generator.initial_seed()):
        return train_epochs(params, epochs, len(data), config, generator, lambda idx: sft_loss(backbone, data, idx, T))


@torch.no_grad()
def all_logits(backbone: Backbone, data: ClientData, T: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class logits (N, C) of every local image under the loaded model, on the CPU."""
    z = image_embeddings(backbone, data.features, batch_size)
    return class_logits(z, T.cpu(), backbone.logit_scale)


def rl_reference_logprobs(
    backbone: Backbone,
    data: ClientData,
    class_embeddings: Callable[[], torch.Tensor],
    batch_size: int,
    ref_mix: float,
    load_sft: Callable[[], None] | None,
    load_global: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_old, hybrid reference) log-probabilities (N, C) of every local image.

    The received global model must be loaded: it is both pi_old and the "latest global" half of the
    reference. ``load_sft`` loads the end-of-SFT model (None: there is none yet), whose logits are the
    other half; ``load_global`` loads the global model back. ``class_embeddings()`` gives T under the
    loaded model (FedDTL: the round's fixed T; methods whose clients run the text tower: recomputed).
    """
    global_logits = all_logits(backbone, data, class_embeddings(), batch_size)
    old_logprobs = torch.log_softmax(global_logits, dim=-1)
    sft_logits = global_logits
    if load_sft is not None and ref_mix > 0:
        load_sft()
        sft_logits = all_logits(backbone, data, class_embeddings(), batch_size)
        load_global()
    return old_logprobs, hybrid_reference_logprobs(sft_logits, global_logits, ref_mix)


def rl_epochs(
    backbone: Backbone,
    data: ClientData,
    task: ClientTask,
    params: list[torch.nn.Parameter],
    epochs: int,
    config: ClientConfig,
    grpo: GRPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Stage 2: the GRPO-style objective with a clipped ratio and a k3 KL to the hybrid reference.

    pi_old is the policy at the start of the local round (the received global model), so the ratio
    and its clip act across the local epochs. The reference mixes the end-of-SFT model's and the
    latest global model's output distributions.
    """
    sft = task.sft_reference_lora
    old_lp, ref_lp = rl_reference_logprobs(
        backbone, data, lambda: task.class_embeddings, config.batch_size, grpo.ref_mix,
        load_sft=None if sft is None else lambda: backbone.load_image_lora(sft),
        load_global=lambda: backbone.load_image_lora(task.image_lora),
    )
    T = task.class_embeddings.to(next(backbone.parameters()).device)
    return train_epochs(
        params, epochs, len(data), config, generator,
        lambda idx: rl_loss(backbone, data, idx, T, old_lp, ref_lp, grpo, generator),
    )


def capped_upload_index(labels: torch.Tensor, cap: int | None, generator: torch.Generator) -> torch.Tensor:
    """Indices of at most ``cap`` images per class (seeded), sorted; all of them if cap is None."""
    if cap is None:
        return torch.arange(len(labels))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in torch.randperm(len(labels), generator=generator).tolist():
        by_class[int(labels[i])].append(i)
    keep = [i for idxs in by_class.values() for i in idxs[:cap]]
    return torch.tensor(sorted(keep), dtype=torch.long)


def client_step(
    backbone: Backbone,
    data: ClientData,
    task: ClientTask,
    config: ClientConfig,
    grpo: GRPOConfig,
    seed: int,
    upload_noise: UploadNoise | None = None,
) -> ClientUpdate:
    """One local round of FedDTL on one client; returns what the client uploads.

    ``upload_noise``: the Gaussian mechanism on the uploaded embeddings or prototypes (privacy.upload_epsilon;
    None: off). Its noise comes from a generator of its own, so training and the upload subsample draw the
    same numbers with it on or off.
    """
    data.require_images()
    generator = torch.Generator().manual_seed(seed)
    backbone.load_image_lora(task.image_lora)
    params = backbone.image_lora_parameters()
    if task.stage == "sft":
        metrics = sft_epochs(backbone, data, task.class_embeddings, params, config.sft_epochs, config, generator)
    else:
        metrics = rl_epochs(backbone, data, task, params, config.rl_epochs, config, grpo, generator)
    index = capped_upload_index(data.labels, config.upload_cap_per_class, generator)
    if config.upload == "prototypes":
        # One mean embedding per class, over all local images: the cap does not apply.
        local = image_embeddings(backbone, data.features, config.batch_size)
        if upload_noise is None:
            embeddings, labels = class_prototypes(local, data.labels)
        else:
            embeddings, labels = private_prototypes(local, data.labels, upload_noise, upload_noise.generator(seed))
    else:
        embeddings = image_embeddings(backbone, data.features, config.batch_size, index)
        labels = data.labels[index].clone()
        if upload_noise is not None:
            embeddings = private_embeddings(embeddings, upload_noise, upload_noise.generator(seed))
    return ClientUpdate(
        client_id=data.client_id,
        num_samples=len(data),
        image_lora=backbone.image_lora_state(),
        embeddings=embeddings,
        labels=labels,
        metrics=metrics,
    )
