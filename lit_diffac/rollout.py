"""Rollouts: running the stochastic sampler while recording what PPO needs.

A rollout of ``B`` prompts over ``K`` denoising steps stores the whole chain of latents, the per-step
log-probabilities of the actions taken and the critic's value estimates, all computed by ONE backbone
forward per step (the value head reads the features of the same pass that predicts ε̂ / v̂; it runs once per
rollout, on every step's features together).

:func:`denoise` is the single place where a backbone output is turned into a sampler input (with
optional classifier-free guidance); rollouts and PPO updates both call it, so the recomputed
log-probabilities of an update match the stored ones (the on-policy check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.samplers.base import Sampler


@dataclass
class Rollout:
    """A batch of sampled denoising trajectories (everything on one device, no grad).

    Shapes (``B`` samples, ``K`` steps, ``R`` value outputs, latents ``[C, H, W]``):

    Attributes:
        prompts: ``B`` prompt strings.
        embeds: encoded prompts, batch ``B``.
        latents: ``[B, K+1, C, H, W]`` the chain ``x_{t_0} (noise) … x_{t_K} (clean)``; action ``a_k`` is
            ``latents[:, k+1]``.
        log_probs: ``[B, K]`` fp32 ``log π_old(a_k | s_k)`` (per-dimension mean).
        values: ``[B, K, R]`` fp32 ``V_old(s_k)`` (zeros when rolled out without a critic).
        images: ``[B, 3, H, W]`` decoded final images in [0, 1].
        rewards: ``[B, R_r]`` fp32 raw rewards, one column per reward (filled by the module).
        features: when requested, the backbone features of every step, one ``[B, K, ...]`` tensor per tap, as the
            value head reads them before any of its parameters (``ValueHead.compress``: its ``patch_size``
            pooling; the raw features for a head without ``compress``), in the backbone's dtype (detached; lets
            the critic take extra regression passes without new backbone passes).
    """

    prompts: list[str]
    embeds: PromptEmbeds
    latents: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    images: torch.Tensor
    rewards: torch.Tensor | None = None
    features: list[torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def select(self, keep: torch.Tensor) -> "Rollout":
        """The trajectories where ``keep [B]`` (bool) is true, every field cut alike."""
        index = keep.nonzero().flatten()
        return Rollout(prompts=[self.prompts[i] for i in index.tolist()], embeds=self.embeds[index],
                       latents=self.latents[index], log_probs=self.log_probs[index], values=self.values[index],
                       images=self.images[index], rewards=self.rewards[index] if self.rewards is not None else None,
                       features=[f[index] for f in self.features] if self.features is not None else None)


def denoise(
    backbone: DiffusionBackbone,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: PromptEmbeds,
    cfg_scale: float = 1.0,
    uncond: PromptEmbeds | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One (optionally guided) backbone pass → ``(prediction [B, C, H, W], features)``.

    With ``cfg_scale != 1`` the unconditional and conditional halves run as ONE batched forward and
    ``prediction = u + cfg_scale · (c − u)``; features are those of the conditional half.
    """
    if cfg_scale == 1.0:
        out = backbone(latents, timesteps, embeds)
        return out.prediction, out.features
    if uncond is None:
        raise ValueError("classifier-free guidance needs unconditional prompt embeddings")
    batch = latents.shape[0]
    both = PromptEmbeds.cat([uncond, embeds])
    out = backbone(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
    u, c = out.prediction.chunk(2)
    return u + cfg_scale * (c - u), [f[batch:] for f in out.features]


def iteration_generator(seed: int, iteration: int, rank: int, purpose: int,
                        device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, iteration, rank, purpose)``: every iteration's randomness (prompts and
    rollout noise: purpose 0; minibatch order: purpose 1) is reproducible and independent of resumes."""
    mixed = ((seed * 1_000_003 + iteration) * 4099 + rank) * 17 + purpose
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


def sample_prompt_groups(prompts: Sequence[str], batch_size: int, group_size: int,
                         generator: torch.Generator) -> list[str]:
    """``batch_size`` prompts: ``batch_size / group_size`` uniform draws from ``prompts``, each repeated
    ``group_size`` times in a row (GRPO's groups; ``group_size = 1`` for the actor-critic)."""
    idx = torch.randint(len(prompts), (batch_size // group_size,), generator=generator, device=generator.device)
    return [prompts[i] for i in idx.tolist() for _ in range(group_size)]


ValueFn = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def rollout_values(value_head: nn.Module, features: Sequence[Sequence[torch.Tensor]], sampler: Sampler,
                   pooled: torch.Tensor, **read) -> torch.Tensor:
    """Every step's values in ONE value-head call: ``features[k][tap]`` ``[B, ...]`` → ``[B, K, R]`` fp32.

    The head sees the ``K·B`` states as one batch (step-major), with each step's diffusion time and the prompts'
    pooled embeddings repeated per step; per state it computes what a call per step would (the head treats each
    sample alone), but launches its kernels once per rollout instead of once per step, which is what the critic
    cost in a GPU rollout, where small kernels are launch-bound.
    """
    steps, batch = len(features), pooled.shape[0]
    device = pooled.device
    taps = [torch.cat(per_step, dim=0) for per_step in zip(*features)]
    t_frac = torch.cat([sampler.timestep_fraction(k).expand(batch) for k in range(steps)]).to(device)
    values = value_head(taps, t_frac, pooled.repeat(steps, 1), **read).float()
    return values.view(steps, batch, -1).transpose(0, 1)


@torch.no_grad()
def collect_rollout(
    backbone: DiffusionBackbone,
    sampler: Sampler,
    prompts: Sequence[str],
    value_head: nn.Module | None = None,
    num_values: int = 1,
    generator: torch.Generator | None = None,
    cfg_scale: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    keep_features: bool = False,
) -> Rollout:
    """Sample ``len(prompts)`` trajectories with the current policy.

    Args:
        backbone: the policy (and feature extractor).
        sampler: a set-up sampler; its ``num_steps`` is ``K``.
        prompts: one prompt per sample.
        value_head: critic ``(features, t_frac [B], pooled [B, P]) → [B, R]``; ``None`` stores zeros.
        num_values: ``R`` when there is no value head.
        generator: randomness of the initial noise and of every step (reproducible rollouts).
        cfg_scale: classifier-free guidance scale (1.0: off, the paper's default; ``None``: the backbone's
            ``cfg_scale``, the guidance the policy is trained with).
        device: where to run (default: the backbone's).
        dtype: latent dtype fed to the backbone (log-prob maths stays fp32).
        keep_features: store every step's (compressed) backbone features in :attr:`Rollout.features`.

    The value head runs once, on every step's (compressed) features together, after the chain
    (:func:`rollout_values`); until then those features are held, as :attr:`Rollout.features` holds them.
    """
    device = torch.device(device) if device is not None else next(backbone.denoiser.parameters()).device
    prompts = list(prompts)
    cfg_scale = backbone.cfg_scale if cfg_scale is None else cfg_scale
    embeds = backbone.encode_prompts(prompts).to(device)
    uncond = backbone.encode_negative(len(prompts)).to(device) if cfg_scale != 1.0 else None
    batch = len(prompts)
    x = sampler.init_noise((batch, *backbone.latent_shape), generator=generator, device=device)
    latents, log_probs, read_by_head, kept = [x], [], [], []
    compress = getattr(value_head, "compress", None)  # the head's parameter-free pooling: once per step
    read = {"compressed": True} if compress is not None else {}
    for k in range(sampler.num_steps):  # step indices stay Python ints: no device → host sync inside the loop
        t = sampler.timestep_for(k).to(device).expand(batch)
        prediction, features = denoise(backbone, x.to(dtype), t, embeds, cfg_scale, uncond)
        raw = features
        if compress is not None:  # the value reads the pooled features as they are; they are kept in raw's dtype
            features = [compress(f) for f in features]
        if keep_features:
            kept.append([f.to(r.dtype) for f, r in zip(features, raw)])
        if value_head is not None:
            read_by_head.append(features)
        step = sampler.step(prediction, k, x, generator=generator)
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
    if value_head is not None:
        values = rollout_values(value_head, read_by_head, sampler, embeds.pooled, **read)
    else:
        values = torch.zeros(batch, sampler.num_steps, num_values, device=device)
    return Rollout(
        prompts=prompts,
        embeds=embeds,
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        values=values,
        images=backbone.decode(x),
        features=[torch.stack(per_tap, dim=1) for per_tap in zip(*kept)] if keep_features else None,
    )
