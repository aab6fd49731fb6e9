"""Advantage estimation and normalisation."""

from __future__ import annotations

import pytest
import torch

from lit_diffac.advantages import clip_advantages, compute_gae, standardize, terminal_rewards, whiten


def _naive_gae(rewards, values, gamma, lam, last_values):
    """A_k = Σ_l (γλ)^l δ_{k+l}, δ_k = r_k + γ V_{k+1} − V_k, written as a plain double loop."""
    B, K = rewards.shape
    next_values = torch.cat([values[:, 1:], last_values[:, None]], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            advantages[b, k] = sum((gamma * lam) ** l * deltas[b, k + l] for l in range(K - k))
    return advantages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_gae_matches_naive_double_loop(seed):
    torch.manual_seed(seed)
    gamma, lam = torch.rand(2).tolist()
    rewards = torch.randn(3, 5, dtype=torch.float64)
    values = torch.randn(3, 5, dtype=torch.float64)
    last = torch.randn(3, dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, gamma=gamma, lam=lam, last_values=last)
    expected = _naive_gae(rewards, values, gamma, lam, last)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)
    # default bootstrap value is 0
    advantages0, _ = compute_gae(rewards, values, gamma=gamma, lam=lam)
    expected0 = _naive_gae(rewards, values, gamma, lam, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(advantages0, expected0)


def test_compute_gae_terminal_reward_gamma_lambda_one():
    torch.manual_seed(0)
    reward, values = torch.randn(4), torch.randn(4, 6)
    rewards = terminal_rewards(reward, num_steps=6)
    assert rewards.shape == (4, 6) and torch.all(rewards[:, :-1] == 0) and torch.equal(rewards[:, -1], reward)
    advantages, returns = compute_gae(rewards, values)
    torch.testing.assert_close(advantages, reward[:, None] - values)  # A_k = R − V_k
    torch.testing.assert_close(returns, reward[:, None].expand(4, 6))  # G_k = R


def test_compute_gae_trailing_reward_dim_and_dtype():
    torch.manual_seed(0)
    reward, values = torch.randn(2, 3), torch.randn(2, 5, 3).to(torch.bfloat16)  # [B, R], [B, K, R]
    advantages, returns = compute_gae(terminal_rewards(reward, 5), values)
    assert advantages.shape == (2, 5, 3) and advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, reward[:, None] - values.float())
    with pytest.raises(ValueError, match="same shape"):
        compute_gae(torch.zeros(2, 5), torch.zeros(2, 4))


def test_whiten_statistics():
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(8, 4)
    w = whiten(x)
    assert w.shape == x.shape
    assert abs(float(w.mean())) < 1e-6
    assert float(w.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(whiten(x, shift_mean=False), x / (x.std(unbiased=False) + 1e-8))
    torch.testing.assert_close(standardize(x), w)
    assert torch.equal(whiten(torch.tensor([5.0])), torch.tensor([0.0]))  # a single element is 0, not NaN


def test_whiten_uses_gather_for_global_statistics():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    other_process = torch.tensor([10.0, 20.0, 30.0, 40.0])
    calls = []

    def fake_gather(t):
        calls.append(t.shape)
        return torch.cat([t, other_process])

    pool = torch.cat([x, other_process])
    expected = (x - pool.mean()) / (pool.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(whiten(x, gather=fake_gather), expected)
    assert calls == [x.shape]
    # duplicating the tensor (what all_gather gives with identical processes) leaves the result unchanged
    torch.testing.assert_close(whiten(x, gather=lambda t: torch.cat([t, t])), whiten(x))


def test_clip_advantages():
    x = torch.tensor([-12.0, -3.0, 0.5, 11.0])
    assert torch.equal(clip_advantages(x, 10.0), torch.tensor([-10.0, -3.0, 0.5, 10.0]))
    with pytest.raises(ValueError):
        clip_advantages(x, 0.0)
