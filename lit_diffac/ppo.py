"""The PPO update over (sample, step) pairs, as pure functions (torchrl style: terms returned by name).

:func:`shuffled_pairs` (a random subset of steps) or :func:`advantage_pairs` (the steps with the largest
``|A|``) decides which (trajectory, step) pairs an inner epoch trains on and in what order;
:func:`minibatch_loss` combines the clipped policy loss, the value loss and the optional KL to the reference
into the loss of one minibatch; :func:`clip_and_step` clips and applies the gradients of explicit optimisers.
:class:`~lit_diffac.modules.LatentActorCritic` strings them together; tests call them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lit_diffac.distributed import clip_grad_norm
from lit_diffac.losses import (PolicyLossOutput, ValueLossOutput, explained_variance, explained_variance_parts,
                               ppo_policy_loss, value_loss)


def _window(num_steps: int, steps: Sequence[int] | None, device: torch.device | str | None) -> torch.Tensor:
    """The step indices that may be trained, ``[W]`` (``None``: all ``num_steps``)."""
    return torch.arange(num_steps, device=device) if steps is None else torch.as_tensor(list(steps), device=device)


def shuffled_pairs(batch: int, num_steps: int, timestep_fraction: float, generator: torch.Generator,
                   device: torch.device | str | None = None, steps: Sequence[int] | None = None) -> torch.Tensor:
    """The ``(i, k)`` pairs of one inner epoch, ``[batch · ⌈fraction · W⌉, 2]``, in training order.

    ``steps`` (default: all ``K = num_steps``) is the window of ``W`` step indices that may be trained.  Each
    trajectory keeps a random subset of ``⌈fraction · W⌉`` of them (all at fraction 1; DDPO's timestep
    fraction); the kept pairs of all trajectories are then shuffled together.
    """
    window = _window(num_steps, steps, device)
    kept = max(1, math.ceil(timestep_fraction * len(window)))
    order = torch.argsort(torch.rand(batch, len(window), generator=generator, device=device), dim=1)
    pairs = torch.stack(torch.meshgrid(torch.arange(batch, device=device), window, indexing="ij"), -1)
    pairs = torch.gather(pairs, 1, order[..., None].expand(-1, -1, 2))[:, :kept].reshape(-1, 2)
    return pairs[torch.randperm(len(pairs), generator=generator, device=device)]


def advantage_pairs(advantages: torch.Tensor, timestep_fraction: float, generator: torch.Generator,
                    steps: Sequence[int] | None = None) -> torch.Tensor:
    """The ``(i, k)`` pairs of one inner epoch chosen by the critic, ``[B · ⌈fraction · W⌉, 2]``, in training order.

    Each trajectory ``i`` keeps the ``⌈fraction · W⌉`` steps of the window ``steps`` (default: all ``W = K``) with
    the largest ``|A_{i,k}|`` (``advantages [B, K]``; ties: the earlier step), where its per-step advantages say the
    most about the policy: with a critic, ``A_k = G − V(x_{t_k})`` (λ = 1) is near 0 at the steps whose outcome the
    critic already predicts, and a clipped-PPO gradient is proportional to ``A``. The kept pairs of all trajectories
    are then shuffled together, as in :func:`shuffled_pairs`. Critic-free advantages are equal along a trajectory,
    so this needs a critic.
    """
    batch, num_steps = advantages.shape
    window = _window(num_steps, steps, advantages.device)
    kept = max(1, math.ceil(timestep_fraction * len(window)))
    ranked = torch.argsort(-advantages.detach()[:, window].abs(), dim=1, stable=True)[:, :kept]  # [B, kept]
    rows = torch.arange(batch, device=advantages.device)[:, None].expand(-1, kept)
    pairs = torch.stack([rows, window[ranked]], -1).reshape(-1, 2)
    return pairs[torch.randperm(len(pairs), generator=generator, device=generator.device).to(pairs.device)]


@dataclass
class MinibatchTerms:
    """The loss of one PPO minibatch and its parts.

    Attributes:
        loss: what is backpropagated: ``L_π (if the actor trains) + β · mean KL + L_V (if there is a critic)``.
        policy: the clipped-surrogate loss and its diagnostics (always computed, for logging).
        value: the value loss, or ``None`` without a critic.
        kl: ``[M]`` per-sample KL to the reference policy, or ``None`` without one.
    """

    loss: torch.Tensor
    policy: PolicyLossOutput
    value: ValueLossOutput | None
    kl: torch.Tensor | None

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The minibatch's ``train/…`` diagnostics (0-d tensors)."""
        p = self.policy
        out = {"train/policy_loss": p.loss, "train/approx_kl": p.approx_kl, "train/clipfrac": p.clipfrac,
               "train/ratio_mean": p.ratio_mean, "train/ratio_min": p.ratio_min, "train/ratio_max": p.ratio_max}
        if self.value is not None:
            out.update({"train/value_loss": self.value.loss, "train/value_clipfrac": self.value.clipfrac})
        if self.kl is not None:
            out["train/kl_to_reference"] = self.kl.mean()
        return out


def minibatch_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                   values: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                   old_values: torch.Tensor | None = None, value_clip_range: float | None = None,
                   kl: torch.Tensor | None = None, kl_coef: float = 0.0, train_actor: bool = True) -> MinibatchTerms:
    r"""One minibatch's PPO loss.

    .. math:: L = [\text{train\_actor}]\,L_π(ρ, A; ε) + β\,\operatorname{mean} KL + L_V(V, G; V_{old}, c)

    Args:
        log_prob: ``[M]`` ``log π_new`` of the pairs (carries gradient).
        old_log_prob: ``[M]`` the rollout's ``log π_old``.
        advantages: ``[M]`` the estimator's advantages of the same pairs.
        clip_range: PPO ratio clip ε.
        values: ``[M, R]`` the critic's ``V`` of the pairs (carries gradient), or ``None`` without a critic.
        targets: ``[M, R]`` value targets ``G`` (needed with ``values``).
        old_values: ``[M, R]`` the rollout's ``V_old`` (the centre of the value clip).
        value_clip_range: clip of ``V`` around ``V_old`` (``None``: plain squared error).
        kl: ``[M]`` per-sample KL to the reference policy (carries gradient), or ``None``.
        kl_coef: β.
        train_actor: whether the policy loss enters the total (``False``: value-only iterations).
    """
    policy = ppo_policy_loss(log_prob, old_log_prob, advantages, clip_range)
    loss = policy.loss if train_actor else torch.zeros((), device=log_prob.device)
    if kl is not None:
        loss = loss + kl_coef * kl.mean()
    value = None
    if values is not None:
        value = value_loss(values, targets, old_values, value_clip_range)
        loss = loss + value.loss
    return MinibatchTerms(loss=loss, policy=policy, value=value, kl=kl)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of ``params`` in place (if ``max_norm``); return their total norm before clipping.

    Under FSDP a process holds only its shards of the gradients: the norm is then summed over the processes, so
    every process clips by the whole gradient's norm (:func:`lit_diffac.distributed.clip_grad_norm`; without FSDP
    it is ``torch.nn.utils.clip_grad_norm_``).
    """
    return clip_grad_norm(params, max_norm)


def zero_grad(groups: Iterable[tuple[str, torch.optim.Optimizer | None, list[nn.Parameter]]]) -> None:
    """Clear the gradients of every group's optimiser (``None`` optimisers are skipped)."""
    for _, optimizer, _ in groups:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)


def clip_and_step(groups: Iterable[tuple[str, torch.optim.Optimizer | None, list[nn.Parameter]]],
                  max_grad_norm: float | None, check: Callable[[float, str], None]) -> dict[str, float]:
    """Clip each group's gradients, check every norm, then step each optimiser.

    Args:
        groups: ``(name, optimizer, parameters)``; a ``None`` optimiser skips its group (frozen policy).
        max_grad_norm: per-group clip (``None``: off).
        check: ``check(norm, name)`` raises when a norm is not finite (before any optimiser steps).

    Returns:
        ``{"train/<name>_grad_norm": norm before clipping}``.
    """
    groups = [g for g in groups if g[1] is not None]
    norms = {f"train/{name}_grad_norm": clip_gradients(params, max_grad_norm) for name, _, params in groups}
    for key, norm in norms.items():
        check(norm, key.split("/")[1])
    for _, optimizer, _ in groups:
        optimizer.step()
    return norms


def value_diagnostics(values: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Explained variance of the rollout's values, overall, per reward and per third of the chain, with its two
    parts overall and per third: ``train/return_var[_<third>]`` = Var(G) and ``train/value_error_var[_<third>]``
    = Var(G − V) (population variances), which :class:`~lit_diffac.history.RunHistory` pools over iterations."""
    num_steps = values.shape[1]
    spans = {"": slice(0, num_steps), "_early": slice(0, max(1, num_steps // 3)),
              "_middle": slice(num_steps // 3, 2 * num_steps // 3), "_late": slice(2 * num_steps // 3, num_steps)}
    out = {}
    for bucket, sl in spans.items():  # the whole chain, then each third
        if values[:, sl].numel():
            ev, var_target, var_error = explained_variance_parts(values[:, sl], targets[:, sl]).tolist()
            out.update({f"train/explained_variance{bucket}": ev, f"train/return_var{bucket}": var_target,
                        f"train/value_error_var{bucket}": var_error})
    if values.shape[-1] > 1:  # one value output per reward
        for j, name in enumerate(names):
            out[f"train/explained_variance/{name}"] = explained_variance(values[..., j], targets[..., j]).item()
    return out


def reward_statistics(rewards: torch.Tensor, names: list[str], weights: torch.Tensor | None = None
                      ) -> dict[str, float]:
    """``reward/<name>_mean`` and ``reward/<name>_std`` (population) of ``rewards [B, R]``, one column per name;
    with two or more rewards also ``reward/total_mean`` / ``reward/total_std`` of ``Σ_i w_i r_i`` (raw rewards,
    ``weights [R]``, default all 1)."""
    out = {}
    for j, name in enumerate(names):
        out[f"reward/{name}_mean"] = rewards[:, j].mean().item()
        out[f"reward/{name}_std"] = rewards[:, j].std(unbiased=False).item()
    if len(names) > 1:
        total = (rewards * (weights if weights is not None else rewards.new_ones(len(names))).to(rewards)).sum(-1)
        out["reward/total_mean"], out["reward/total_std"] = total.mean().item(), total.std(unbiased=False).item()
    return out


def build_optimizer(factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
                    params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``factory(params)`` at learning rate ``lr`` (its own ``lr`` is replaced); ``None``: AdamW with betas
    (0.9, 0.95) and weight decay 1e-4 (DESIGN §6), with the multi-tensor (``foreach``) update everywhere — torch
    picks it by default only on GPUs; on CPUs it gives the same bits, faster."""
    if factory is None:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=1e-4, foreach=True)
    optimizer = factory(params)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.defaults["lr"] = lr
    return optimizer


def apply_learning_rates(optimizers: Iterable[tuple[str, torch.optim.Optimizer | None, float]],
                         schedulers: Sequence[Any] | None = None) -> list[str]:
    """Set each ``(name, optimizer, lr)``'s learning rate (a resumed run's optimiser states carry the old one);
    return a message for each one that changed.

    With ``schedulers`` (one per optimiser present, in order) the restored schedule keeps its place: when the
    recipe's ``lr`` differs from a schedule's base rate, the base rate becomes ``lr`` and the current rate is
    rescaled by ``lr / base`` (exact for schedules proportional to the base rate: cosine to 0, step, linear,
    exponential, lambda).
    """
    messages = []
    present = [(name, opt, lr) for name, opt, lr in optimizers if opt is not None]
    schedulers = list(schedulers) if schedulers is not None else [None] * len(present)
    for (name, optimizer, lr), scheduler in zip(present, schedulers):
        if scheduler is not None:
            old = set(scheduler.base_lrs)
            if old != {lr}:
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] *= lr / base
                    group["initial_lr"] = lr
                scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
                messages.append(f"{name} base learning rate {', '.join(f'{v:g}' for v in sorted(old))} -> {lr:g}, "
                                "schedule rescaled (the recipe's value replaces the checkpoint's)")
            continue
        old = {group["lr"] for group in optimizer.param_groups}
        if old != {lr}:
            for group in optimizer.param_groups:
                group["lr"] = lr
            messages.append(f"{name} learning rate {', '.join(f'{v:g}' for v in sorted(old))} -> {lr:g} "
                            "(the recipe's value replaces the checkpoint's)")
    return messages
