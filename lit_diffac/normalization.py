"""Running reward statistics (per reward), kept in the module's state so checkpoints carry them."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Running mean / variance of ``R`` streams, merged batch by batch (Chan et al. parallel update).

    Buffers (saved in checkpoints): ``count`` (scalar), ``mean [R]``, ``var [R]`` (population variance).
    """

    def __init__(self, num_streams: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_streams, dtype=torch.float64))
        self.register_buffer("var", torch.ones(num_streams, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x [N, R]`` into the statistics."""
        x = x.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − mean) / (std + eps)`` with the current statistics, in ``x``'s dtype."""
        return ((x - self.mean.to(x)) / (self.var.sqrt().to(x) + self.eps)).to(x.dtype)


class RewardNormalizer(nn.Module):
    """Standardise each reward before GAE (DESIGN §3).

    Args:
        num_rewards: number of reward columns.
        mode: ``"running"`` (statistics of every reward seen so far, gathered across processes; stable
            critic targets), ``"batch"`` (this iteration's batch only), or ``"none"``.
    """

    def __init__(self, num_rewards: int, mode: str = "running") -> None:
        super().__init__()
        if mode not in ("running", "batch", "none"):
            raise ValueError(f"reward normalisation must be 'running', 'batch' or 'none', got {mode!r}")
        self.mode = mode
        self.stats = RunningMeanStd(num_rewards)

    def forward(self, rewards: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``rewards [B, R]`` (this process) → standardised ``[B, R]``; updates running statistics."""
        if self.mode == "none":
            return rewards
        pool = gather(rewards).reshape(-1, rewards.shape[-1]) if gather is not None else rewards
        if self.mode == "batch":
            stats = RunningMeanStd(rewards.shape[-1]).to(rewards.device)
            stats.update(pool)
            return stats.normalize(rewards)
        self.stats.update(pool)
        return self.stats.normalize(rewards)
