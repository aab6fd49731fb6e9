"""Test-time critic steering and best-of-N sampling (DESIGN §6).

Steering adds the learned value's gradient ``g = ∇_x V(x_t, t, c)`` to chosen denoising steps: for DDIM
``ε̂' = ε̂ − s·√(1−ᾱ_t)·g``, for the flow SDE ``v̂' = v̂ − s·g`` (the sampler's :meth:`~Sampler.guide`). Both move
the chain toward higher predicted value.  The gradient needs one backward pass through the backbone per
steered step, so a steered sample costs about ``K + 2·(steered steps)`` forward-equivalents; best-of-N costs
``N·K``.  Both functions report their cost so comparisons can be made at equal compute.  What the
``lit-diffac sample`` options do, and how to choose the scale (with the measured toy figures): docs/steering.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lit_diffac.backbones.base import DiffusionBackbone
from lit_diffac.rollout import collect_rollout, denoise
from lit_diffac.samplers.base import Sampler, step_window

#: A backward pass through the backbone counted as this many forward passes (the usual rule of thumb).
BACKWARD_COST = 2.0


@dataclass
class Samples:
    """Generated samples.

    Attributes:
        images: ``[N, 3, H, W]`` in [0, 1].
        prompts: the ``N`` prompts.
        values: ``[N, R]`` the critic's value at the last step's state (``None`` without a critic).
        compute: backbone cost in forward-pass equivalents, for the whole batch.
    """

    images: torch.Tensor
    prompts: list[str]
    values: torch.Tensor | None
    compute: float


def _steps(spec: Sequence[int] | str | None, num_steps: int) -> set[int]:
    """Which step indices to steer: ``None``/``"all"``, ``"last:N"``, ``"first:N"`` or a list of indices
    (:func:`~lit_diffac.samplers.base.step_window`)."""
    return set(step_window(spec, num_steps, what="steering steps"))


def steered_sample(
    backbone: DiffusionBackbone,
    sampler: Sampler,
    value_head: nn.Module | None,
    prompts: Sequence[str],
    scale: float = 0.0,
    steps: Sequence[int] | str | None = None,
    value_weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    cfg_scale: float | None = None,
) -> Samples:
    """Sample with critic steering; ``scale = 0`` is plain sampling, draw for draw.

    Args:
        backbone, sampler: the policy and its sampler (set up).
        value_head: the critic ``(features, t_frac, pooled) → [B, R]`` (``None``: plain sampling only).
        prompts: one prompt per sample.
        scale: steering strength ``s``.
        steps: which steps to steer (see :func:`_steps`; default all).
        value_weights: weights of the ``R`` value outputs in the steered objective (default: all 1).
        generator: randomness (initial noise and every step).
        cfg_scale: classifier-free guidance scale (``None``: the backbone's, as the policy was trained).
    """
    device = next(backbone.denoiser.parameters()).device
    prompts = list(prompts)
    cfg_scale = backbone.cfg_scale if cfg_scale is None else cfg_scale
    steered = _steps(steps, sampler.num_steps) if scale != 0 else set()
    if steered and value_head is None:
        raise ValueError("steering (scale != 0) needs a value head")
    embeds = backbone.encode_prompts(prompts).to(device)
    uncond = backbone.encode_negative(len(prompts)).to(device) if cfg_scale != 1.0 else None
    x = sampler.init_noise((len(prompts), *backbone.latent_shape), generator=generator, device=device)
    detach_before = getattr(value_head, "detach_features", None)
    values = None
    was_training = backbone.training
    backbone.eval()
    try:
        if detach_before is not None:
            value_head.detach_features = False  # the gradient must reach x through the features
        for k in range(sampler.num_steps):
            index = torch.full((len(prompts),), k, device=device, dtype=torch.long)
            t, t_frac = sampler.timestep_for(index, device=device), sampler.timestep_fraction(index).to(device)
            if k in steered:
                x_in = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    prediction, features = denoise(backbone, x_in, t, embeds, cfg_scale, uncond)
                    v = value_head(features, t_frac, embeds.pooled)
                    w = torch.ones(v.shape[-1], device=device) if value_weights is None \
                        else torch.tensor(list(value_weights), device=device, dtype=v.dtype)
                    grad, = torch.autograd.grad((v * w).sum(), x_in)
                prediction = sampler.guide(prediction.detach(), grad, index, scale, sample=x)
            else:
                with torch.no_grad():
                    prediction, features = denoise(backbone, x, t, embeds, cfg_scale, uncond)
                    v = value_head(features, t_frac, embeds.pooled) if value_head is not None else None
            values = v.detach().float() if v is not None else None
            with torch.no_grad():
                x = sampler.step(prediction, index, x.detach(), generator=generator).prev_sample
        images = backbone.decode(x)
    finally:
        if detach_before is not None:
            value_head.detach_features = detach_before
        backbone.train(was_training)
    passes = sampler.num_steps + BACKWARD_COST * len(steered)
    return Samples(images=images, prompts=prompts, values=values,
                   compute=passes * len(prompts) * (2 if cfg_scale != 1.0 else 1))


@torch.no_grad()
def best_of_n(
    backbone: DiffusionBackbone,
    sampler: Sampler,
    prompts: Sequence[str],
    n: int,
    rank_by,
    value_head: nn.Module | None = None,
    generator: torch.Generator | None = None,
    cfg_scale: float | None = None,
) -> Samples:
    """For each prompt draw ``n`` samples and keep the best one.

    Args:
        rank_by: ``"value"`` (the critic's value at the last step's state, summed over outputs) or a reward
            ``(images, prompts) → [B]``.
    """
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    prompts = list(prompts)
    cfg_scale = backbone.cfg_scale if cfg_scale is None else cfg_scale
    expanded = [p for p in prompts for _ in range(n)]
    if rank_by == "value" and value_head is None:
        raise ValueError("rank_by='value' needs a value head")
    rollout = collect_rollout(backbone, sampler, expanded, value_head=value_head, generator=generator,
                              cfg_scale=cfg_scale)
    if rank_by == "value":
        score = rollout.values[:, -1].sum(-1)
    else:
        score = rank_by(rollout.images, expanded)
    best = score.view(len(prompts), n).argmax(dim=1) + torch.arange(len(prompts), device=score.device) * n
    return Samples(images=rollout.images[best], prompts=prompts,
                   values=rollout.values[best, -1] if value_head is not None else None,
                   compute=float(len(expanded) * sampler.num_steps * (2 if cfg_scale != 1.0 else 1)))
