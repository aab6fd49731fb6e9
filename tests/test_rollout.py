"""``collect_rollout``: the critic's values come from one value-head call per rollout, equal to a call per step."""

from __future__ import annotations

import pytest
import torch

from lit_diffac.rollout import collect_rollout
from lit_diffac.samplers import DDIMSampler, FlowSDESampler
from lit_diffac.value_heads import ValueHead

PROMPTS = ["a 3", "a 7", "the number one"]


def _open_gates(head):  # a fresh head ignores its features (AdaLN-Zero); open it so the values depend on them
    torch.manual_seed(1)
    for branch in head.branches:
        torch.nn.init.normal_(branch.ada[1].weight, std=0.5)
        torch.nn.init.normal_(branch.ada[1].bias, std=0.5)
    return head


@pytest.mark.parametrize("patch_size", [1, 2])
def test_values_equal_a_value_head_call_per_step(backbone, patch_size):
    sampler = (DDIMSampler(num_steps=4, eta=1.0) if backbone.sampler_family == "ddim"
               else FlowSDESampler(num_steps=4, noise_level=0.7))
    sampler.setup(backbone.scheduler)
    head = _open_gates(ValueHead(backbone.feature_dims, backbone.pooled_dim, 2, dim=32, patch_size=patch_size))
    head.token_grid = backbone.feature_grid
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    rollout = collect_rollout(backbone, sampler, PROMPTS, value_head=head, keep_features=True,
                              generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and rollout.values.shape == (len(PROMPTS), 4, 2)
    with torch.no_grad():
        per_step = torch.stack([head([f[:, k] for f in rollout.features], sampler.timestep_fraction(k).expand(3),
                                     rollout.embeds.pooled, compressed=True) for k in range(4)], dim=1)
    torch.testing.assert_close(rollout.values, per_step, rtol=1e-5, atol=1e-6)
    assert per_step[:, 0].sub(per_step[:, -1]).abs().max() > 1e-4  # the steps' values differ: the order matters
    # Without a head the rollout is the same chain, with zero values.
    plain = collect_rollout(backbone, sampler, PROMPTS, num_values=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain.latents, rollout.latents, rtol=0, atol=0)
    assert plain.values.shape == (3, 4, 2) and not plain.values.any()


def test_integer_step_index_is_checked_on_the_host():
    from diffusers import DDIMScheduler

    sampler = DDIMSampler(num_steps=3)
    sampler.setup(DDIMScheduler(set_alpha_to_one=False))
    sample = torch.zeros(2, 1, 2, 2)
    assert sampler.step(sample, 2, sample).log_prob.shape == (2,)
    for bad in (3, -1):
        with pytest.raises(IndexError, match=r"\[0, 3\)"):
            sampler.step(sample, bad, sample)
