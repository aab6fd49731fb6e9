"""Advantage estimators: critic GAE, group-relative (GRPO) and per-prompt statistics (DDPO)."""

import pytest
import torch

from lit_diffac.estimators import (CriticGAE, GroupRelative, PerPromptStatTracker, PerPromptStats,
                                   group_relative_advantages)


def test_group_relative_equals_hand_computation():
    rewards = torch.tensor([[1.0], [3.0], [10.0], [10.0], [4.0]])
    prompts = ["a", "a", "b", "b", "c"]
    adv = group_relative_advantages(rewards, prompts, eps=0.0 + 1e-12)
    # group a: mean 2, std 1 → -1, +1; group b: identical rewards → 0; c alone → 0
    assert torch.allclose(adv[:, 0], torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-6)
    # affine normalisation of the rewards does not change it
    assert torch.allclose(group_relative_advantages(3 * rewards + 7, prompts), group_relative_advantages(rewards, prompts),
                          atol=1e-4)


def test_group_relative_estimator_broadcasts_over_steps_without_critic():
    est = GroupRelative()
    out = est(torch.tensor([[0.0], [2.0]]), torch.zeros(2, 4, 1), ["p", "p"], torch.ones(1))
    assert out.targets is None and not est.uses_critic
    assert out.advantages.shape == (2, 4)
    assert torch.allclose(out.advantages[:, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)
    assert torch.equal(out.advantages[:, 0:1].expand(-1, 4), out.advantages)


def _naive_tracker(history, prompts, rewards, buffer_size, min_count):
    out = []
    for p, r in zip(prompts, rewards):
        history.setdefault(p, [])
    batch = torch.tensor(rewards)
    for p in dict.fromkeys(prompts):
        history[p] = (history[p] + [r for q, r in zip(prompts, rewards) if q == p])[-buffer_size:]
    for p, r in zip(prompts, rewards):
        ref = torch.tensor(history[p]) if len(history[p]) >= min_count else batch
        out.append((r - ref.mean().item()) / (ref.std(unbiased=False).item() + 1e-6))
    return out


def test_stat_tracker_matches_naive_implementation():
    torch.manual_seed(0)
    tracker, history = PerPromptStatTracker(buffer_size=5, min_count=3), {}
    for _ in range(6):
        prompts = [["x", "y", "z"][i] for i in torch.randint(3, (6,)).tolist()]
        rewards = torch.randn(6)
        got = tracker.update(prompts, rewards)
        want = _naive_tracker(history, prompts, rewards.tolist(), 5, 3)
        assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    restored = PerPromptStatTracker(5, 3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers == tracker.buffers


def test_per_prompt_stats_clips_and_has_no_targets():
    est = PerPromptStats(buffer_size=4, min_count=2, advantage_clip=5.0)
    rewards = torch.tensor([[0.0], [0.0], [0.0], [100.0]])
    out = est(rewards, torch.zeros(4, 3, 1), ["a", "a", "a", "a"], torch.ones(1))
    assert out.targets is None and out.advantages.abs().max() <= 5.0


def test_validation():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="prompts for"):
        group_relative_advantages(torch.zeros(2, 1), ["a"])
    with pytest.raises(ValueError, match="gamma"):
        CriticGAE(gamma=2.0)


def test_critic_gae_group_baseline_centres_each_step_on_its_prompt_group():
    from lit_diffac.estimators import group_centred

    rewards = torch.tensor([[1.0], [3.0], [5.0], [2.0]])
    values = torch.tensor([[[0.5], [1.0]], [[1.5], [2.0]], [[4.0], [4.0]], [[0.0], [1.0]]])  # [B, K=2, R=1]
    prompts = ["a", "a", "b", "c"]
    plain = CriticGAE()(rewards, values, prompts, torch.ones(1))
    grouped = CriticGAE(group_baseline=True)(rewards, values, prompts, torch.ones(1))
    # A_k = R - V_k: a → [[0.5, 0], [1.5, 1]], centred per step → [[-0.5, -0.5], [0.5, 0.5]]; b, c alone → 0
    expected = torch.tensor([[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(grouped.per_reward[..., 0], expected)
    assert torch.equal(grouped.targets, plain.targets)  # the critic's targets do not change
    assert not torch.equal(grouped.advantages, plain.advantages)
    naive = torch.stack([plain.per_reward[i] - plain.per_reward[[j for j, q in enumerate(prompts) if q == p]].mean(0)
                         for i, p in enumerate(prompts)])
    assert torch.allclose(group_centred(plain.per_reward, prompts), naive)
    with pytest.raises(ValueError, match="3 prompts for 4"):
        group_centred(plain.per_reward, prompts[:3])


def test_critic_gae_whitening_per_reward_vs_combined():
    # two rewards: the first's head predicts it closely (small residuals), the second's does not
    rewards = torch.tensor([[1.0, 2.0], [0.0, -1.0], [2.0, 0.0], [1.0, 3.0]])
    values = torch.stack([rewards - torch.tensor([[0.1, 1.0], [-0.1, -2.0], [0.1, 0.5], [-0.1, 1.5]])] * 3, 1)
    weights = torch.tensor([1.0, 3.0])
    per = CriticGAE()(rewards, values, ["p"] * 4, weights)
    comb = CriticGAE(whitening="combined")(rewards, values, ["p"] * 4, weights)
    a = rewards - values[:, 0]  # γ = λ = 1: A_k = R − V_k, here the same at every step

    def white(x):  # naive population whitening
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-8)

    torch.testing.assert_close(per.advantages[:, 0], white(a[:, 0]) + 3 * white(a[:, 1]))
    torch.testing.assert_close(comb.advantages[:, 0], white(a[:, 0] + 3 * a[:, 1]))
    assert torch.equal(per.targets, comb.targets) and torch.equal(per.per_reward, comb.per_reward)
    # per-reward whitening ignores each reward's spread: shrinking the first reward's residuals 10x (a better
    # head) leaves its advantages' share unchanged, while combined whitening gives it 10x less say
    better = values.clone()
    better[..., 0] = rewards[:, None, 0] - (rewards[:, None, 0] - values[..., 0]) / 10
    torch.testing.assert_close(CriticGAE()(rewards, better, ["p"] * 4, weights).advantages, per.advantages)
    torch.testing.assert_close(CriticGAE(whitening="combined")(rewards, better, ["p"] * 4, weights).advantages[:, 0],
                               white(a[:, 0] / 10 + 3 * a[:, 1]))
    with pytest.raises(ValueError, match="whitening must be"):
        CriticGAE(whitening="each")
