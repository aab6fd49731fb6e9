"""Samplers: parity with diffusers' schedulers, log-probabilities, per-sample step indices, validation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from lit_diffac.errors import ConfigError
from lit_diffac.samplers import (
    DDIMSampler,
    FlowSDESampler,
    Sampler,
    ddim_step_with_logprob,
    flow_sde_step_with_logprob,
    gaussian_log_prob,
)

K = 4
SHAPE = (3, 2, 4, 4)  # [B, C, H, W]


def _ddim_scheduler(**kwargs) -> DDIMScheduler:
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
    )
    config.update(kwargs)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(K)
    return scheduler


def _flow_scheduler(**kwargs) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **kwargs})
    scheduler.set_timesteps(K)
    return scheduler


def _ddim_sampler(eta: float = 0.0, **scheduler_kwargs) -> tuple[DDIMSampler, DDIMScheduler]:
    scheduler = _ddim_scheduler(**scheduler_kwargs)
    sampler = DDIMSampler(num_steps=K, eta=eta)
    sampler.setup(scheduler)
    return sampler, scheduler


# ----------------------------------------------------------------------------------------- DDIM parity
@pytest.mark.parametrize(
    "scheduler_kwargs",
    [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"}, {"clip_sample": True}],
    ids=["epsilon", "v_prediction", "sample", "clip_sample"],
)
def test_ddim_eta0_mean_matches_diffusers(scheduler_kwargs):
    torch.manual_seed(0)
    sampler, scheduler = _ddim_sampler(eta=0.0, **scheduler_kwargs)
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    # a large scale makes x̂0 leave [-1, 1] so that clip_sample matters
    x = 3.0 * torch.randn(SHAPE)
    for k, t in enumerate(scheduler.timesteps):  # includes the last step (t' < 0 → final_alpha_cumprod)
        model_output = torch.randn(SHAPE)
        ref = scheduler.step(model_output, t, x, eta=0.0)
        out = sampler.step(model_output, k, x)
        torch.testing.assert_close(out.mean, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        # deterministic step: log-probs are documented zeros
        assert torch.all(out.std == 0) and torch.all(out.log_prob == 0)
        x = ref.prev_sample
    if scheduler_kwargs.get("clip_sample"):
        assert ref.pred_original_sample.abs().max() <= 1.0


@pytest.mark.parametrize("scheduler_clips", [True, False], ids=["scheduler_clips", "scheduler_does_not"])
@pytest.mark.parametrize("override", [None, True, False], ids=["scheduler's", "clip", "no_clip"])
def test_ddim_clip_sample_override(scheduler_clips, override):
    """``DDIMSampler(clip_sample=…)`` decides whether x̂0 is clamped; ``None`` follows the scheduler. The step
    equals diffusers' with the scheduler configured as the sampler decided, and clipping changes the mean."""
    torch.manual_seed(0)
    scheduler = _ddim_scheduler(clip_sample=scheduler_clips)
    sampler = DDIMSampler(num_steps=K, eta=1.0, clip_sample=override)
    sampler.setup(scheduler)
    clips = scheduler_clips if override is None else override
    assert sampler.clip_sample is clips
    reference = _ddim_scheduler(clip_sample=clips)
    x, model_output, noise = 3.0 * torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = reference.timesteps[0]
    ref = reference.step(model_output, t, x, eta=1.0, variance_noise=noise)
    out = sampler.step(model_output, 0, x, noise=noise)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    other = _ddim_scheduler(clip_sample=not clips).step(model_output, t, x, eta=1.0, variance_noise=noise)
    assert not torch.allclose(out.prev_sample, other.prev_sample, atol=1e-3)  # x̂0 leaves [-1, 1] at this scale


def test_ddim_eta1_sample_matches_diffusers_with_fixed_noise():
    torch.manual_seed(0)
    sampler, scheduler = _ddim_sampler(eta=1.0)
    x = torch.randn(SHAPE)
    for k, t in enumerate(scheduler.timesteps):
        model_output, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        ref = scheduler.step(model_output, t, x, eta=1.0, variance_noise=noise).prev_sample
        out = sampler.step(model_output, k, x, noise=noise)
        torch.testing.assert_close(out.prev_sample, ref, rtol=1e-5, atol=1e-5)
        assert torch.all(out.std > 0)
        # σ_t is diffusers' eta · √variance
        prev_t = t - scheduler.config.num_train_timesteps // K
        std_ref = scheduler._get_variance(t, prev_t).sqrt()
        torch.testing.assert_close(out.std, std_ref.expand(SHAPE[0]), rtol=1e-5, atol=1e-7)
        x = ref


def test_ddim_pure_function_matches_sampler():
    torch.manual_seed(0)
    sampler, scheduler = _ddim_sampler(eta=1.0)
    x, eps, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[1])
    out = ddim_step_with_logprob(
        eps, x, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 1000 // K], eta=1.0, noise=noise
    )
    ref = sampler.step(eps, 1, x, noise=noise)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample)
    torch.testing.assert_close(out.log_prob, ref.log_prob)


# ----------------------------------------------------------------------------------------- flow parity
def test_flow_noise_level0_mean_matches_diffusers():
    torch.manual_seed(0)
    scheduler = _flow_scheduler()
    sampler = FlowSDESampler(num_steps=K, noise_level=0.0)
    sampler.setup(scheduler)
    assert scheduler.step_index is None  # our deepcopy left the caller's scheduler state alone
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps)
    torch.testing.assert_close(sampler.sigmas, scheduler.sigmas)
    x = torch.randn(SHAPE)
    for k, t in enumerate(scheduler.timesteps):  # diffusers advances its internal step_index on each call
        v = torch.randn(SHAPE)
        ref = scheduler.step(v, t, x).prev_sample
        out = sampler.step(v, k, x)
        torch.testing.assert_close(out.mean, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.prev_sample, ref, rtol=1e-6, atol=1e-6)
        assert torch.all(out.log_prob == 0)
        x = ref


def test_flow_sde_formula_and_sigma_one():
    """The first step has σ = 1: the diffusion coefficient uses σ_next in (1 − σ) and stays finite."""
    torch.manual_seed(0)
    a = 0.7
    sampler = FlowSDESampler(num_steps=K, noise_level=a)
    sampler.setup(_flow_scheduler())
    sigmas = sampler.sigmas
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    x, v, xi = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for k in (0, 2, K - 1):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        dt = sigma_next - sigma
        s = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1.0 else sigma)))
        mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        out = sampler.step(v, k, x, noise=xi)
        assert torch.isfinite(out.log_prob).all()
        torch.testing.assert_close(out.std, torch.full((SHAPE[0],), s * math.sqrt(-dt)))
        torch.testing.assert_close(out.mean, mean)
        torch.testing.assert_close(out.prev_sample, mean + s * math.sqrt(-dt) * xi)


# ----------------------------------------------------------------------------------------- log-probs
def _samplers() -> list[Sampler]:
    ddim = DDIMSampler(num_steps=K, eta=1.0)
    ddim.setup(_ddim_scheduler())
    flow = FlowSDESampler(num_steps=K, noise_level=0.7)
    flow.setup(_flow_scheduler())
    return [ddim, flow]


@pytest.mark.parametrize("sampler", _samplers(), ids=["ddim", "flow"])
def test_log_prob_matches_torch_normal_and_rescoring(sampler):
    torch.manual_seed(0)
    x, out_model = torch.randn(SHAPE), torch.randn(SHAPE)
    generator = torch.Generator().manual_seed(1)
    step_index = torch.tensor([0, 2, K - 1])
    out = sampler.step(out_model, step_index, x, generator=generator)
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    expected = normal.log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    # scoring the sampled action gives back the same log-prob
    rescored = sampler.step(out_model, step_index, x, prev_sample=out.prev_sample)
    torch.testing.assert_close(rescored.log_prob, out.log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(rescored.prev_sample, out.prev_sample)
    # the same generator seed reproduces the sample
    again = sampler.step(out_model, step_index, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.prev_sample, out.prev_sample)


@pytest.mark.parametrize("sampler", _samplers(), ids=["ddim", "flow"])
def test_per_sample_step_indices_equal_per_element_calls(sampler):
    torch.manual_seed(0)
    x, out_model, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    step_index = torch.tensor([K - 1, 0, 2])
    batched = sampler.step(out_model, step_index, x, noise=noise)
    for i, k in enumerate(step_index.tolist()):
        single = sampler.step(out_model[i : i + 1], k, x[i : i + 1], noise=noise[i : i + 1])
        for field in ("prev_sample", "log_prob", "mean", "std"):
            torch.testing.assert_close(getattr(batched, field)[i : i + 1], getattr(single, field))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", _samplers(), ids=["ddim", "flow"])
def test_low_precision_inputs_give_fp32_outputs(sampler, dtype):
    torch.manual_seed(0)
    x, out_model = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    out = sampler.step(out_model, 1, x, generator=torch.Generator().manual_seed(0))
    for field in ("prev_sample", "log_prob", "mean", "std"):
        assert getattr(out, field).dtype == torch.float32, field
    ref = sampler.step(out_model.float(), 1, x.float(), prev_sample=out.prev_sample)
    torch.testing.assert_close(out.log_prob, ref.log_prob)


def test_log_prob_gradient_flows_to_model_output():
    torch.manual_seed(0)
    sampler = _samplers()[1]
    x, v = torch.randn(SHAPE), torch.randn(SHAPE, requires_grad=True)
    prev = sampler.step(v.detach(), 1, x, generator=torch.Generator().manual_seed(0)).prev_sample
    sampler.step(v, 1, x, prev_sample=prev).log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_gaussian_log_prob_zero_std_is_zero_and_finite_grad():
    mean = torch.zeros(2, 3, requires_grad=True)
    x = torch.ones(2, 3)
    lp = gaussian_log_prob(x, mean, torch.tensor([0.0, 2.0]))
    assert lp[0] == 0
    torch.testing.assert_close(lp[1], torch.distributions.Normal(0.0, 2.0).log_prob(torch.tensor(1.0)))
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.all(mean.grad[0] == 0)


# ------------------------------------------------------------------------------- schedule, guide, noise
@pytest.mark.parametrize("num_steps", [1, 3, 10, 61])
def test_ddim_timesteps_are_diffusers_trailing(num_steps):
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    sampler = DDIMSampler(num_steps=num_steps)
    sampler.setup(DDIMScheduler(set_alpha_to_one=False))  # default "leading" spacing: we use trailing anyway
    # diffusers' trailing arange sometimes yields K+1 values (K=61 ends on t=-1); we keep the first K
    assert torch.equal(sampler.timesteps, scheduler.timesteps[:num_steps])
    assert len(sampler.timesteps) == num_steps and sampler.timesteps.min() > 0
    assert sampler.timestep_fraction(0) == pytest.approx(0.999)
    assert torch.equal(sampler.timestep_for(torch.tensor([0, num_steps - 1])), sampler.timesteps[[0, -1]])


def test_ddim_set_alpha_to_one_warns_about_zero_variance():
    sampler = DDIMSampler(num_steps=K, eta=1.0)
    with pytest.warns(UserWarning, match="zero variance"):
        sampler.setup(_ddim_scheduler(set_alpha_to_one=True))
    out = sampler.step(torch.randn(SHAPE), K - 1, torch.randn(SHAPE))
    assert torch.all(out.std == 0) and torch.all(out.log_prob == 0)


@pytest.mark.parametrize("sampler", _samplers(), ids=["ddim", "flow"])
def test_guide(sampler):
    torch.manual_seed(0)
    out_model, grad = torch.randn(SHAPE), torch.randn(SHAPE)
    assert sampler.guide(out_model, grad, 1, 0.0) is out_model
    guided = sampler.guide(out_model, grad, torch.tensor([1, 1, 1]), 0.5)
    if isinstance(sampler, DDIMSampler):
        coef = 0.5 * (1 - sampler._tables["alpha_t"][1]).sqrt()
    else:
        coef = 0.5
    torch.testing.assert_close(guided, out_model - coef * grad)
    # steering moves the mean along +g (towards higher value)
    x = torch.randn(SHAPE)
    shift = sampler.step(guided, 1, x).mean - sampler.step(out_model, 1, x).mean
    assert (shift * grad).sum() > 0


def test_init_noise():
    sampler = _samplers()[0]
    a = sampler.init_noise(SHAPE, generator=torch.Generator().manual_seed(3))
    b = sampler.init_noise(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    assert a.shape == SHAPE and b.dtype == torch.bfloat16
    torch.testing.assert_close(a, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)))


# ------------------------------------------------------------------------------- validation & config
def test_validation_errors():
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(num_steps=0)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-0.1)
    with pytest.raises(ValueError, match="clip_sample must be true, false or null"):
        DDIMSampler(clip_sample="yes")
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDESampler(noise_level=-1.0)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        DDIMSampler().setup(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        FlowSDESampler().setup(DDIMScheduler())
    with pytest.raises(RuntimeError, match="setup"):
        DDIMSampler().step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step_with_logprob(torch.zeros(SHAPE), torch.zeros(SHAPE), 0.5, 0.6, prediction_type="x0")
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step_with_logprob(torch.zeros(SHAPE), torch.zeros(SHAPE), 0.5, 0.4, noise_level=-1)
    sampler = _samplers()[0]
    with pytest.raises(IndexError):
        sampler.step(torch.zeros(SHAPE), K, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="step_index"):
        sampler.step(torch.zeros(SHAPE), torch.tensor([0, 1]), torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="either"):
        zeros = torch.zeros(SHAPE)
        sampler.step(zeros, 0, zeros, prev_sample=zeros, noise=zeros)


def test_constructible_from_jsonargparse_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    cfg = parser.parse_object(
        {"sampler": {"class_path": "lit_diffac.samplers.FlowSDESampler", "init_args": {"num_steps": 3}}}
    )
    sampler = parser.instantiate_classes(cfg).sampler
    assert isinstance(sampler, FlowSDESampler) and sampler.num_steps == 3 and sampler.noise_level == 0.7


def test_step_window_specs():
    from lit_diffac.samplers import step_window

    assert step_window(None, 4) == step_window("all", 4) == [0, 1, 2, 3]
    assert step_window("first:3", 4) == [0, 1, 2] and step_window("last:1", 4) == [3]
    assert step_window("first:9", 4) == [0, 1, 2, 3] and step_window([3, 1, 1], 4) == [1, 3]
    for bad in ("first", "first:0", "middle:2", "last:-1", [], [4], [-1]):
        with pytest.raises(ConfigError, match="train_steps"):
            step_window(bad, 4, what="train_steps")
