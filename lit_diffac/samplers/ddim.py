"""DDIM with a stochastic (η > 0) step and its log-probability, for UNet / SD1.5-style ε-models (DESIGN §2).

With ``ᾱ`` the scheduler's ``alphas_cumprod``, ``t`` the current and ``t'`` the previous (less noisy)
timestep:

    x̂0  = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                                  (for prediction_type="epsilon")
    σ_t = η · √((1−ᾱ_{t'}) / (1−ᾱ_t)) · √(1 − ᾱ_t / ᾱ_{t'})
    μ   = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ_t²) ε̂
    x_{t'} = μ + σ_t ξ,   ξ ~ N(0, I)
    log π = mean_dims[ −(x_{t'} − μ)² / (2σ_t²) − log σ_t − ½ log 2π ]

With η = 0, μ is exactly ``diffusers.DDIMScheduler.step(...).prev_sample``; with η > 0 and the same ξ the
sample equals diffusers' ``step(..., eta=η, variance_noise=ξ)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from lit_diffac.errors import ConfigError

from .base import Sampler, StepOutput, expand_like, per_sample, sample_or_score

__all__ = ["ddim_step_with_logprob", "DDIMSampler", "trailing_timesteps"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: float | torch.Tensor,
    alpha_prod_t_prev: float | torch.Tensor,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    r"""One stochastic DDIM step ``x_t → x_{t'}`` and its Gaussian log-probability (pure function).

    Args:
        model_output: ``[B, *latent]`` backbone output, interpreted according to ``prediction_type``:
            ``"epsilon"`` (ε̂), ``"v_prediction"`` (v̂ = √ᾱ ε − √(1−ᾱ) x0) or ``"sample"`` (x̂0).
        sample: ``[B, *latent]`` current state ``x_t``.
        alpha_prod_t: ``[B]`` (or scalar) ``ᾱ_t`` of each sample's current timestep.
        alpha_prod_t_prev: ``[B]`` (or scalar) ``ᾱ_{t'}`` of each sample's next (less noisy) timestep; the
            scheduler's ``final_alpha_cumprod`` when ``t' < 0``.
        eta: η ≥ 0, the DDIM stochasticity (η = 1 for RL rollouts: DDPM-like variance; η = 0: deterministic).
        prediction_type: see ``model_output``.
        clip_sample: clamp x̂0 to ``[-clip_sample_range, clip_sample_range]`` as diffusers does (ε̂ is *not*
            re-derived from the clipped x̂0, like diffusers' default ``use_clipped_model_output=False``).
        clip_sample_range: see ``clip_sample``.
        prev_sample: ``[B, *latent]`` a given action ``x_{t'}`` to score; when given nothing is sampled.
        noise: ``[B, *latent]`` standard-normal ξ to use instead of drawing it.
        generator: generator (or list, one per sample) used to draw ξ when neither ``noise`` nor
            ``prev_sample`` is given.

    Returns:
        `StepOutput` with float32 ``prev_sample`` ``[B, *latent]`` (all maths runs in float32 whatever the
        input dtype, and the action is returned unrounded so that its stored log-prob is exactly reproducible;
        cast it yourself for the next backbone call), ``log_prob`` ``[B]``, ``mean`` ``[B, *latent]``,
        ``std`` ``[B]`` (= σ_t) and ``pred_original_sample`` (x̂0, after clipping).  Where ``std == 0``
        (η = 0, or ``ᾱ_{t'} = 1`` at the last step with ``set_alpha_to_one=True``) the step is deterministic,
        ``prev_sample == mean`` (or the given one) and ``log_prob`` is 0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        )

    batch_size, device = sample.shape[0], sample.device
    model_output = model_output.float()
    sample = sample.float()
    alpha_t = per_sample(alpha_prod_t, batch_size, device)
    alpha_prev = per_sample(alpha_prod_t_prev, batch_size, device)
    beta_t = 1.0 - alpha_t

    # σ_t = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})      ([B])
    variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0.0).sqrt()

    a_t, b_t = expand_like(alpha_t, sample), expand_like(beta_t, sample)
    if prediction_type == "epsilon":
        pred_original_sample = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - a_t.sqrt() * pred_original_sample) / b_t.sqrt()
    else:  # v_prediction
        pred_original_sample = a_t.sqrt() * sample - b_t.sqrt() * model_output
        pred_epsilon = a_t.sqrt() * model_output + b_t.sqrt() * sample

    if clip_sample:
        pred_original_sample = pred_original_sample.clamp(-clip_sample_range, clip_sample_range)

    # μ = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ_t²) ε̂. The clamp only absorbs float rounding at η = 1 (the
    # radicand is ≥ 0 for η ≤ 1) and keeps η > 1 finite.
    a_prev = expand_like(alpha_prev, sample)
    direction_coef = (1.0 - a_prev - expand_like(std, sample) ** 2).clamp(min=0.0).sqrt()
    mean = a_prev.sqrt() * pred_original_sample + direction_coef * pred_epsilon

    prev, log_prob = sample_or_score(mean, std, prev_sample, noise, generator)
    return StepOutput(
        prev_sample=prev, log_prob=log_prob, mean=mean, std=std, pred_original_sample=pred_original_sample
    )


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """diffusers' ``timestep_spacing="trailing"``: ``round(arange(T, 0, −T/K)) − 1``, int64 ``[K]``.

    The first timestep is always ``T − 1`` (pure noise) and the last is ``≈ T/K − 1 > 0``, so the final step
    still has a non-zero variance (unlike "leading" spacing, whose last step lands on ``t = 0``).

    The expression is diffusers' own (bit-identical values), truncated to ``K`` entries: for some ``(T, K)``
    (e.g. ``T = 1000, K = 61``) floating-point ``arange`` yields ``K + 1`` values and diffusers' schedule then
    ends with a spurious ``t = −1`` step.
    """
    step_ratio = num_train_timesteps / num_steps
    timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio))[:num_steps].astype(np.int64) - 1
    if len(timesteps) != num_steps:  # pragma: no cover - arange never returns fewer than K values here
        raise ValueError(f"could not build {num_steps} trailing timesteps from T={num_train_timesteps}")
    return timesteps


class DDIMSampler(Sampler):
    """Stochastic DDIM over a `diffusers.DDIMScheduler`'s noise schedule (SD1.5 / UNet family).

    `setup` copies the scheduler's ``alphas_cumprod``, ``final_alpha_cumprod`` (which honours its
    ``set_alpha_to_one``), ``prediction_type``, ``clip_sample`` (unless the constructor overrides it),
    ``clip_sample_range`` and ``num_train_timesteps``.  The timesteps are always computed with **trailing**
    spacing, whatever the scheduler's own ``timestep_spacing``: with "leading" spacing the last step lands on ``t = 0`` where
    σ_t = 0 and the log-probability is undefined (DESIGN §2).  As in diffusers, the previous timestep of
    ``t`` is ``t' = t − T // K`` (when ``K`` does not divide ``T`` this can differ by one from the next
    timestep of the chain; the update is still the one diffusers computes).

    Args:
        num_steps: number ``K`` of denoising steps.
        eta: DDIM η ≥ 0 (1.0 for RL rollouts; 0.0 gives deterministic DDIM with zero log-probs).
        clip_sample: clamp x̂0 to the clip range at every step, as diffusers does when the scheduler's
            ``clip_sample`` is true; ``None`` (default) takes the scheduler's setting. Where x̂0 is clamped its
            gradient is zero, so the step's mean responds to ε̂ only through the direction term, with the
            opposite sign and a smaller coefficient: a policy that clips can hardly be trained at the steps
            where most of x̂0 is clipped (the toy UNets clip 75–90 % of x̂0 at the first step; SD1.5's scheduler
            does not clip). ``False`` samples without clipping whatever the scheduler says.
    """

    def __init__(self, num_steps: int = 10, eta: float = 1.0, clip_sample: bool | None = None) -> None:
        super().__init__(num_steps)
        if not eta >= 0:
            raise ConfigError(f"invalid DDIMSampler: eta must be >= 0 (got {eta!r})")
        if clip_sample is not None and not isinstance(clip_sample, bool):
            raise ConfigError(f"invalid DDIMSampler: clip_sample must be true, false or null (got {clip_sample!r})")
        self.eta = float(eta)
        self.clip_sample_override = clip_sample
        self.prediction_type = "epsilon"
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = 1.0
        self._warned_clip = False
        self.init_noise_sigma = 1.0

    def _hparams(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "eta": self.eta, "clip_sample": self.clip_sample_override}

    def setup(self, scheduler: Any) -> None:
        """Read a `diffusers.DDIMScheduler` (not modified) and precompute ᾱ_t, ᾱ_{t'} and σ_t per step."""
        from diffusers import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            raise ConfigError(
                f"DDIMSampler needs a diffusers.DDIMScheduler, got {type(scheduler).__name__}; "
                "convert it with DDIMScheduler.from_config(scheduler.config) (a flow-matching backbone "
                "such as DiTBackbone takes FlowSDESampler)"
            )
        config = scheduler.config
        if config.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")
        if config.thresholding:
            raise ValueError("DDIMSampler does not support dynamic thresholding (config.thresholding=True)")
        T, K = int(config.num_train_timesteps), self.num_steps
        if K > T:
            raise ConfigError(f"invalid DDIMSampler: num_steps={K} exceeds the scheduler's "
                              f"num_train_timesteps={T}")

        alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
        final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        timesteps = torch.from_numpy(trailing_timesteps(T, K))
        prev_timesteps = timesteps - T // K
        alpha_t = alphas_cumprod[timesteps]
        alpha_prev = torch.where(
            prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final_alpha_cumprod
        )

        self.num_train_timesteps = T
        self.prediction_type = config.prediction_type
        self.clip_sample = bool(config.clip_sample) if self.clip_sample_override is None else self.clip_sample_override
        self.clip_sample_range = float(config.clip_sample_range)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self._set_tables(timesteps, alpha_t=alpha_t, alpha_prev=alpha_prev)

        if self.eta > 0:
            variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
            std = self.eta * variance.clamp(min=0).sqrt()
            zero = (std <= 0).nonzero().flatten().tolist()
            if zero:
                warnings.warn(
                    f"DDIMSampler: steps {zero} have zero variance (ᾱ_t' = 1; set_alpha_to_one=True?); their "
                    "log-probability is 0 and they carry no policy gradient. Use set_alpha_to_one=False.",
                    stacklevel=2,
                )

    def init_noise(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``x_{t_0} = init_noise_sigma · ξ`` with ξ ~ N(0, I) (``init_noise_sigma`` is 1 for DDIM)."""
        noise = super().init_noise(shape, generator=generator, device=device, dtype=dtype)
        return noise * self.init_noise_sigma if self.init_noise_sigma != 1.0 else noise

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int | torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepOutput:
        """`ddim_step_with_logprob` at per-sample step indices ``step_index`` (int or long ``[B]``)."""
        index = self._step_index(step_index, sample.shape[0], sample.device)
        return ddim_step_with_logprob(
            model_output,
            sample,
            alpha_prod_t=self._table("alpha_t", sample.device)[index],
            alpha_prod_t_prev=self._table("alpha_prev", sample.device)[index],
            eta=self.eta,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
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
        r"""Critic steering for ε-models: ``ε̂' = ε̂ − scale · √(1−ᾱ_t) · ∇_x V`` (classifier-guidance form).

        Lowering ε̂ along ``g`` raises x̂0 along ``g`` by ``scale·(1−ᾱ_t)/√ᾱ_t · g`` and lowers the direction term
        by ``√(1−ᾱ_{t−1}−σ²)·scale·√(1−ᾱ_t)·g``; the first wins at every step, so the step moves toward higher value.

        With ``clip_sample`` the step clips x̂0, and on a clipped element only the direction term moves: the step
        would go *against* ``g`` there.  Given the step's ``sample`` x_t, the shift is therefore applied only where
        x̂0 lies inside the clip range both before and after it, so every element moves along ``g`` or not at all
        (without ``sample`` it is applied everywhere, with a warning).  Only ``prediction_type="epsilon"`` is
        supported.  ``scale`` is a float or a ``[B]`` tensor.
        """
        if isinstance(scale, (int, float)) and scale == 0:
            return model_output
        if self.prediction_type != "epsilon":
            raise NotImplementedError(
                f"guide() supports prediction_type='epsilon' only, not {self.prediction_type!r}"
            )
        if self.clip_sample and sample is None and not self._warned_clip:
            warnings.warn("critic steering with clip_sample=True and no sample: where x̂0 is clipped the ε-shift "
                          "only moves the direction term, which pushes the step AGAINST the value gradient; pass "
                          "the step's sample (guide(..., sample=x_t)) so those elements are left unsteered",
                          stacklevel=2)
            self._warned_clip = True
        batch_size, device = model_output.shape[0], model_output.device
        index = self._step_index(step_index, batch_size, device)
        alpha = self._table("alpha_t", device)[index]
        coef = per_sample(scale, batch_size, device) * (1.0 - alpha).sqrt()
        eps = model_output.float()
        guided = eps - expand_like(coef, model_output) * value_grad.float()
        if not self.clip_sample or sample is None:
            return guided
        a_t = expand_like(alpha, sample)

        def x0_inside(e: torch.Tensor) -> torch.Tensor:  # x̂0 of the step's own formula, before its clipping
            return ((sample.float() - (1.0 - a_t).sqrt() * e) / a_t.sqrt()).abs() <= self.clip_sample_range

        return torch.where(x0_inside(eps) & x0_inside(guided), guided, eps)
