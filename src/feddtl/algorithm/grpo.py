"""The GRPO-style local RL objective on latent-noise actions (DESIGN.md, "Stage 2").

CLIP is deterministic, so an action is drawn by perturbing the image embedding with Gaussian noise
and reading off the class it predicts. Each image gets a group of G actions, a 0/1 reward each, and
group-relative advantages; the policy is the noise-free softmax over class logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from feddtl.config.grpo_config import GRPOConfig


def class_logits(embeddings: torch.Tensor, class_embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """s * <z, t_c> for L2-normalised z (B, D) and t (C, D)."""
    return scale * embeddings @ class_embeddings.T


@torch.no_grad()
def sample_actions(
    features: torch.Tensor,
    class_embeddings: torch.Tensor,
    scale: float,
    config: GRPOConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """G noisy actions per image: (B, G) class indices.

    ``features`` is the tower's unnormalised output u; z = u / |u|. With noise_space "embedding"
    the noisy copy is z + eps (not renormalised, as DESIGN.md writes it); with "features" it is
    normalise(u + eps).
    """
    b, d = features.shape
    g = config.group_size
    noise = torch.randn((b, g, d), generator=generator, dtype=features.dtype) * config.sigma
    noise = noise.to(features.device)
    if config.noise_space == "embedding":
        noisy = F.normalize(features, dim=-1).unsqueeze(1) + noise
    else:
        noisy = F.normalize(features.unsqueeze(1) + noise, dim=-1)
    logits = scale * noisy @ class_embeddings.T  # (B, G, C)
    if config.action == "argmax":
        return logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1).reshape(b * g, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).reshape(b, g).to(features.device)


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_j = (r_j - mean_j r) / (std_j r + eps) within each row (group) of ``rewards`` (B, G).

    std is the sample standard deviation (Bessel-corrected), as in TRL's GRPO.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """L_p = min(rho * A, clip(rho, 1 - eps, 1 + eps) * A), elementwise."""
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative k3 estimator of KL(pi || pi_ref) at actions drawn from pi:
    r - log r - 1 with r = pi_ref(a) / pi(a)."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


def hybrid_reference_logprobs(
    sft_logits: torch.Tensor, global_logits: torch.Tensor, sft_weight: float
) -> torch.Tensor:
    """log of w * softmax(sft) + (1 - w) * softmax(global): the two output distributions mixed."""
    lp_sft = torch.log_softmax(sft_logits, dim=-1)
    lp_glob = torch.log_softmax(global_logits, dim=-1)
    if sft_weight <= 0:
        return lp_glob
    if sft_weight >= 1:
        return lp_sft
    return torch.logsumexp(
        torch.stack([lp_sft + torch.log(torch.tensor(sft_weight)), lp_glob + torch.log(torch.tensor(1 - sft_weight))]),
        dim=0,
    )


@dataclass
class GRPODiagnostics:
    """Per-batch statistics of the RL step, averaged over the batch."""

    reward: float
    """Mean 0/1 reward of the sampled actions."""
    silent_groups: float
    """Fraction of groups whose rewards all agree: zero advantage, no learning signal (known trap 1)."""
    kl: float
    """Mean k3 KL to the hybrid reference."""
    clip_fraction: float
    """Fraction of (image, action) terms whose ratio lies outside [1 - eps, 1 + eps]."""


def grpo_loss(
    logits: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    actions: torch.Tensor,
    labels: torch.Tensor,
    config: GRPOConfig,
) -> tuple[torch.Tensor, GRPODiagnostics]:
    """loss = - mean_{i,j} (L_p - beta * KL) for one batch.

    logits: (B, C) noise-free logits of the current policy (with grad).
    old_logprobs, ref_logprobs: (B, C) log-probabilities of pi_old and the hybrid reference.
    actions: (B, G) sampled classes; labels: (B,) true classes.
    """
    rewards = (actions == labels.unsqueeze(1)).to(logits.dtype)
    adv = group_advantages(rewards, config.adv_eps)
    logp = torch.log_softmax(logits, dim=-1).gather(1, actions)
    logp_old = old_logprobs.gather(1, actions)
    logp_ref = ref_logprobs.gather(1, actions)
    ratio = torch.exp(logp - logp_old)
    policy_term = clipped_objective(ratio, adv, config.clip_eps)
    kl = k3_kl(logp, logp_ref)
    loss = -(policy_term - config.beta * kl).mean()
    with torch.no_grad():
        diag = GRPODiagnostics(
            reward=rewards.mean().item(),
            silent_groups=(rewards.std(dim=1) == 0).float().mean().item(),
            kl=kl.mean().item(),
            clip_fraction=((ratio - 1).abs() > config.clip_eps).float().mean().item(),
        )
    return loss, diag
