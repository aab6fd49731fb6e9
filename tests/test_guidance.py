"""Test-time critic steering and best-of-N."""

import pytest
import torch

from lit_diffac.evaluation import default_sampler
from lit_diffac.guidance import _steps, best_of_n, steered_sample
from lit_diffac.rollout import collect_rollout, denoise
from lit_diffac.value_heads import ValueHead

PROMPTS = ["the digit 1", "the number two", "a handwritten digit 3"]


def _critic(backbone, seed=0):
    torch.manual_seed(seed)
    head = ValueHead(backbone.feature_dims, backbone.pooled_dim, 2, dim=32)
    for branch in head.branches:  # open the AdaLN-Zero gates so the value depends on the features
        torch.nn.init.normal_(branch.ada[1].weight, std=0.5)
        torch.nn.init.normal_(branch.ada[1].bias, std=0.5)
    return head


def test_scale_zero_equals_plain_sampling_exactly(backbone):
    sampler, head = default_sampler(backbone), _critic(backbone)
    plain = collect_rollout(backbone, sampler, PROMPTS, generator=torch.Generator().manual_seed(3))
    steered = steered_sample(backbone, sampler, head, PROMPTS, scale=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.images, steered.images)
    assert steered.compute == len(PROMPTS) * sampler.num_steps


def test_steering_changes_samples_and_costs_backward_passes(backbone):
    sampler, head = default_sampler(backbone), _critic(backbone)
    a = steered_sample(backbone, sampler, head, PROMPTS, scale=0.0, generator=torch.Generator().manual_seed(3))
    b = steered_sample(backbone, sampler, head, PROMPTS, scale=5.0, steps="last:3",
                       generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a.images, b.images)
    assert b.compute == len(PROMPTS) * (sampler.num_steps + 2 * 3)


@pytest.mark.parametrize("clip", [True, False], ids=["clip_sample", "no_clip"])
@pytest.mark.parametrize("k", [0, 2, 7])
def test_steering_direction_raises_the_value(backbone, k, clip):
    """The steered step moves x along +∇V: V(x + δ) > V(x) for the step's displacement δ (first order), and every
    element moves along ∇V or not at all — also where DDIM clips x̂0 (the toy UNet's scheduler clips)."""
    if backbone.sampler_family == "ddim":
        backbone.scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config, clip_sample=clip)
    elif not clip:
        pytest.skip("flow samplers do not clip")
    sampler, head = default_sampler(backbone), _critic(backbone)
    head.detach_features = False
    embeds = backbone.encode_prompts(PROMPTS)
    x = torch.randn(len(PROMPTS), *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    index = torch.full((len(PROMPTS),), k)
    t, t_frac = sampler.timestep_for(index), sampler.timestep_fraction(index)

    def value(z):
        prediction, features = denoise(backbone, z, t, embeds)
        return head(features, t_frac, embeds.pooled).sum(-1), prediction

    x_in = x.clone().requires_grad_(True)
    v, prediction = value(x_in)
    grad, = torch.autograd.grad(v.sum(), x_in)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    plain = sampler.step(prediction.detach(), index, x, noise=noise).prev_sample
    guided = sampler.step(sampler.guide(prediction.detach(), grad, index, 1e-2, sample=x), index, x,
                          noise=noise).prev_sample
    delta = guided - plain
    assert (delta * grad).flatten(1).sum(1).min() > 0

    def against(d):  # elements moved against the gradient, by more than float32 rounding of x_{t-1}
        return ((d * grad < 0) & (d.abs() > 8 * torch.finfo(torch.float32).eps * (1 + plain.abs()))).sum().item()

    assert against(delta) == 0  # element by element: nothing is pushed against the gradient
    if backbone.sampler_family == "ddim" and clip and k == 0:  # the first step clips most of x̂0: the mask matters
        unmasked = sampler.step(sampler.guide(prediction.detach(), grad, index, 1e-2), index, x, noise=noise)
        assert against(unmasked.prev_sample - plain) > 0  # what the ε-shift alone did (issue 16)
    with torch.no_grad():
        step = 1e-3 / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert (value(x + step * delta)[0] > value(x)[0]).all()


def test_best_of_n_by_reward_and_by_value(dit_backbone):
    sampler, head = default_sampler(dit_backbone), _critic(dit_backbone)

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    out = best_of_n(dit_backbone, sampler, PROMPTS, 4, brightness, generator=torch.Generator().manual_seed(0))
    all4 = collect_rollout(dit_backbone, sampler, [p for p in PROMPTS for _ in range(4)],
                           generator=torch.Generator().manual_seed(0))
    best = brightness(all4.images, None).view(3, 4).max(1).values
    assert torch.allclose(brightness(out.images, None), best)
    assert out.compute == 3 * 4 * sampler.num_steps
    by_value = best_of_n(dit_backbone, sampler, PROMPTS, 2, "value", value_head=head)
    assert by_value.images.shape[0] == 3 and by_value.values.shape == (3, 2)


def test_step_selection():
    assert _steps(None, 4) == {0, 1, 2, 3} and _steps("last:2", 4) == {2, 3} and _steps("first:1", 4) == {0}
    with pytest.raises(ValueError, match="steering steps"):
        _steps("middle", 4)
    with pytest.raises(ValueError, match="must lie in"):
        _steps([5], 4)


def test_plain_sampling_without_a_critic(dit_backbone):
    sampler = default_sampler(dit_backbone)
    out = steered_sample(dit_backbone, sampler, None, PROMPTS, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 3, 16, 16) and out.values is None
    with pytest.raises(ValueError, match="needs a value head"):
        steered_sample(dit_backbone, sampler, None, PROMPTS, scale=1.0)
