"""Which (trajectory, step) pairs an inner epoch trains on: lit_diffac.ppo's pair selection."""

import math

import pytest
import torch

from lit_diffac.ppo import advantage_pairs, shuffled_pairs


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
def test_shuffled_pairs_keep_a_random_subset_of_steps_per_trajectory(fraction):
    batch, steps = 6, 7
    pairs = shuffled_pairs(batch, steps, fraction, torch.Generator().manual_seed(0))
    kept = math.ceil(fraction * steps)
    assert pairs.shape == (batch * kept, 2)
    for i in range(batch):
        row = pairs[pairs[:, 0] == i, 1].tolist()
        assert len(row) == len(set(row)) == kept and all(0 <= k < steps for k in row)


def test_shuffled_pairs_train_only_the_window_s_steps():
    window = [0, 2, 3]
    pairs = shuffled_pairs(5, 6, 1.0, torch.Generator().manual_seed(0), steps=window)
    assert pairs.shape == (15, 2)
    for i in range(5):
        assert sorted(pairs[pairs[:, 0] == i, 1].tolist()) == window
    pairs = shuffled_pairs(5, 6, 0.5, torch.Generator().manual_seed(0), steps=window)  # ⌈0.5 · 3⌉ = 2 per trajectory
    assert pairs.shape == (10, 2) and set(pairs[:, 1].tolist()) <= set(window)
    # the whole window draws exactly what the default draws (runs without the option are unchanged)
    assert torch.equal(shuffled_pairs(5, 6, 0.5, torch.Generator().manual_seed(3), steps=range(6)),
                       shuffled_pairs(5, 6, 0.5, torch.Generator().manual_seed(3)))


def test_advantage_pairs_choose_within_the_window():
    advantages = torch.tensor([[9.0, 1.0, 2.0, 8.0], [0.5, -3.0, 0.1, 7.0]])
    pairs = advantage_pairs(advantages, 0.5, torch.Generator().manual_seed(0), steps=[0, 1, 2])  # step 3 left out
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert torch.equal(advantage_pairs(advantages, 0.5, torch.Generator().manual_seed(0), steps=range(4)),
                       advantage_pairs(advantages, 0.5, torch.Generator().manual_seed(0)))


def test_advantage_pairs_keep_each_trajectory_s_largest_abs_advantages():
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(5, 10, generator=gen)
    advantages[2] = 0.0  # all tied: the earliest steps
    advantages[3, 7] = -9.0  # the largest |A| of its row, negative
    pairs = advantage_pairs(advantages, 0.3, torch.Generator().manual_seed(0))
    assert pairs.shape == (5 * 3, 2)
    for i in range(5):  # naive reference: sort each row's steps by |A| (descending), keep the first 3
        expected = sorted(range(10), key=lambda k: (-abs(advantages[i, k].item()), k))[:3]
        assert sorted(pairs[pairs[:, 0] == i, 1].tolist()) == sorted(expected)
    assert sorted(pairs[pairs[:, 0] == 2, 1].tolist()) == [0, 1, 2] and 7 in pairs[pairs[:, 0] == 3, 1].tolist()
    # shuffled across trajectories, reproducibly
    assert pairs[:, 0].tolist() != sorted(pairs[:, 0].tolist())
    assert torch.equal(pairs, advantage_pairs(advantages, 0.3, torch.Generator().manual_seed(0)))
    assert not torch.equal(pairs, advantage_pairs(advantages, 0.3, torch.Generator().manual_seed(1)))
