"""Advantage estimation and normalisation (pure, framework-free; DESIGN §3).

The denoising MDP has ``K`` steps per trajectory and a terminal reward only.  Shapes follow the rollout
layout ``[B, K]`` (sample, step), ``k = 0`` being the noisiest step.  Any trailing dimensions (e.g. one per
reward, ``[B, K, R]``) are carried along unchanged by `compute_gae` and `terminal_rewards`.

Typical use (one reward; loop over rewards for several)::

    reward = standardize(reward, gather=gather)                 # [B]
    rewards = terminal_rewards(reward, num_steps=K)             # [B, K]
    advantages, returns = compute_gae(rewards, values, gamma=1.0, lam=1.0)
    advantages = clip_advantages(whiten(advantages, gather=gather), 10.0)
    returns = clip_advantages(returns, 5.0)                     # value targets (paper: ±5)

``gather`` is an optional callable that concatenates a tensor across processes, e.g. in a LightningModule
``lambda t: self.all_gather(t).flatten()``, so that normalisation statistics are global.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["compute_gae", "terminal_rewards", "whiten", "standardize", "clip_advantages"]

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    last_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation over the steps of fixed-length trajectories.

    With ``V_K = last_values`` (0 by default: the chain ends at ``x_0``):

    .. math::
        δ_k = r_k + γ V_{k+1} − V_k, \qquad A_k = δ_k + γλ A_{k+1} = \sum_{l \ge 0} (γλ)^l δ_{k+l},
        \qquad G_k = A_k + V_k .

    With γ = λ = 1 and a terminal reward ``R`` this is ``A_k = R − V_k`` and ``G_k = R``.

    Args:
        rewards: ``[B, K, *]`` per-step rewards ``r_k``.
        values: ``[B, K, *]`` critic values ``V_k = V(x_{t_k}, t_k, c)`` from the rollout.
        gamma: discount γ.
        lam: GAE λ.
        last_values: ``[B, *]`` bootstrap value ``V_K`` after the last step; zeros when ``None``.

    Returns:
        ``(advantages, returns)``, both ``[B, K, *]`` in (at least) float32, detached from any graph.
    """
    if rewards.shape != values.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have the same shape"
        )
    if rewards.ndim < 2:
        raise ValueError(f"expected [B, K, ...] tensors, got shape {tuple(rewards.shape)}")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards = rewards.detach().to(dtype)
    values = values.detach().to(dtype)
    if last_values is None:
        last_values = torch.zeros_like(values[:, 0])
    elif last_values.shape != values[:, 0].shape:
        raise ValueError(
            f"last_values must have shape {tuple(values[:, 0].shape)}, got {tuple(last_values.shape)}"
        )

    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_values = last_values.detach().to(dtype)
    last_gae = torch.zeros_like(next_values)
    for k in reversed(range(num_steps)):
        delta = rewards[:, k] + gamma * next_values - values[:, k]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, k] = last_gae
        next_values = values[:, k]
    returns = advantages + values
    return advantages, returns


def terminal_rewards(reward: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Spread a terminal reward over a ``K``-step trajectory: ``r_k = 0`` for ``k < K−1``, ``r_{K−1} = R``.

    Args:
        reward: ``[B, *]`` final rewards ``R``.
        num_steps: ``K``.

    Returns:
        ``[B, K, *]`` per-step rewards (same dtype and device as ``reward``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    rewards = reward.new_zeros((reward.shape[0], num_steps) + tuple(reward.shape[1:]))
    rewards[:, -1] = reward
    return rewards


def whiten(
    x: torch.Tensor,
    eps: float = 1e-8,
    shift_mean: bool = True,
    gather: GatherFn | None = None,
) -> torch.Tensor:
    r"""Normalise by the mean and standard deviation over **all** elements (optionally across processes).

    .. math::
        \hat x = (x − \bar x) / (s + ε) \quad\text{(shift\_mean=True)}, \qquad
        \hat x = x / (s + ε) \quad\text{(shift\_mean=False: scale only, the sign of x is kept)}

    ``x̄`` and ``s`` are computed in float32 on ``gather(x)`` (all processes' elements) when ``gather`` is
    given, else on ``x``.  ``s`` is the *population* standard deviation (``unbiased=False``): identical to the
    unbiased one up to a factor ``√(N/(N−1))`` for the large N of a rollout batch, and it returns 0 (not NaN)
    for a single element.  The statistics are computed without gradient.

    Args:
        x: tensor of any shape (e.g. advantages ``[B, K]``).
        eps: added to the standard deviation.
        shift_mean: subtract the mean (True) or only rescale (False).
        gather: optional ``Tensor -> Tensor`` concatenating ``x`` across processes (any output shape).

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    with torch.no_grad():
        pool = x.detach() if gather is None else gather(x.detach())
        pool = pool.float().flatten()
        if pool.numel() == 0:
            raise ValueError("cannot whiten an empty tensor")
        mean = pool.mean()
        std = pool.std(unbiased=False)
    out = (x.float() - mean) if shift_mean else x.float()
    return (out / (std + eps)).to(x.dtype)


def standardize(x: torch.Tensor, eps: float = 1e-8, gather: GatherFn | None = None) -> torch.Tensor:
    """Standardise rewards ``(x − mean) / (std + eps)`` over all (gathered) elements; see `whiten`.

    Call it once per reward (``[B]``) so that rewards on different scales contribute comparably.
    """
    return whiten(x, eps=eps, shift_mean=True, gather=gather)


def clip_advantages(x: torch.Tensor, max_abs: float) -> torch.Tensor:
    """Symmetric clamp to ``[−max_abs, max_abs]`` (paper: advantages ±10, value targets ±5)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return x.clamp(-max_abs, max_abs)
