"""Common pieces of the stochastic samplers: the step output, the Gaussian log-density, the `Sampler` base.

A denoising chain of ``K`` steps is an MDP (DESIGN §1): state ``s_k = (x_{t_k}, t_k, c)``, action
``a_k = x_{t_{k+1}}``, and the policy ``π_θ(a_k | s_k)`` is the Gaussian of one stochastic sampler step,

    x_{t_{k+1}} = μ_θ(x_{t_k}, t_k, c) + σ_k ξ,        ξ ~ N(0, I).

Every sampler family therefore provides one *pure* step function (tensor in, tensor out) returning the
sampled action together with its log-probability, and a thin `Sampler` object that reads a diffusers
scheduler once (`Sampler.setup`) and turns a per-sample step index ``k`` into the per-sample scalars the
pure function needs.  Per-sample scalars are ``[B]`` tensors so that every element of a batch may sit at a
*different* step: PPO minibatches shuffle (sample, step) pairs.

Conventions shared by all samplers:

* ``k = 0`` is the noisiest step, ``k = K - 1`` the last one (it produces the clean latent ``x_0``).
* Log-probabilities are the Gaussian log-density **averaged** (not summed) over the latent dimensions, one
  scalar per sample, always computed in float32.  This is why PPO clip ranges are tiny (1e-5 .. 1e-4).
* All step maths runs in float32 whatever the input dtype; `StepOutput` tensors are float32.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from lit_diffac.errors import ConfigError

__all__ = ["StepOutput", "Sampler", "gaussian_log_prob", "per_sample", "expand_like"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one stochastic sampler step.

    Attributes:
        prev_sample: ``[B, *latent]`` float32. The action ``x_{t_{k+1}}`` (sampled, or the one passed in).
        log_prob: ``[B]`` float32. ``log π(prev_sample | sample)`` averaged over latent dimensions; ``0`` for
            samples whose step is deterministic (``std == 0``, see `gaussian_log_prob`).
        mean: ``[B, *latent]`` float32. The Gaussian mean ``μ`` of the step (the deterministic update).
        std: ``[B]`` float32. The Gaussian standard deviation ``σ`` of the step (isotropic, per sample).
        pred_original_sample: ``[B, *latent]`` float32 or ``None``. The model's estimate of the clean latent
            ``x̂_0`` at this step (useful for previews and intermediate rewards).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def per_sample(value: float | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn a per-sample scalar (python number, 0-d or ``[B]`` tensor) into a float32 ``[B]`` tensor."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        return value.expand(batch_size)
    if value.shape != (batch_size,):
        raise ValueError(f"expected a scalar or a [B]={batch_size} tensor, got shape {tuple(value.shape)}")
    return value


def expand_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` so that it broadcasts against ``like`` ``[B, *latent]``."""
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    r"""Isotropic Gaussian log-density averaged over the non-batch dimensions, in float32.

    .. math::
        \log π(x) = \operatorname{mean}_{d}\Big[-\frac{(x_d - μ_d)^2}{2σ^2} - \log σ - \tfrac12 \log 2π\Big]

    Args:
        x: ``[B, *latent]`` the point to evaluate (any float dtype; it is *detached*: the density is that of a
            fixed action, gradients flow only through ``mean`` and ``std``).
        mean: ``[B, *latent]`` the Gaussian mean.
        std: ``[B]`` tensor (or a scalar) with the per-sample standard deviation.

    Returns:
        ``[B]`` float32 log-probabilities.  Where ``std == 0`` the step is deterministic and the density is
        undefined; those entries are **0** (so a PPO ratio there is exactly 1 and carries no gradient) rather
        than NaN/inf, which would poison a whole batch.  Samplers warn when a configured step has
        ``std == 0``.
    """
    x = x.detach().float()
    mean = mean.float()
    std = per_sample(std, x.shape[0], x.device)
    deterministic = std <= 0
    # Compute with a harmless stand-in std where it is 0 so that neither the values nor the gradients of the
    # discarded branch of `torch.where` are inf/NaN.
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    safe_std_b = expand_like(safe_std, x)
    log_density = -((x - mean) ** 2) / (2.0 * safe_std_b**2) - torch.log(safe_std_b) - _HALF_LOG_2PI
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else log_density
    return torch.where(deterministic, torch.zeros_like(log_prob), log_prob)


def sample_or_score(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``prev = mean + std·ξ`` (or take the given ``prev_sample``) and return ``(prev, log_prob)``.

    Args:
        mean: ``[B, *latent]`` float32 Gaussian mean.
        std: ``[B]`` float32 standard deviation.
        prev_sample: ``[B, *latent]`` action to score; when given, nothing is sampled.
        noise: ``[B, *latent]`` standard-normal ``ξ`` to use instead of drawing one.
        generator: torch generator (or one per sample) used to draw ``ξ`` when ``noise`` is ``None``.
    """
    if prev_sample is not None:
        if noise is not None:
            raise ValueError("pass either `prev_sample` (to score it) or `noise` (to sample), not both")
        if prev_sample.shape != mean.shape:
            raise ValueError(
                f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(mean.shape)}"
            )
        prev = prev_sample.float()
    else:
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(mean.shape)}")
        prev = mean + expand_like(std, mean) * noise.to(device=mean.device, dtype=torch.float32)
    return prev, gaussian_log_prob(prev, mean, std)


def step_window(spec: str | Sequence[int] | None, num_steps: int, what: str = "steps") -> list[int]:
    """A window of denoising step indices, sorted: ``None``/``"all"``, ``"first:N"``, ``"last:N"`` or a list.

    Step ``k`` is the transition ``x_{t_k} → x_{t_{k+1}}`` (``k = 0`` from pure noise, ``K − 1`` to the image).
    ``N`` larger than ``num_steps`` means every step.  ``what`` names the option in the error message.

    Raises:
        ConfigError: an unknown spec, an index outside ``[0, num_steps)`` or an empty window.
    """
    if spec is None or spec == "all":
        return list(range(num_steps))
    if isinstance(spec, str):
        where, _, n = spec.partition(":")
        if where not in ("first", "last") or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"{what} must be 'all', 'first:N', 'last:N' (N >= 1) or a list of step indices, "
                              f"got {spec!r}")
        n = min(int(n), num_steps)
        return list(range(n)) if where == "first" else list(range(num_steps - n, num_steps))
    indices = sorted({int(k) for k in spec})
    bad = [k for k in indices if not 0 <= k < num_steps]
    if bad or not indices:
        raise ConfigError(f"{what} {bad or 'is empty'}: step indices must lie in [0, {num_steps})")
    return indices


class Sampler(abc.ABC):
    """A stochastic sampler configured from a diffusers scheduler (an injected component of the modules).

    Construction only stores hyper-parameters (so that a recipe can build it through jsonargparse
    ``class_path``/``init_args``); `setup` reads the scheduler config and precomputes the per-step tables.
    Tables live on the CPU and are moved lazily (and cached) to the device of the tensors passed to `step`.

    Typical rollout::

        sampler.setup(pipe.scheduler)
        x = sampler.init_noise((B, C, H, W), generator=g, device=device)
        for k, t in enumerate(sampler.timesteps):
            out = backbone(x, t, cond)                     # ε̂ (DDIM) or v̂ (flow)
            step = sampler.step(out, k, x, generator=g)     # StepOutput
            x = step.prev_sample                            # store x, step.log_prob, ...

    Training recomputes ``sampler.step(out_new, k [B], x_k, prev_sample=x_{k+1}).log_prob``.

    Args:
        num_steps: number ``K`` of denoising steps of the chain (``>= 1``).
    """

    def __init__(self, num_steps: int = 10) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ConfigError(f"invalid {type(self).__name__}: num_steps must be an integer >= 1 "
                              f"(got {num_steps!r})")
        self.num_steps = int(num_steps)
        self.num_train_timesteps: int | None = None
        self._timesteps: torch.Tensor | None = None
        self._tables: dict[str, torch.Tensor] = {}
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ configuration
    @abc.abstractmethod
    def setup(self, scheduler: Any) -> None:
        """Read ``scheduler``'s config and precompute the per-step tables (the scheduler is not modified)."""

    @property
    def is_setup(self) -> bool:
        """Whether `setup` has been called."""
        return self._timesteps is not None

    def _check_setup(self) -> None:
        if not self.is_setup:
            raise RuntimeError(f"{type(self).__name__}.setup(scheduler) must be called before sampling")

    def _set_tables(self, timesteps: torch.Tensor, **tables: torch.Tensor) -> None:
        self._timesteps = timesteps.cpu()
        self._tables = {name: t.detach().to("cpu", torch.float32) for name, t in tables.items()}
        self._device_cache = {}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """Table ``name`` on ``device`` (moved once, then cached)."""
        self._check_setup()
        key = (name, torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = self._tables[name].to(device)
        return self._device_cache[key]

    def to(self, device: torch.device | str) -> "Sampler":
        """Eagerly move the precomputed tables to ``device`` (optional: `step` moves them lazily)."""
        for name in self._tables:
            self._table(name, torch.device(device))
        return self

    # ------------------------------------------------------------------ schedule
    @property
    def timesteps(self) -> torch.Tensor:
        """``[K]`` values passed to the backbone as its ``timestep`` argument; ``k = 0`` is the noisiest."""
        self._check_setup()
        return self._timesteps

    def timestep_for(
        self, step_index: int | torch.Tensor, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Backbone ``timestep`` values for per-sample step indices ``[B]`` (or an int → 0-d tensor)."""
        self._check_setup()
        index = torch.as_tensor(step_index, dtype=torch.long)
        self._check_index(index)
        out = self._timesteps[index.cpu()]
        return out.to(device if device is not None else index.device)

    def timestep_fraction(self, step_index: int | torch.Tensor) -> torch.Tensor:
        """Normalised diffusion time ``t_k / T`` in (0, 1] (1 ≈ pure noise), float32."""
        return self.timestep_for(step_index).float() / float(self.num_train_timesteps)

    def _check_index(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_steps):
            raise IndexError(f"step_index must lie in [0, {self.num_steps}), got {index.tolist()}")

    def _step_index(
        self, step_index: int | torch.Tensor, batch_size: int, device: torch.device
    ) -> torch.Tensor:
        """Per-sample long ``[B]`` step indices on ``device`` from an int or a ``[B]`` tensor."""
        self._check_setup()
        if isinstance(step_index, int):  # checked on the host: no device → host sync (rollouts step by int)
            self._check_index(torch.tensor(step_index))
            return torch.full((batch_size,), step_index, dtype=torch.long, device=device)
        index = torch.as_tensor(step_index, dtype=torch.long, device=device)
        if index.ndim == 0:
            index = index.expand(batch_size)
        if index.shape != (batch_size,):
            raise ValueError(
                f"step_index must be an int or a [B]={batch_size} tensor, got {tuple(index.shape)}"
            )
        self._check_index(index)
        return index

    # ------------------------------------------------------------------ sampling
    def init_noise(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The initial state ``x_{t_0} ~ N(0, I)`` of shape ``shape`` (one generator or one per sample)."""
        device = torch.device(device or "cpu")
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)

    @abc.abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        step_index: int | torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepOutput:
        """One stochastic step from ``sample`` ``[B, *latent]`` at step(s) ``step_index`` (int or ``[B]``).

        With ``prev_sample`` given its log-probability is returned and nothing is sampled; otherwise
        ``prev = mean + std·noise`` with ``noise`` drawn from ``generator`` when not given.
        """

    @abc.abstractmethod
    def guide(
        self,
        model_output: torch.Tensor,
        value_grad: torch.Tensor,
        step_index: int | torch.Tensor,
        scale: float | torch.Tensor,
        sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Test-time critic steering (DESIGN §6): shift ``model_output`` along ``g = ∇_x V(x_t, t, c)``.

        ``sample`` is the step's ``x_t`` (samplers that clip x̂0 need it to keep the step along ``g``).
        Returns ``model_output`` itself when ``scale == 0``; otherwise a float32 tensor.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"

    def _hparams(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}
