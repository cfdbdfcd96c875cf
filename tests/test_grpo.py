"""The GRPO-style loss on hand-computed cases (DESIGN.md, "Stage 2")."""

import math

import pytest
import torch

from feddtl.algorithm.grpo import (
    clipped_objective,
    group_advantages,
    grpo_loss,
    hybrid_reference_logprobs,
    k3_kl,
    sample_actions,
)
from feddtl.config.grpo_config import GRPOConfig


def test_group_advantage_one_right_of_three():
    # prepare: rewards [1, 0, 0]: mean 1/3, sample std sqrt(1/3)
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    # execute
    adv = group_advantages(rewards, eps=0.0)
    # assert
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([[(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]]))


def test_group_advantage_all_agree_is_silent():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), eps=1e-4)
    assert torch.equal(adv, torch.zeros(2, 3))


def test_clipped_objective_takes_pessimistic_side():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    out = clipped_objective(ratio, adv, clip_eps=0.2)
    # A>0: min(1.5, 1.2)=1.2 and min(0.5, 0.8)=0.5; A<0: min(-1.5,-1.2)=-1.5 and min(-0.5,-0.8)=-0.8; inside: 2.2
    assert torch.allclose(out, torch.tensor([1.2, 0.5, -1.5, -0.8, 2.2]))


def test_k3_kl_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.4]))
    logp_ref = torch.log(torch.tensor([0.25, 0.5, 0.4]))
    out = k3_kl(logp, logp_ref)
    # r = ref / p: 0.5 -> 0.5 - ln 0.5 - 1; 2 -> 2 - ln 2 - 1; 1 -> 0
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1, 0.0])
    assert torch.allclose(out, expected, atol=1e-6)
    assert (out >= 0).all()


def test_hybrid_reference_mixes_distributions_not_logits():
    a = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([[0.0, 2.0]])
    mixed = hybrid_reference_logprobs(a, b, 0.5).exp()
    expected = 0.5 * torch.softmax(a, -1) + 0.5 * torch.softmax(b, -1)
    assert torch.allclose(mixed, expected)
    assert torch.allclose(hybrid_reference_logprobs(a, b, 1.0), torch.log_softmax(a, -1))


def test_grpo_loss_by_hand_when_policy_equals_old_and_ref():
    # prepare: 1 image, 2 classes, G = 2; actions [0, 1], label 0 -> rewards [1, 0]
    config = GRPOConfig(group_size=2, beta=0.5, clip_eps=0.2, adv_eps=0.0)
    logits = torch.tensor([[1.0, 0.0]], requires_grad=True)
    logp = torch.log_softmax(logits.detach(), -1)
    actions = torch.tensor([[0, 1]])
    # execute
    loss, diag = grpo_loss(logits, logp, logp, actions, torch.tensor([0]), config)
    # assert: ratio 1, KL 0, A = [+1/sqrt(.5), -1/sqrt(.5)]: mean 0 -> loss 0, and the gradient raises class 0
    assert abs(loss.item()) < 1e-6
    assert diag.reward == 0.5 and diag.silent_groups == 0.0 and diag.clip_fraction == 0.0
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]


def test_grpo_loss_counts_silent_groups_and_clipping():
    config = GRPOConfig(group_size=2, clip_eps=0.2)
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.0]], requires_grad=True)
    old = torch.log_softmax(torch.zeros(2, 2), -1)
    actions = torch.tensor([[0, 0], [0, 1]])
    loss, diag = grpo_loss(logits, old, old, actions, torch.tensor([0, 0]), config)
    assert diag.silent_groups == 0.5  # first image: both actions right
    assert diag.clip_fraction == 0.5  # first image's ratio 0.95/0.5 is clipped, second is 1
    assert torch.isfinite(loss)


@pytest.mark.parametrize("noise_space", ["embedding", "features"])
def test_sample_actions_zero_noise_is_argmax_and_seeded(noise_space):
    T = torch.eye(3)
    feats = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.5]])
    cfg = GRPOConfig(sigma=0.0, noise_space=noise_space)
    acts = sample_actions(feats, T, 100.0, cfg, torch.Generator().manual_seed(0))
    assert acts.tolist() == [[1, 1, 1], [0, 0, 0]]
    noisy = GRPOConfig(sigma=1.0, noise_space=noise_space, group_size=8)
    a1 = sample_actions(feats, T, 100.0, noisy, torch.Generator().manual_seed(3))
    a2 = sample_actions(feats, T, 100.0, noisy, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and a1.shape == (2, 8)
    assert len(set(a1.flatten().tolist())) > 1  # sigma = 1 flips some actions


def test_embedding_noise_flips_more_than_feature_noise_for_large_features():
    # Known trap 2: the same sigma on a large unnormalised feature is a small relative perturbation.
    g = torch.Generator().manual_seed(0)
    T = torch.nn.functional.normalize(torch.randn(10, 64, generator=g), dim=-1)
    feats = 20.0 * (T[0] + 0.9 * T[1])
    labels_right = []
    for space in ("embedding", "features"):
        cfg = GRPOConfig(sigma=0.1, noise_space=space, group_size=64)
        acts = sample_actions(feats.unsqueeze(0), T, 100.0, cfg, torch.Generator().manual_seed(1))
        labels_right.append((acts == 0).float().mean().item())
    assert labels_right[1] > labels_right[0]
