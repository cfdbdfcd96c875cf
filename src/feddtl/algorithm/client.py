"""The client step of FedDTL (DESIGN.md, "One round", step 2).

Only the image-encoder LoRA trains; the class text embeddings T are fixed for the round. Rounds
t <= M run supervised cross-entropy, rounds t > M the GRPO-style objective. The client uploads its
image LoRA, its sample count, and L2-normalised image embeddings of its training images with labels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from feddtl.config.client_config import ClientConfig
from feddtl.algorithm.encoding import TrunkFeatures, image_embeddings, image_features
from feddtl.algorithm.grpo import class_logits, grpo_loss, hybrid_reference_logprobs, sample_actions
from feddtl.config.grpo_config import GRPOConfig
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.prototypes import class_prototypes
from feddtl.backbones.base import Backbone, TextFeatures


@dataclass
class ClientData:
    """A client's local training set, as trunk features (the trunk never trains)."""

    client_id: int
    features: TrunkFeatures
    labels: torch.Tensor
    """(N,) int64 base-class indices."""
    base_text: TextFeatures | None = None
    """Text-trunk features of the base-class prompts (class names are public), for methods whose
    clients run the text tower themselves (FedLoRA-style baselines). FedDTL clients never use it."""

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


ClassEmbeddings = torch.Tensor | Callable[[], torch.Tensor]
"""Fixed class text embeddings T (C, D), or a function that recomputes T with grad at every step
(for methods whose clients also train the text side: FedLoRA, PromptFL)."""


def _class_embeddings_fn(class_embeddings: ClassEmbeddings, device: torch.device) -> Callable[[], torch.Tensor]:
    if callable(class_embeddings):
        return class_embeddings
    T = class_embeddings.to(device)
    return lambda: T


def sft_epochs(
    backbone: Backbone,
    data: ClientData,
    class_embeddings: ClassEmbeddings,
    params: list[torch.nn.Parameter],
    epochs: int,
    config: ClientConfig,
    generator: torch.Generator,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Stage 1: cross-entropy of softmax(s <f_v(x), t_c>) over the base classes.

    ``extra_loss(T)``, if given, is a scalar added to every step's loss, computed from that step's class
    embeddings T (FedPGP's contrastive term); its mean is reported as ``loss_extra``.
    """
    optimizer = torch.optim.Adam(params, lr=config.lr)
    text_fn = _class_embeddings_fn(class_embeddings, next(backbone.parameters()).device)
    rows = []
    for _ in range(epochs):
        for idx in minibatches(len(data), config.batch_size, generator):
            T = text_fn()
            z = F.normalize(image_features(backbone, data.features[idx]), dim=-1)
            logits = class_logits(z, T, backbone.logit_scale)
            labels = data.labels[idx].to(logits.device)
            loss = F.cross_entropy(logits, labels)
            extra = extra_loss(T) if extra_loss is not None else None
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows.append({"loss": loss.item(), "train_acc": (logits.argmax(-1) == labels).float().mean().item()})
            if extra is not None:
                rows[-1]["loss_extra"] = extra.item()
    return _mean_metrics(rows)


@torch.no_grad()
def _all_logits(backbone: Backbone, data: ClientData, T: torch.Tensor, batch_size: int) -> torch.Tensor:
    z = image_embeddings(backbone, data.features, batch_size)
    return class_logits(z, T.cpu(), backbone.logit_scale)


def rl_reference_logprobs(
    backbone: Backbone,
    data: ClientData,
    task: ClientTask,
    batch_size: int,
    grpo: GRPOConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_old, hybrid reference) log-probabilities (N, C) of every local image, with T fixed.

    The received global LoRA must be loaded: it is both pi_old and the "latest global" half of the
    reference; the other half is the end-of-SFT image LoRA (``task.sft_reference_lora``).
    """
    T = task.class_embeddings
    global_logits = _all_logits(backbone, data, T, batch_size)
    old_logprobs = torch.log_softmax(global_logits, dim=-1)
    if task.sft_reference_lora is not None and grpo.ref_mix > 0:
        backbone.load_image_lora(task.sft_reference_lora)
        sft_logits = _all_logits(backbone, data, T, batch_size)
        backbone.load_image_lora(task.image_lora)
    else:
        sft_logits = global_logits
    return old_logprobs, hybrid_reference_logprobs(sft_logits, global_logits, grpo.ref_mix)


def rl_loop(
    backbone: Backbone,
    data: ClientData,
    class_embeddings: ClassEmbeddings,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    params: list[torch.nn.Parameter],
    epochs: int,
    config: ClientConfig,
    grpo: GRPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """The GRPO epochs themselves, given pi_old's and the reference's log-probabilities per image.

    Actions are sampled with T detached; the policy's logits use T as given (with grad when
    ``class_embeddings`` is a function, so the text side gets the RL gradient too).
    """
    device = next(backbone.parameters()).device
    text_fn = _class_embeddings_fn(class_embeddings, device)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    rows = []
    for _ in range(epochs):
        for idx in minibatches(len(data), config.batch_size, generator):
            T = text_fn()
            u = image_features(backbone, data.features[idx])
            actions = sample_actions(u.detach(), T.detach(), backbone.logit_scale, grpo, generator)
            logits = class_logits(F.normalize(u, dim=-1), T, backbone.logit_scale)
            loss, diag = grpo_loss(
                logits,
                old_logprobs[idx].to(device),
                ref_logprobs[idx].to(device),
                actions,
                data.labels[idx].to(device),
                grpo,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows.append({"loss": loss.item(), **vars(diag)})
    return _mean_metrics(rows)


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
    old_logprobs, ref_logprobs = rl_reference_logprobs(backbone, data, task, config.batch_size, grpo)
    return rl_loop(
        backbone, data, task.class_embeddings, old_logprobs, ref_logprobs, params, epochs, config, grpo, generator
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
) -> ClientUpdate:
    """One local round of FedDTL on one client; returns what the client uploads."""
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
        embeddings, labels = class_prototypes(image_embeddings(backbone, data.features, config.batch_size), data.labels)
    else:
        embeddings = image_embeddings(backbone, data.features, config.batch_size, index)
        labels = data.labels[index].clone()
    return ClientUpdate(
        client_id=data.client_id,
        num_samples=len(data),
        image_lora=backbone.image_lora_state(),
        embeddings=embeddings,
        labels=labels,
        metrics=metrics,
    )
