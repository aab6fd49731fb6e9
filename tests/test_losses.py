"""PPO losses on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from lit_diffac.losses import explained_variance, ppo_policy_loss, value_loss


def test_ppo_policy_loss_hand_computed():
    # ratios [1.5, 0.5, 1.1, 0.9], advantages [1, 1, -2, 2], ε = 0.2
    #   min(ρA, clip(ρ)A) = [min(1.5, 1.2), min(0.5, 0.8), min(-2.2, -2.2), min(1.8, 1.8)]
    #                     = [1.2, 0.5, -2.2, 1.8]
    #   loss = −(1.2 + 0.5 − 2.2 + 1.8) / 4 = −0.325
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.9])
    log_old = torch.tensor([0.1, -0.2, 0.3, 0.0])
    log_new = (log_old + ratio.log()).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -2.0, 2.0])
    out = ppo_policy_loss(log_new, log_old, advantages, clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(-0.325))
    # approx_kl = mean((ρ−1) − log ρ) = mean(0.0945349, 0.1931472, 0.0046898, 0.0053605)
    torch.testing.assert_close(out.approx_kl, torch.tensor(0.0744331))
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.5))  # |ρ−1| = 0.5, 0.5 > 0.2; 0.1, 0.1 not
    torch.testing.assert_close(out.ratio_mean, torch.tensor(1.0))
    torch.testing.assert_close(out.ratio_min, torch.tensor(0.5))
    torch.testing.assert_close(out.ratio_max, torch.tensor(1.5))
    for diagnostic in (out.approx_kl, out.clipfrac, out.ratio_mean, out.ratio_min, out.ratio_max):
        assert diagnostic.ndim == 0 and not diagnostic.requires_grad
    # d loss / d log_new = −A ρ / N where the unclipped term is active, 0 where the clipped one is
    out.loss.backward()
    torch.testing.assert_close(log_new.grad, torch.tensor([0.0, -0.125, 0.55, -0.45]))


def test_ppo_policy_loss_negative_advantages_is_pessimistic():
    # ρ = [0.5, 1.5], A = [−1, −1], ε = 0.2: min(−0.5, −0.8) = −0.8, min(−1.5, −1.2) = −1.5 → loss 1.15
    log_new = torch.log(torch.tensor([0.5, 1.5]))
    out = ppo_policy_loss(log_new, torch.zeros(2), torch.tensor([-1.0, -1.0]), clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(1.15))
    torch.testing.assert_close(out.clipfrac, torch.tensor(1.0))


def test_ppo_policy_loss_on_policy():
    log_prob = torch.randn(5)
    out = ppo_policy_loss(log_prob, log_prob.clone(), torch.tensor([1.0, -1.0, 2.0, 0.0, -2.0]), 1e-5)
    torch.testing.assert_close(out.loss, torch.tensor(0.0))
    assert out.approx_kl == 0 and out.clipfrac == 0 and out.ratio_min == 1 and out.ratio_max == 1
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(log_prob, log_prob, log_prob, 0.0)
    with pytest.raises(ValueError, match="shape"):
        ppo_policy_loss(log_prob, log_prob[:4], log_prob, 0.1)


def test_value_loss_hand_computed():
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    targets = torch.tensor([1.5, 1.0, 3.0])
    # ½ mean([0.25, 1, 0]) = 0.2083333
    out = value_loss(values, targets)
    torch.testing.assert_close(out.loss, torch.tensor(1.25 / 6))
    assert out.clipfrac == 0
    # old = [0, 2.5, 2], c = 0.5: V − old = [1, −0.5, 1] → V_clip = [0.5, 2.0, 2.5]
    # (V_clip − G)² = [1, 1, 0.25]; max with [0.25, 1, 0] = [1, 1, 0.25] → ½ · 2.25 / 3 = 0.375
    out = value_loss(values, targets, old_values=torch.tensor([0.0, 2.5, 2.0]), clip_range=0.5)
    torch.testing.assert_close(out.loss, torch.tensor(0.375))
    torch.testing.assert_close(out.clipfrac, torch.tensor(2 / 3))
    out.loss.backward()
    # no gradient where the clipped (saturated) error is the larger one: elements 0 and 2
    assert values.grad[0] == 0 and values.grad[2] == 0 and values.grad[1] > 0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, targets, clip_range=0.5)


def test_value_loss_multi_reward_shape():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = value_loss(values, torch.zeros(2, 2))
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (1 + 4 + 9 + 16) / 4))


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # residual [0, 0, 0, 1]: Var = 0.1875; Var(target) = 1.25 → 1 − 0.15 = 0.85
    pred = torch.tensor([1.0, 2.0, 3.0, 3.0])
    torch.testing.assert_close(explained_variance(pred, target), torch.tensor(0.85))
    torch.testing.assert_close(explained_variance(target, target), torch.tensor(1.0))
    torch.testing.assert_close(explained_variance(torch.full((4,), 2.5), target), torch.tensor(0.0))
    assert math.isnan(float(explained_variance(torch.randn(3), torch.ones(3))))
    # equal targets whose mean rounds off their value (320 × 0.1 in float32): Var(G) ≈ 1e-17, not 0
    rounded = torch.full((320,), 0.1)
    assert 0 < float(rounded.var(unbiased=False)) and math.isnan(float(explained_variance(torch.zeros(320), rounded)))
    # a small but real spread is not rounding: the swapped prediction explains it 4× worse than its mean would
    target = torch.tensor([1.0, 1.0 + 1e-4])
    assert float(explained_variance(target.flip(0), target)) == pytest.approx(-3.0, rel=1e-2)
