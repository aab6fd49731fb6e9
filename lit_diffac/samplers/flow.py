"""Flow-matching SDE step with its log-probability, for DiT / SD3-style velocity models (DESIGN §2).

Rectified flow interpolates ``x_σ = (1−σ) x0 + σ ε`` and the model predicts ``v ≈ ε − x0``; σ goes 1 → 0
and ``dt = σ_next − σ < 0``.  The deterministic Euler ODE step is ``x' = x + v dt``.  The SDE with the same
marginals (Flow-GRPO form) and noise level ``a`` is discretised as

    s  = a · √(σ / (1 − σ))                    (at σ = 1: s = a · √(σ / (1 − σ_next)), finite)
    μ  = x (1 + s² dt / (2σ)) + v (1 + s² (1−σ) / (2σ)) dt
    x' = μ + s √(−dt) ξ,    ξ ~ N(0, I)
    log π = mean_dims[ −(x' − μ)² / (2 (s√(−dt))²) − log(s√(−dt)) − ½ log 2π ]

With ``a = 0`` the mean is exactly ``FlowMatchEulerDiscreteScheduler.step(...).prev_sample``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lit_diffac.errors import ConfigError

from .base import Sampler, StepOutput, expand_like, per_sample, sample_or_score

__all__ = ["flow_sde_step_with_logprob", "FlowSDESampler"]


def flow_sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    r"""One flow-matching SDE step ``x_σ → x_{σ_next}`` and its Gaussian log-probability (pure function).

    Args:
        model_output: ``[B, *latent]`` predicted velocity ``v̂ ≈ ε − x0``.
        sample: ``[B, *latent]`` current state ``x_σ``.
        sigma: ``[B]`` (or scalar) current noise level σ ∈ (0, 1].
        sigma_next: ``[B]`` (or scalar) next noise level ``σ_next < σ`` (0 at the last step).
        noise_level: the SDE noise level ``a ≥ 0`` (0.7 for SD3.5-M in the paper; 0 gives the Euler ODE step).
        prev_sample: ``[B, *latent]`` a given action ``x_{σ_next}`` to score; when given nothing is sampled.
        noise: ``[B, *latent]`` standard-normal ξ to use instead of drawing it.
        generator: generator (or list, one per sample) used to draw ξ when neither ``noise`` nor
            ``prev_sample`` is given.

    Returns:
        `StepOutput` with float32 ``prev_sample`` ``[B, *latent]`` (all maths runs in float32 whatever the
        input dtype), ``log_prob`` ``[B]``, ``mean`` ``[B, *latent]``, ``std`` ``[B]`` (= ``s √(−dt)``) and
        ``pred_original_sample`` (``x̂0 = x − σ v̂``).  With ``noise_level = 0`` the step is deterministic,
        ``std == 0`` and ``log_prob`` is 0.

    Note:
        At σ = 1 the diffusion coefficient ``√(σ/(1−σ))`` is infinite; like Flow-GRPO we replace the σ inside
        ``(1 − σ)`` by ``σ_next`` there (only where σ ≥ 1), which keeps the first step finite.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        )

    batch_size, device = sample.shape[0], sample.device
    model_output = model_output.float()
    sample = sample.float()
    sigma = per_sample(sigma, batch_size, device)
    sigma_next = per_sample(sigma_next, batch_size, device)
    dt = sigma_next - sigma  # < 0

    # s = a √(σ / (1 − σ)), with σ_next in the denominator where σ = 1   ([B])
    denominator = 1.0 - torch.where(sigma >= 1.0, sigma_next, sigma)
    s = noise_level * (sigma / denominator).sqrt()
    std = s * (-dt).clamp(min=0.0).sqrt()

    sig, s_b, dt_b = expand_like(sigma, sample), expand_like(s, sample), expand_like(dt, sample)
    # μ = x (1 + s² dt / (2σ)) + v (1 + s² (1−σ) / (2σ)) dt
    mean = sample * (1.0 + s_b**2 * dt_b / (2.0 * sig))
    mean = mean + model_output * (1.0 + s_b**2 * (1.0 - sig) / (2.0 * sig)) * dt_b
    pred_original_sample = sample - sig * model_output

    prev, log_prob = sample_or_score(mean, std, prev_sample, noise, generator)
    return StepOutput(
        prev_sample=prev, log_prob=log_prob, mean=mean, std=std, pred_original_sample=pred_original_sample
    )


class FlowSDESampler(Sampler):
    """Flow-matching SDE sampler on a `diffusers.FlowMatchEulerDiscreteScheduler`'s sigmas (SD3 / DiT family).

    `setup` calls ``set_timesteps(num_steps, mu=...)`` on a *deep copy* of the scheduler (the caller's scheduler
    and its internal step counter are untouched) and stores its sigmas ``[K+1]`` (last = 0) and timesteps ``[K]``
    (``σ · num_train_timesteps``, what the transformer expects).  Shifting (``shift``, ``shift_terminal``,
    karras/exponential/beta sigmas) is therefore exactly diffusers'; the scheduler's own
    ``stochastic_sampling`` flag is ignored (this sampler is the stochastic one).

    A backbone whose pipeline sets timesteps differently hands out a scheduler subclass that says so: FLUX's
    (:class:`~lit_diffac.backbones.flux.FluxPipelineScheduler`) fills in ``FluxPipeline``'s sigmas
    ``linspace(1, 1/K, K)`` in its own ``set_timesteps`` and exposes the resolution-dependent shift of the
    backbone's image size as ``default_mu``, used when ``mu`` is not given here.

    Args:
        num_steps: number ``K`` of denoising steps.
        noise_level: SDE noise level ``a ≥ 0`` (0.7 for SD3.5-M, paper).
        mu: resolution-dependent shift of schedulers with ``use_dynamic_shifting=True``, passed through to
            ``set_timesteps``; needed only when the scheduler has no ``default_mu`` of its own (a FLUX backbone's
            scheduler has one: its image size's ``calculate_shift``).  Given, it overrides ``default_mu``.
    """

    def __init__(self, num_steps: int = 10, noise_level: float = 0.7, mu: float | None = None) -> None:
        super().__init__(num_steps)
        if not noise_level >= 0:
            raise ConfigError(f"invalid FlowSDESampler: noise_level must be >= 0 (got {noise_level!r})")
        self.noise_level = float(noise_level)
        self.mu = mu

    def _hparams(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "noise_level": self.noise_level, "mu": self.mu}

    @property
    def sigmas(self) -> torch.Tensor:
        """``[K+1]`` float32 noise levels, ``sigmas[0]`` the noisiest, ``sigmas[K] = 0``."""
        self._check_setup()
        return self._tables["sigmas"]

    def setup(self, scheduler: Any) -> None:
        """Read a `diffusers.FlowMatchEulerDiscreteScheduler` (a deep copy is configured)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ConfigError(
                "FlowSDESampler needs a diffusers.FlowMatchEulerDiscreteScheduler, "
                f"got {type(scheduler).__name__} (a DDIM backbone such as UNetBackbone takes DDIMSampler)"
            )
        if scheduler.config.invert_sigmas:
            raise ValueError("FlowSDESampler does not support invert_sigmas=True schedulers")
        mu = self.mu if self.mu is not None else getattr(scheduler, "default_mu", None)
        if scheduler.config.use_dynamic_shifting and mu is None:
            raise ConfigError("the scheduler uses dynamic shifting: pass FlowSDESampler(mu=...)")
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(self.num_steps, device="cpu", mu=mu)
        sigmas = scheduler.sigmas.detach().to("cpu", torch.float32)
        timesteps = scheduler.timesteps.detach().to("cpu", torch.float32)
        if sigmas.shape != (self.num_steps + 1,) or timesteps.shape != (self.num_steps,):
            raise ValueError(
                f"unexpected schedule shapes: sigmas {tuple(sigmas.shape)}, "
                f"timesteps {tuple(timesteps.shape)}"
            )
        if not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(f"sigmas must strictly decrease, got {sigmas.tolist()}")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self._set_tables(timesteps, sigmas=sigmas)

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int | torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepOutput:
        """`flow_sde_step_with_logprob` at per-sample step indices ``step_index`` (int or long ``[B]``)."""
        index = self._step_index(step_index, sample.shape[0], sample.device)
        sigmas = self._table("sigmas", sample.device)
        return flow_sde_step_with_logprob(
            model_output,
            sample,
            sigma=sigmas[index],
            sigma_next=sigmas[index + 1],
            noise_level=self.noise_level,
            prev_sample=prev_sample,
            noise=noise,
            generator=generator,
        )

    def guide(
        self,
        model_output: torch.Tensor,
        value_grad: torch.Tensor,
        step_index: int | torch.Tensor,
        scale: float | torch.Tensor,
        sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Critic steering for velocity models: ``v̂' = v̂ − scale · ∇_x V``.

        Since ``dt < 0`` the Euler update ``x + v̂' dt`` gains ``+scale·|dt|·∇_x V``: toward higher value.
        ``scale`` is a float or a ``[B]`` tensor; ``step_index`` and ``sample`` are accepted for interface symmetry.
        """
        if isinstance(scale, (int, float)) and scale == 0:
            return model_output
        batch_size, device = model_output.shape[0], model_output.device
        self._step_index(step_index, batch_size, device)
        coef = per_sample(scale, batch_size, device)
        return model_output.float() - expand_like(coef, model_output) * value_grad.float()
