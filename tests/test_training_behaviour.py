"""Behaviour of one training step, on tiny toy backbones and planted data.

Each test checks WHAT the update does (log-probs move along the advantages, the critic regresses on the
right targets for the right states, every clip bites, the KL pulls toward the reference, steering raises the
value), so that one-line bugs in the module, the estimators or the guidance fail a test.
``python -m benchmarks.mutants`` plants such bugs and checks that these tests kill them.

Everything that touches the module's API (building it with its optimisers, a rollout, the update, its
per-step recomputation and its KL term) lives in the small helpers just below; no Trainer is needed.

The update is made a plain first-order step: all ``B·K`` (sample, step) pairs in ONE minibatch, no gradient
clipping, no weight decay, a wide PPO clip range, and an estimator that returns planted advantages.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from lit_diffac.estimators import Advantages, AdvantageEstimator, CriticGAE, GroupRelative, PerPromptStats
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules.actor_critic import LatentActorCritic
from lit_diffac.rewards.base import CallableReward
from lit_diffac.samplers import DDIMSampler, FlowSDESampler

B, K = 4, 4  # trajectories per rollout and denoising steps: 16 (sample, step) pairs, all in one minibatch
M = B * K


# ---------------------------------------------------------------------------------------------------------
# Helpers: the only code that knows the module's API.
# ---------------------------------------------------------------------------------------------------------
def _brightness(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def load_backbone(toy_pipelines, family: str, **kw):
    """A fresh toy backbone (``"dit"``: flow sampler, ``"unet"``: DDIM) loaded from its pipeline folder."""
    from lit_diffac.backbones.dit import DiTBackbone
    from lit_diffac.backbones.unet import UNetBackbone

    return (DiTBackbone if family == "dit" else UNetBackbone)(str(toy_pipelines[family]), **kw)


def make_sampler(backbone):
    return DDIMSampler(num_steps=K) if backbone.sampler_family == "ddim" else FlowSDESampler(num_steps=K)


#: The optimisers of each module made by :func:`make_module` (built without a Trainer).
_OPTIMIZERS: "weakref.WeakKeyDictionary[LatentActorCritic, tuple]" = weakref.WeakKeyDictionary()


def make_module(backbone, estimator: AdvantageEstimator, **kw) -> LatentActorCritic:
    """A module on ``backbone`` and its optimisers (no Trainer); one minibatch holds every (sample, step) pair."""
    estimator.reward_normalization = "none"
    options = dict(rewards=[CallableReward(_brightness, name="brightness")], sampler=make_sampler(backbone),
                   estimator=estimator, batch_size=B, minibatch_size=M, num_inner_epochs=1,
                   evaluation=HeldOutEvaluation(samples_per_prompt=1), clip_range=1.0, max_grad_norm=None,
                   optimizer=partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=0.0),
                   actor_lr=1e-5, critic_lr=1e-3)
    options.update(kw)
    module = LatentActorCritic(backbone=backbone, **options)
    _OPTIMIZERS[module] = module.build_optimizers()
    return module


def parts(module):
    """``(backbone, sampler, value_head)`` of the module (value head ``None`` without a critic)."""
    return module.backbone, module.sampler, module.value_head


def make_rollout(module, seed: int = 0):
    """A rollout of the module's current policy (and critic), scored by its rewards."""
    generator = torch.Generator().manual_seed(seed)
    rollout = module.roll_out(module.sample_prompts(generator), generator)
    rollout.rewards = module.score(rollout.images, rollout.prompts)
    return rollout


def run_update(module, rollout) -> dict[str, float]:
    """One PPO update on ``rollout`` with the module's optimisers; returns its metrics."""
    return module.update(rollout, *_OPTIMIZERS[module])


def optimizers(module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """The ``(actor, critic)`` torch optimisers (critic ``None`` without a value head)."""
    return _OPTIMIZERS[module]


def recompute(module, rollout, i: torch.Tensor, k: torch.Tensor):
    """The module's own recomputation on pairs ``(i, k)``: ``(log π [n], V [n, R] or None)``."""
    log_prob, values, _ = module.forward_step(rollout.latents[i, k], k, rollout.embeds[i], rollout.latents[i, k + 1])
    return log_prob, values


def module_kl(module, rollout, i: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The module's per-pair KL-to-reference term ``[n]`` on pairs ``(i, k)``."""
    with torch.no_grad():
        _, _, kl = module.forward_step(rollout.latents[i, k], k, rollout.embeds[i], rollout.latents[i, k + 1])
    return kl


# ---------------------------------------------------------------------------------------------------------
# Module-independent helpers
# ---------------------------------------------------------------------------------------------------------
ALL_I, ALL_K = torch.arange(B).repeat_interleave(K), torch.arange(K).repeat(B)  # every pair, row-major


class PlantedEstimator(AdvantageEstimator):
    """Fixed advantages ``[B, K]``; with a critic, value targets = the rollout's values + ``target_shift``."""

    def __init__(self, advantages: torch.Tensor, uses_critic: bool = False,
                 target_shift: torch.Tensor | None = None) -> None:
        super().__init__(advantage_clip=1e6)
        self.planted, self.uses_critic, self.target_shift = advantages, uses_critic, target_shift

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        targets = None
        if self.uses_critic:
            shift = self.target_shift if self.target_shift is not None else torch.zeros(values.shape[:2])
            targets = values + shift[..., None].to(values)
        return Advantages(advantages=self.planted.clone(), targets=targets,
                          per_reward=self.planted[..., None])


def pooled(features) -> torch.Tensor:
    """Backbone features (maps ``[n, C, H, W]`` or tokens ``[n, N, C]``) averaged over space: ``[n, ΣC]``."""
    return torch.cat([f.float().mean(dim=(2, 3)) if f.ndim == 4 else f.float().mean(dim=1)
                      for f in features], -1)


class LinearCritic(nn.Module):
    """A tiny critic whose value depends on the state: ``V = W·pooled(features) + b + w_t·t + b_t``."""

    def __init__(self, feature_dims, text_dim, num_outputs) -> None:
        super().__init__()
        self.features = nn.Linear(sum(feature_dims), num_outputs)
        self.time = nn.Linear(1, num_outputs)
        with torch.no_grad():
            weight = torch.randn(self.features.weight.shape, generator=torch.Generator().manual_seed(1))
            self.features.weight.copy_(weight)
            self.time.weight.fill_(3.0)
        self.detach_features = True

    def forward(self, features, t_frac, pooled_text):
        features = [f.detach() for f in features] if self.detach_features else features
        return self.features(pooled(features)) + self.time(t_frac.float()[:, None])


def pattern() -> torch.Tensor:
    """A recognisable advantage pattern ``[B, K]``: distinct values of both signs."""
    return (torch.arange(M, dtype=torch.float32).view(B, K) * 7 % 11 - 5) / 5


def independent_log_prob(module, rollout, i, k) -> torch.Tensor:
    """``log π(x_{k+1} | x_k)`` straight from the backbone and the sampler (not through the module)."""
    backbone, sampler, _ = parts(module)
    out = backbone(rollout.latents[i, k], sampler.timestep_for(k), rollout.embeds[i])
    step = sampler.step(out.prediction, k, rollout.latents[i, k], prev_sample=rollout.latents[i, k + 1])
    return step.log_prob


def all_log_probs(module, rollout) -> torch.Tensor:
    with torch.no_grad():
        return independent_log_prob(module, rollout, ALL_I, ALL_K).view(B, K)


def optimizer_params(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def gradients_at_step(optimizer):
    """Record every parameter's gradient (one flat vector) each time ``optimizer`` steps."""
    seen: list[torch.Tensor] = []

    def hook(opt, args, kwargs):
        seen.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                               for p in optimizer_params(opt)]).clone())

    handle = optimizer.register_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def flat_grad(scalar: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(scalar, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _whiten(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False)


# ---------------------------------------------------------------------------------------------------------
# 1. The actor step moves log-probs along the advantages
# ---------------------------------------------------------------------------------------------------------
def _actor_step_delta(toy_pipelines, advantages: torch.Tensor) -> torch.Tensor:
    """``log π_new − log π_old`` ``[B, K]`` after one actor step with planted advantages (no critic)."""
    torch.manual_seed(0)
    module = make_module(load_backbone(toy_pipelines, "dit"), PlantedEstimator(advantages))
    rollout = make_rollout(module)
    before = all_log_probs(module, rollout)
    run_update(module, rollout)
    return all_log_probs(module, rollout) - before


def test_actor_step_moves_log_probs_along_the_advantages(toy_pipelines):
    advantages = pattern()
    assert (advantages * _actor_step_delta(toy_pipelines, advantages)).sum() > 0
    # the same rollout with reversed advantages moves the other way: the first-order effect dominates
    assert (advantages * _actor_step_delta(toy_pipelines, -advantages)).sum() < 0


@pytest.mark.parametrize("pair", [(1, 2), (3, 0)])
def test_one_large_advantage_moves_its_own_log_prob(toy_pipelines, pair):
    deltas = {}
    for value in (-50.0, 0.0, 50.0):
        advantages = pattern()
        advantages[pair] = value
        deltas[value] = _actor_step_delta(toy_pipelines, advantages)[pair]
    assert deltas[50.0] > deltas[0.0] > deltas[-50.0]
    assert deltas[50.0] > 0 > deltas[-50.0]


# ---------------------------------------------------------------------------------------------------------
# 2. The advantage of pair (i, k) multiplies the gradient of log π at (i, k), and nothing else
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, pair", [("dit", (2, 1)), ("unet", (1, 3))])
def test_policy_gradient_is_that_of_the_planted_pair(toy_pipelines, family, pair):
    """One nonzero advantage A at (i, k): the actor's gradient is −(A / M) ∇ log π(i, k) (L = −mean(A·ρ),
    ρ = 1 before the step), with log π recomputed straight from the backbone and the sampler."""
    torch.manual_seed(0)
    advantages = torch.zeros(B, K)
    advantages[pair] = 3.0
    module = make_module(load_backbone(toy_pipelines, family), PlantedEstimator(advantages), actor_lr=0.0)
    rollout = make_rollout(module)
    actor, _ = optimizers(module)
    with gradients_at_step(actor) as seen:
        run_update(module, rollout)
    assert len(seen) == 1
    i, k = torch.tensor([pair[0]]), torch.tensor([pair[1]])
    log_prob = independent_log_prob(module, rollout, i, k).sum()
    expected = flat_grad(-(3.0 / M) * log_prob, optimizer_params(actor))
    assert expected.norm() > 0
    torch.testing.assert_close(seen[0], expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# 3. The critic: values recomputed at the rollout's states, regressed on the targets of the same pair
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dit", "unet"])
def test_recomputed_values_equal_the_rollout_values(toy_pipelines, family):
    torch.manual_seed(0)
    module = make_module(load_backbone(toy_pipelines, family), PlantedEstimator(pattern(), uses_critic=True),
                         value_head=LinearCritic, value_clip_range=1e-4, actor_lr=0.0)
    rollout = make_rollout(module)
    assert rollout.values.std() > 0.1  # the value depends on the state and the time: a misread one differs
    with torch.no_grad():
        _, values = recompute(module, rollout, ALL_I, ALL_K)
    torch.testing.assert_close(values.view(B, K, -1), rollout.values, atol=1e-5, rtol=1e-5)
    # in the update, before any step, no recomputed value lies beyond a tiny clip around its stored value
    assert run_update(module, rollout)["train/value_clipfrac"] == 0.0


@pytest.mark.parametrize("family, pair", [("dit", (1, 2)), ("unet", (3, 1))])
def test_value_gradient_is_that_of_the_planted_target(toy_pipelines, family, pair):
    """Targets = the stored values except at one pair (+1): the critic's gradient is that pair's alone,
    −(1 / M) ∇V(i, k) for ½ mean (V − G)², and the step moves that value toward its target."""
    torch.manual_seed(0)
    shift = torch.zeros(B, K)
    shift[pair] = 1.0
    module = make_module(load_backbone(toy_pipelines, family),
                         PlantedEstimator(torch.zeros(B, K), True, shift), value_head=LinearCritic,
                         actor_lr=0.0, critic_lr=1e-2)
    rollout = make_rollout(module)
    _, critic = optimizers(module)
    with gradients_at_step(critic) as seen:
        run_update(module, rollout)
    assert len(seen) == 1
    # ∇V of the linear critic, from the backbone's features at the stored state x_k and the time of step k
    backbone, sampler, _ = parts(module)
    i, k = torch.tensor([pair[0]]), torch.tensor([pair[1]])
    with torch.no_grad():
        features = backbone(rollout.latents[i, k], sampler.timestep_for(k), rollout.embeds[i]).features
    grad_v = torch.cat([pooled(features).flatten(), torch.ones(1), sampler.timestep_fraction(k).float(),
                        torch.ones(1)])  # ∂V/∂(W, b, w_t, b_t)
    torch.testing.assert_close(seen[0], -grad_v / M, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        _, values = recompute(module, rollout, i, k)
    assert 0 < values[0, 0] - rollout.values[pair][0] < 1


@pytest.mark.parametrize("actor_lr, weight_decay", [(1e-3, 0.0), (0.0, 0.5)])
def test_detached_critic_leaves_the_policy_alone(toy_pipelines, actor_lr, weight_decay):
    """value_gradient='detached', zero advantages: the update trains the value head and never the backbone
    (no value gradient reaches it, and the critic optimiser, weight decay included, owns only the head)."""
    torch.manual_seed(0)
    module = make_module(load_backbone(toy_pipelines, "dit"),
                         PlantedEstimator(torch.zeros(B, K), True, torch.ones(B, K)), value_head=LinearCritic,
                         actor_lr=actor_lr, critic_lr=1e-2,
                         optimizer=partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=weight_decay),
                         value_gradient="detached")
    rollout = make_rollout(module)
    backbone, _, head = parts(module)
    policy = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters()}
    critic = [p.detach().clone() for p in head.parameters()]
    run_update(module, rollout)
    assert all(torch.equal(policy[n], p) for n, p in backbone.denoiser.named_parameters())
    assert all(not torch.equal(a, b) for a, b in zip(critic, head.parameters()))


# ---------------------------------------------------------------------------------------------------------
# 4. The estimators: each reward whitened before weighting, γ and λ used, global statistics under DDP
# ---------------------------------------------------------------------------------------------------------
def test_combine_gives_rewards_on_different_scales_equal_influence():
    torch.manual_seed(0)
    n = 2 * B
    rewards = torch.stack([torch.randn(n), 100 * torch.randn(n)], -1)  # scales 1 and 100
    values = torch.stack([torch.randn(n, K), 100 * torch.randn(n, K)], -1)
    out = CriticGAE()(rewards, values, ["p"] * n, torch.ones(2))
    per_reward = rewards[:, None] - values  # γ = λ = 1: A_k = R − V_k
    torch.testing.assert_close(out.advantages, _whiten(per_reward[..., 0]) + _whiten(per_reward[..., 1]))
    corr = [torch.corrcoef(torch.stack([out.advantages.flatten(), per_reward[..., j].flatten()]))[0, 1]
            for j in range(2)]
    assert abs(corr[0] - corr[1]) < 0.2 and min(corr) > 0.5
    # the weights then scale each whitened reward's share
    weighted = CriticGAE()(rewards, values, ["p"] * n, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(weighted.advantages,
                               2 * _whiten(per_reward[..., 0]) + 0.5 * _whiten(per_reward[..., 1]))


def test_combine_whitens_with_the_gathered_statistics():
    """Under DDP each reward is whitened with the statistics of every process's advantages."""
    torch.manual_seed(0)
    rewards, values = torch.randn(B, 2), torch.randn(B, K, 2)
    others = torch.randn(3 * B, K) + 2.0  # what the other processes hold (for either reward)
    out = CriticGAE()(rewards, values, ["p"] * B, torch.ones(2), gather=lambda x: torch.cat([x, others]))

    def whiten_pooled(x):
        pool = torch.cat([x, others])
        return (x - pool.mean()) / pool.std(unbiased=False)

    per_reward = rewards[:, None] - values
    expected = whiten_pooled(per_reward[..., 0]) + whiten_pooled(per_reward[..., 1])
    torch.testing.assert_close(out.advantages, expected)


def test_critic_gae_uses_gamma_and_lambda():
    """λ = 0: one-step TD advantages ``V_{k+1} − V_k`` (``R − V_{K−1}`` last) and targets ``V_{k+1}``;
    γ = 0: every advantage but the last is ``−V_k``."""
    torch.manual_seed(0)
    rewards, values = torch.randn(B, 1), torch.randn(B, K, 1)
    next_values = torch.cat([values[:, 1:], rewards[:, None]], 1)
    td = CriticGAE(gamma=1.0, lam=0.0, target_clip=1e6)(rewards, values, ["p"] * B, torch.ones(1))
    torch.testing.assert_close(td.per_reward, next_values - values)
    torch.testing.assert_close(td.targets, next_values)
    myopic = CriticGAE(gamma=0.0, lam=1.0)(rewards, values, ["p"] * B, torch.ones(1))
    expected = torch.cat([-values[:, :-1], next_values[:, -1:] - values[:, -1:]], 1)
    torch.testing.assert_close(myopic.per_reward, expected)


# ---------------------------------------------------------------------------------------------------------
# 5. Every clip bites on data beyond it (the PPO ratio clip: tests/test_losses.py)
# ---------------------------------------------------------------------------------------------------------
def test_critic_gae_clips_advantages_and_targets():
    torch.manual_seed(0)
    rewards = torch.tensor([[8.0], [-7.0], [1.0], [0.5]])
    values = 0.1 * torch.randn(4, K, 1)
    out = CriticGAE(advantage_clip=0.8, target_clip=2.0)(rewards, values, ["p"] * 4, torch.ones(1))
    whitened = _whiten(rewards[:, None, 0] - values[..., 0])
    assert whitened.abs().max() > 1.0  # the data exceed the clip …
    torch.testing.assert_close(out.advantages, whitened.clamp(-0.8, 0.8))  # … which bites
    assert out.targets.max() == 2.0 and out.targets.min() == -2.0
    torch.testing.assert_close(out.targets[2:], rewards[2:, None].expand(-1, K, -1))  # within: untouched


def test_per_prompt_stats_clips_advantages():
    rewards = torch.tensor([[0.0], [1.0], [2.0], [30.0]])
    out = PerPromptStats(buffer_size=8, min_count=8, advantage_clip=1.0)(rewards, torch.zeros(4, K, 1),
                                                                          ["a"] * 4, torch.ones(1))
    standardised = _whiten(rewards[:, 0])
    assert standardised.max() > 1.5
    expected = standardised.clamp(-1.0, 1.0)[:, None].expand(-1, K)
    torch.testing.assert_close(out.advantages, expected, atol=1e-5, rtol=1e-5)


def test_group_relative_clips_advantages_and_ranks_within_groups():
    rewards = torch.tensor([[0.0], [1.0], [2.0], [30.0], [5.0], [-5.0]])
    prompts = ["a", "a", "a", "a", "b", "b"]
    out = GroupRelative(advantage_clip=1.0)(rewards, torch.zeros(6, K, 1), prompts, torch.ones(1))
    standardised = torch.cat([_whiten(rewards[:4, 0]), _whiten(rewards[4:, 0])])
    assert standardised.abs().max() > 1.5
    expected = standardised.clamp(-1.0, 1.0)[:, None].expand(-1, K)
    torch.testing.assert_close(out.advantages, expected, atol=1e-3, rtol=1e-3)
    assert out.advantages[4, 0] > 0 > out.advantages[5, 0]  # the better sample of a group is reinforced


# ---------------------------------------------------------------------------------------------------------
# 6. Critic steering raises the critic's value
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dit", "unet"])
def test_steering_raises_the_value_of_the_next_state(toy_pipelines, family):
    """Steer one step (K−2) with the same noise: the value of the state it produces (the value at the last
    step, which ``steered_sample`` reports) is higher than without steering, for every sample."""
    from lit_diffac.guidance import steered_sample

    backbone = load_backbone(toy_pipelines, family)
    if family == "unet":  # x̂0 clipping reverses ε-guidance on clipped pixels (the sampler warns about it)
        config = backbone.scheduler.config
        backbone.scheduler = type(backbone.scheduler).from_config(config, clip_sample=False)
    sampler = make_sampler(backbone)
    sampler.setup(backbone.scheduler)
    head = LinearCritic(backbone.feature_dims, backbone.pooled_dim, 1)
    prompts = ["the digit 1", "the number two", "a handwritten digit 3", "digit 7"]
    values = {}
    for scale in (0.0, 1.0):
        out = steered_sample(backbone, sampler, head, prompts, scale=scale, steps=[K - 2],
                             generator=torch.Generator().manual_seed(3))
        values[scale] = out.values[:, 0]
    assert (values[1.0] > values[0.0]).all(), values


# ---------------------------------------------------------------------------------------------------------
# 7. The KL to the reference policy
# ---------------------------------------------------------------------------------------------------------
def _naive_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(μ_ref, σ²I)) / D from torch.distributions, dimension by dimension."""
    scale = std.view(-1, *([1] * (mean.ndim - 1))).expand_as(mean)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, scale),
                                           torch.distributions.Normal(ref_mean, scale))
    return kl.flatten(1).mean(1)


def test_gaussian_kl_is_the_closed_form_kl():
    from lit_diffac.losses import gaussian_kl

    torch.manual_seed(0)
    mean, ref_mean = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    std = torch.tensor([0.3, 1.0, 2.5])
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), _naive_kl(mean, ref_mean, std))


def _lora_module(toy_pipelines, kl_coef: float, actor_lr: float = 0.0):
    """A LoRA DiT policy moved away from its reference (the base model) after the rollout; zero advantages."""
    torch.manual_seed(0)
    backbone = load_backbone(toy_pipelines, "dit", lora_rank=4)
    module = make_module(backbone, PlantedEstimator(torch.zeros(B, K)), kl_coef=kl_coef, actor_lr=actor_lr)
    rollout = make_rollout(module)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    return module, rollout


def test_module_kl_is_the_gaussian_kl_of_policy_and_reference_steps(toy_pipelines):
    module, rollout = _lora_module(toy_pipelines, kl_coef=0.1)
    backbone, sampler, _ = parts(module)
    x, t, embeds = rollout.latents[ALL_I, ALL_K], sampler.timestep_for(ALL_K), rollout.embeds[ALL_I]
    with torch.no_grad():
        policy = sampler.step(backbone(x, t, embeds).prediction, ALL_K, x,
                              prev_sample=rollout.latents[ALL_I, ALL_K + 1])
        backbone.denoiser.disable_adapters()
        try:
            reference = sampler.step(backbone(x, t, embeds).prediction, ALL_K, x)
        finally:
            backbone.denoiser.enable_adapters()
    expected = _naive_kl(policy.mean, reference.mean, policy.std)
    assert expected.min() > 0
    torch.testing.assert_close(module_kl(module, rollout, ALL_I, ALL_K), expected, rtol=1e-4, atol=1e-8)


def test_kl_term_pulls_the_policy_toward_the_reference(toy_pipelines):
    """Zero advantages: the only actor gradient is the KL's, and one step lowers the KL."""
    module, rollout = _lora_module(toy_pipelines, kl_coef=1.0, actor_lr=1e-3)
    before = module_kl(module, rollout, ALL_I, ALL_K).mean()
    run_update(module, rollout)
    after = module_kl(module, rollout, ALL_I, ALL_K).mean()
    assert after < 0.9 * before, (before, after)


def test_flow_grpo_kl_form_is_the_exact_kl_times_the_step_dt(toy_pipelines):
    from lit_diffac.errors import ConfigError
    from lit_diffac.losses import flow_grpo_kl

    module, rollout = _lora_module(toy_pipelines, kl_coef=0.1)
    exact = module_kl(module, rollout, ALL_I, ALL_K)
    module.hparams.kl_form = "flow_grpo"
    flow = module_kl(module, rollout, ALL_I, ALL_K)
    sigmas = module.sampler.sigmas
    dt = sigmas[ALL_K] - sigmas[ALL_K + 1]
    assert dt.min() > 0 and not torch.allclose(flow, exact)
    torch.testing.assert_close(flow, exact * dt)
    backbone, sampler, _ = parts(module)  # and flow_grpo's own formula, with its diffusion coefficient s = σ/√|dt|
    x, t, embeds = rollout.latents[ALL_I, ALL_K], sampler.timestep_for(ALL_K), rollout.embeds[ALL_I]
    with torch.no_grad():
        policy = sampler.step(backbone(x, t, embeds).prediction, ALL_K, x, prev_sample=rollout.latents[ALL_I, ALL_K + 1])
        backbone.denoiser.disable_adapters()
        try:
            reference = sampler.step(backbone(x, t, embeds).prediction, ALL_K, x)
        finally:
            backbone.denoiser.enable_adapters()
    torch.testing.assert_close(flow, flow_grpo_kl(policy.mean, reference.mean, policy.std / dt.sqrt()),
                               rtol=1e-4, atol=1e-9)
    unet = load_backbone(toy_pipelines, "unet", lora_rank=4)
    with pytest.raises(ConfigError, match="kl_form='flow_grpo' needs a FlowSDESampler"):
        make_module(unet, PlantedEstimator(torch.zeros(B, K)), kl_coef=0.1, kl_form="flow_grpo",
                    sampler=DDIMSampler(num_steps=K))
    with pytest.raises(ConfigError, match="kl_form must be one of"):
        make_module(unet, PlantedEstimator(torch.zeros(B, K)), kl_form="approx")
