"""PPO losses and diagnostics (pure functions returning named terms; DESIGN §4).

Log-probabilities here are per-sample *means* over latent dimensions (see `lit_diffac.samplers`), so the
ratios stay very close to 1 and the clip ranges are tiny (ε = 1e-5 for SD1.5, 1e-4 for SD3.5-M, paper).
All diagnostics are detached 0-d float32 tensors, ready to log.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PolicyLossOutput", "ppo_policy_loss", "ValueLossOutput", "value_loss", "gaussian_kl", "flow_grpo_kl",
           "reference_kl", "KL_FORMS", "explained_variance",
           "explained_variance_parts"]

#: The forms of the KL to the reference policy that :func:`reference_kl` computes.
KL_FORMS = ("exact", "flow_grpo")


@dataclass
class PolicyLossOutput:
    """Clipped-surrogate policy loss and its diagnostics (all 0-d tensors; only ``loss`` carries gradient).

    Attributes:
        loss: ``−mean(min(ρ A, clip(ρ, 1−ε, 1+ε) A))``.
        approx_kl: ``mean((ρ − 1) − log ρ)``, the low-variance estimator of KL(π_old ‖ π_new) (≥ 0).
        clipfrac: fraction of elements with ``|ρ − 1| > ε``.
        ratio_mean: mean of ``ρ = exp(log π_new − log π_old)``.
        ratio_min: minimum of ``ρ``.
        ratio_max: maximum of ``ρ``.
    """

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor


def ppo_policy_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> PolicyLossOutput:
    r"""PPO clipped surrogate (CleanRL form), computed in float32.

    .. math::
        ρ = \exp(\log π_{new} − \log π_{old}), \qquad
        L_π = −\operatorname{mean}\big(\min(ρ A,\ \operatorname{clip}(ρ, 1−ε, 1+ε) A)\big)

    Args:
        log_prob_new: ``[N]`` log-probabilities under the current policy (carries gradient).
        log_prob_old: ``[N]`` log-probabilities stored at rollout time (treated as constants).
        advantages: ``[N]`` advantages (already whitened / clipped; treated as constants).
        clip_range: ε > 0.

    Returns:
        `PolicyLossOutput`.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not (log_prob_new.shape == log_prob_old.shape == advantages.shape):
        raise ValueError(
            f"shape mismatch: log_prob_new {tuple(log_prob_new.shape)}, "
            f"log_prob_old {tuple(log_prob_old.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    log_ratio = log_prob_new.float() - log_prob_old.detach().float()
    ratio = log_ratio.exp()
    advantages = advantages.detach().float()

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()

    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    return PolicyLossOutput(
        loss=loss,
        approx_kl=((ratio - 1.0) - log_ratio).mean(),
        clipfrac=((ratio - 1.0).abs() > clip_range).float().mean(),
        ratio_mean=ratio.mean(),
        ratio_min=ratio.min(),
        ratio_max=ratio.max(),
    )


@dataclass
class ValueLossOutput:
    """Value loss and its diagnostic (0-d tensors; only ``loss`` carries gradient).

    Attributes:
        loss: ``½ mean((V − G)²)`` or its clipped form.
        clipfrac: fraction of elements with ``|V − V_old| > c`` (0 without clipping).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor


def value_loss(
    values: torch.Tensor,
    targets: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
) -> ValueLossOutput:
    r"""Squared-error value loss, optionally PPO-clipped around the rollout values (CleanRL form).

    .. math::
        L_V = ½ \operatorname{mean}(V − G)^2, \qquad
        L_V^{clip} = ½ \operatorname{mean}\max\big((V − G)^2, (V_{clip} − G)^2\big),\
        V_{clip} = V_{old} + \operatorname{clip}(V − V_{old}, −c, c)

    Args:
        values: ``[N]`` or ``[N, R]`` current predictions ``V`` (carries gradient).
        targets: same shape, value targets ``G`` (constants).
        old_values: same shape, rollout-time predictions ``V_old``; required with ``clip_range``.
        clip_range: ``c > 0`` or ``None`` for the plain loss.

    Returns:
        `ValueLossOutput` (the mean runs over all elements).
    """
    if values.shape != targets.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and targets {tuple(targets.shape)} must have the same shape"
        )
    values = values.float()
    targets = targets.detach().float()
    squared_error = (values - targets) ** 2
    if clip_range is None:
        return ValueLossOutput(loss=0.5 * squared_error.mean(), clipfrac=values.new_zeros(()))

    if old_values is None:
        raise ValueError("value_loss: clip_range needs old_values")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if old_values.shape != values.shape:
        raise ValueError(f"old_values {tuple(old_values.shape)} must have shape {tuple(values.shape)}")
    old_values = old_values.detach().float()
    delta = values - old_values
    values_clipped = old_values + delta.clamp(-clip_range, clip_range)
    loss = 0.5 * torch.maximum(squared_error, (values_clipped - targets) ** 2).mean()
    with torch.no_grad():
        clipfrac = (delta.abs() > clip_range).float().mean()
    return ValueLossOutput(loss=loss, clipfrac=clipfrac)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""Per-sample KL between two Gaussian steps of equal isotropic std, averaged over latent dimensions.

    .. math:: \operatorname{KL}\big(N(μ, σ^2 I)\,\|\,N(μ_{ref}, σ^2 I)\big) / D
              = \operatorname{mean}_d\, (μ_d − μ_{ref,d})^2 / (2σ^2)

    (the exact KL of the policy's step to the reference policy's step, per dimension, like the log-probs;
    flow_grpo's form, :func:`flow_grpo_kl`, is this times the step's ``|dt|``).

    Args:
        mean: ``[M, ...]`` the policy's step mean ``μ`` (carries gradient).
        ref_mean: ``[M, ...]`` the reference policy's step mean ``μ_ref`` (constant).
        std: ``[M]`` the step's std ``σ`` (shared by both steps).

    Returns:
        ``[M]`` KL per sample, float32 or wider.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must have equal shapes")
    if std.shape != mean.shape[:1]:
        raise ValueError(f"std must have shape {tuple(mean.shape[:1])}, got {tuple(std.shape)}")
    var = std.view(-1, *([1] * (mean.ndim - 1))) ** 2
    return ((mean - ref_mean.detach()) ** 2 / (2 * var)).flatten(1).mean(1)


def flow_grpo_kl(mean: torch.Tensor, ref_mean: torch.Tensor, diffusion_std: torch.Tensor) -> torch.Tensor:
    r"""flow_grpo's KL term to the reference (``scripts/train_sd3.py``): the squared mean difference over ``2 s²``.

    .. math:: \operatorname{mean}_d\, (μ_d − μ_{ref,d})^2 / (2 s^2)
              = \operatorname{KL}\big(N(μ, s^2|dt| I)\,\|\,N(μ_{ref}, s^2|dt| I)\big) / D \;·\; |dt|

    flow_grpo computes ``((prev_sample_mean − prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    / (2 * std_dev_t ** 2)`` and averages it over the batch, with ``std_dev_t = s = a √(σ / (1 − σ))`` the SDE's
    diffusion coefficient — not the step's std ``s √(−dt)``.  It is therefore the exact per-dimension KL
    (:func:`gaussian_kl`) times the step's ``|dt| = σ_k − σ_{k+1}``: smaller by ``1/|dt|`` (SD3's shift-3 schedule:
    3.7–112 at 10 steps, 14–115 at 40), so flow_grpo's ``β`` on step ``k`` is ours times ``1/|dt_k|``.  Since
    ``Σ_k |dt_k| = σ_0 − σ_K = 1``, the steps' mean ``|dt|`` is ``1/K`` (docs/baselines.md).

    Args:
        mean: ``[M, ...]`` the policy's step mean ``μ`` (carries gradient).
        ref_mean: ``[M, ...]`` the reference policy's step mean ``μ_ref`` (constant).
        diffusion_std: ``[M]`` ``s`` (flow_grpo's ``std_dev_t``).

    Returns:
        ``[M]`` per sample, float32 or wider.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must have equal shapes")
    if diffusion_std.shape != mean.shape[:1]:
        raise ValueError(f"diffusion_std must have shape {tuple(mean.shape[:1])}, got {tuple(diffusion_std.shape)}")
    squared = ((mean - ref_mean.detach()) ** 2).flatten(1).mean(1)
    return squared / (2 * diffusion_std**2)


def reference_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, form: str = "exact",
                 dt: torch.Tensor | None = None) -> torch.Tensor:
    r"""The per-sample KL term to the reference policy in the chosen form, from a sampler step's ``mean`` / ``std``.

    * ``"exact"``: :func:`gaussian_kl` — ``mean_d (μ − μ_ref)² / (2σ²)`` with ``σ`` the step's std (any sampler).
    * ``"flow_grpo"``: :func:`flow_grpo_kl` with ``s = σ / √|dt|`` (flow SDE steps, whose ``σ = s √(−dt)``) —
      ``mean_d (μ − μ_ref)² / (2 s²) = |dt| · exact``.

    Args:
        mean: ``[M, ...]`` the policy's step mean (carries gradient).
        ref_mean: ``[M, ...]`` the reference policy's step mean (constant).
        std: ``[M]`` the step's std ``σ``.
        form: one of :data:`KL_FORMS`.
        dt: ``[M]`` the steps' ``dt = σ_{k+1} − σ_k < 0`` (flow noise levels); needed by ``"flow_grpo"``.

    Returns:
        ``[M]`` per sample.
    """
    if form == "exact":
        return gaussian_kl(mean, ref_mean, std)
    if form != "flow_grpo":
        raise ValueError(f"form must be one of {KL_FORMS}, got {form!r}")
    if dt is None:
        raise ValueError("the flow_grpo KL needs the steps' dt (a flow-matching SDE sampler)")
    if dt.shape != std.shape:
        raise ValueError(f"dt must have shape {tuple(std.shape)}, got {tuple(dt.shape)}")
    if not bool((dt < 0).all()):
        raise ValueError("dt = sigma_next - sigma must be < 0 (flow steps go from noise to data)")
    return flow_grpo_kl(mean, ref_mean, std / (-dt.to(std)).sqrt())


@torch.no_grad()
def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Fraction of the target variance explained by the prediction: ``1 − Var(G − V) / Var(G)``.

    1 is perfect, 0 is no better than predicting the mean, negative is worse.  Variances are population
    variances over all elements (the ratio does not depend on the choice for N > 1).

    Args:
        pred: predictions ``V`` (any shape).
        target: targets ``G`` (same shape).

    Returns:
        0-d float32 tensor; NaN when the targets are all equal (``Var(G)`` zero up to float rounding: ``std(G) ≤
        1e-6 · max |G|``; e.g. a batch whose binary rewards are all 0, where rounding alone would otherwise
        give values like −1e13).
    """
    return explained_variance_parts(pred, target)[0]


@torch.no_grad()
def explained_variance_parts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r""":func:`explained_variance` with its two parts: ``[EV, Var(G), Var(G − V)]`` (population variances).

    Args:
        pred: predictions ``V`` (any shape).
        target: targets ``G`` (same shape).

    Returns:
        float32 tensor ``[3]`` (one host sync reads all three); EV is NaN where :func:`explained_variance` says.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have equal shapes")
    pred, target = pred.float().flatten(), target.float().flatten()
    var_target = target.var(unbiased=False)
    var_error = (target - pred).var(unbiased=False)
    ev = 1.0 - var_error / var_target
    constant = var_target <= (1e-6 * target.abs().max()) ** 2
    ev = torch.where(constant, torch.full_like(ev, float("nan")), ev)  # no host sync
    return torch.stack([ev, var_target, var_error])
