"""benchmarks.ddim_clipping: the per-step sensitivity formula against autograd, and the benchmark's output."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler

from benchmarks import ddim_clipping
from lit_diffac.samplers import DDIMSampler


def test_mean_sensitivity_equals_the_steps_autograd_derivative():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, set_alpha_to_one=False, clip_sample=True)
    sampler = DDIMSampler(num_steps=10, eta=1.0)
    sampler.setup(scheduler)
    expected = ddim_clipping.mean_sensitivity(sampler)
    for k in range(9):  # the last step's σ is ~0; its clamped coefficient is 0 by the formula
        # x_t = 0 with ε̂ = 1e-3 keeps x̂0 inside [-1, 1]; x_t = 50 puts it outside
        x = torch.tensor([[[[0.0, 50.0]]]], dtype=torch.float64)
        eps = torch.tensor([[[[1e-3, 1e-3]]]], dtype=torch.float64, requires_grad=True)
        out = sampler.step(eps, k, x, noise=torch.zeros_like(x))
        assert out.pred_original_sample[0, 0, 0, 1] == 1.0  # clamped
        (grad,) = torch.autograd.grad(out.mean.sum(), eps)
        assert grad[0, 0, 0, 0].item() == pytest.approx(expected["dmu_deps_unclamped"][k], rel=1e-5)
        assert grad[0, 0, 0, 1].item() == pytest.approx(expected["dmu_deps_clamped"][k], rel=1e-5, abs=1e-9)


def test_benchmark_writes_per_step_fractions(tmp_path, monkeypatch):
    monkeypatch.setattr(ddim_clipping, "RESULTS", tmp_path)
    assert ddim_clipping.main(["--models", "toy-pairs-unet", "--samples", "2", "--out", "clip"]) == 0
    result = json.loads((tmp_path / "clip.json").read_text())
    model = result["models"]["toy-pairs-unet"]
    assert model["scheduler_clip_sample"] is True
    assert len(model["clipped"]) == 10 and all(0.0 <= f <= 1.0 for f in model["clipped"])
    assert model["clipped"][0] > model["clipped"][-1]  # the first steps' x̂0 is the noisiest
    assert (tmp_path / "clip.md").read_text().count("\n| ") >= 11
