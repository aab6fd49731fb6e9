"""The critic replay: FIFO bookkeeping, exact pair lookup, one regression step against a hand computation, and the
``critic_replay=CriticReplay(...)`` component of the RL modules."""

import copy

import pytest
import torch
from torch import nn

from lit_diffac.critic_replay import CriticReplay, fit_critic, fit_from_rollout
from lit_diffac.faults import NonFiniteUpdate
from lit_diffac.rewards.base import CallableReward


def _entry(tag: float, n: int = 3, steps: int = 4):
    """Features whose every entry encodes (tag, trajectory, step), so a drawn pair can be traced back."""
    i = torch.arange(n, dtype=torch.float32)[:, None].expand(n, steps)
    k = torch.arange(steps, dtype=torch.float32)[None].expand(n, steps)
    code = tag * 100 + i * 10 + k  # [n, K]
    features = [code[..., None, None].expand(n, steps, 2, 5).clone(), -code[..., None].clone()]  # tokens, vector
    pooled = tag * 100 + torch.arange(n, dtype=torch.float32)[:, None] * 10 * torch.ones(n, 6)
    return features, pooled, code[..., None].clone(), code[..., None] + 0.5


class Probe(nn.Module):
    """A value 'head' that reads the first feature's first entry and a learnable bias."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.01]))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, features, t_frac, pooled):
        return (features[0][:, 0, 0] * self.w + self.b + 0 * t_frac)[:, None]


def test_fifo_keeps_the_last_iterations():
    replay = CriticReplay(iterations=2, storage_dtype=None)
    for tag in (1.0, 2.0, 3.0):
        replay.add(*_entry(tag))
    assert len(replay.entries) == 2 and len(replay) == 2 * 3 * 4
    assert replay.entries[0].targets[0, 0, 0] == 200  # iteration 1 dropped


def test_minibatches_draw_distinct_stored_pairs_with_matching_fields():
    replay = CriticReplay(iterations=3, storage_dtype=None)  # exact codes: the features' own fp32
    for tag in (1.0, 2.0, 3.0):
        replay.add(*_entry(tag))
    seen = []
    for features, k, pooled, targets, old in replay.minibatches(30, 7, torch.Generator().manual_seed(0)):
        assert len(k) <= 7
        code = targets[:, 0]
        assert torch.equal(features[0][:, 0, 0], code) and torch.equal(features[1][:, 0], -code)
        assert torch.equal(k.float(), code % 10)  # the step index is the pair's own step
        assert torch.equal(pooled[:, 0], code - code % 10)  # the prompt embedding of the pair's trajectory
        assert torch.equal(old[:, 0], code + 0.5)
        seen += code.tolist()
    assert len(seen) == 30 == len(set(seen))  # without replacement
    everything = [c for *_, t, _ in replay.minibatches(10_000, 64, torch.Generator()) for c in t[:, 0].tolist()]
    assert sorted(everything) == sorted(torch.cat([e.targets.flatten() for e in replay.entries]).tolist())


@pytest.mark.parametrize("storage_dtype, stored", [(torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16),
                                                    (None, torch.float32)])
def test_storage_dtype(storage_dtype, stored):
    replay = CriticReplay(iterations=1, storage_dtype=storage_dtype)
    replay.add(*_entry(1.0))
    assert replay.entries[0].features[0].dtype == stored
    assert replay.entries[0].targets.dtype == torch.float32  # only the features are cast
    features, *_ = next(replay.minibatches(4, 4, torch.Generator()))
    assert features[0].dtype == torch.float32  # read back in fp32


def test_defaults_and_validation():
    replay = CriticReplay()
    assert (replay.capacity, replay.passes, replay.minibatch_size, replay.checkpoint, replay.storage_dtype) == \
        (32, 2, None, True, torch.bfloat16)
    with pytest.raises(ValueError, match=r"invalid CriticReplay: iterations must be >= 1 \(got 0\); "
                                         r"passes must be >= 1 \(got 0\)"):
        CriticReplay(iterations=0, passes=0)


def test_minibatch_size_zero_is_rejected():
    with pytest.raises(ValueError, match=r"invalid CriticReplay: minibatch_size must be >= 1 \(got 0\)"):
        CriticReplay(minibatch_size=0)


def test_one_pass_one_minibatch_equals_a_hand_computed_sgd_step():
    replay = CriticReplay(iterations=1, storage_dtype=None)
    features, pooled, targets, old = _entry(0.0, n=2, steps=3)
    replay.add(features, pooled, targets, old)
    head = Probe()
    expected = copy.deepcopy(head)
    lr = 1e-4
    fit = fit_critic(head, replay, torch.optim.SGD(head.parameters(), lr=lr), passes=1, pairs_per_pass=6,
                     minibatch_size=6, timestep_fraction=lambda k: k.float() / 3, generator=torch.Generator())
    # Naive reference: the loss ½ mean((w·x + b − G)²) over all six pairs, one gradient step by hand.
    x, g = features[0][..., 0, 0].flatten(), targets.flatten()
    residual = expected.w * x + expected.b - g
    loss = 0.5 * (residual ** 2).mean()
    grad_w, grad_b = (residual * x).mean(), residual.mean()
    assert fit["loss"] == pytest.approx(loss.item(), rel=1e-6) and fit["minibatches"] == 1
    assert head.w.item() == pytest.approx((expected.w - lr * grad_w).item(), rel=1e-6)
    assert head.b.item() == pytest.approx((expected.b - lr * grad_b).item(), rel=1e-6)


def test_passes_and_minibatch_size_set_the_number_of_steps():
    replay = CriticReplay(iterations=2)
    replay.add(*_entry(1.0))
    replay.add(*_entry(2.0))
    head = Probe()
    fit = fit_critic(head, replay, torch.optim.SGD(head.parameters(), lr=0.0), passes=3, pairs_per_pass=12,
                     minibatch_size=5, timestep_fraction=lambda k: k.float(), generator=torch.Generator(),
                     clip=lambda params: 1.0)
    assert fit["minibatches"] == 3 * 3  # 12 pairs per pass in minibatches of 5, 5, 2


def test_fit_from_rollout_adds_then_fits_and_drops_a_failed_entry():
    """``passes`` passes over as many pairs as the rollout has; a fit that raises takes its entry back out."""
    replay = CriticReplay(iterations=4, passes=3, storage_dtype=None)
    replay.add(*_entry(1.0))
    head = Probe()
    kwargs = dict(minibatch_size=5, timestep_fraction=lambda k: k.float(), generator=torch.Generator())
    fit = fit_from_rollout(replay, head, torch.optim.SGD(head.parameters(), lr=0.0), *_entry(2.0), **kwargs)
    assert len(replay.entries) == 2 and fit["minibatches"] == 3 * 3  # 12 pairs per pass: minibatches 5, 5, 2

    def fail(loss):
        raise NonFiniteUpdate("boom")

    with pytest.raises(NonFiniteUpdate, match="boom"):
        fit_from_rollout(replay, head, torch.optim.SGD(head.parameters(), lr=0.0), *_entry(3.0), backward=fail,
                         **kwargs)
    assert len(replay.entries) == 2 and replay.entries[-1].targets[0, 0, 0] == 200


# --------------------------------------------------------------------------------------------- in the module

def _brightness(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def _module(backbone, **kw):
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic

    defaults = dict(batch_size=4, minibatch_size=8, clip_range=1e-3,
                    evaluation=HeldOutEvaluation(samples_per_prompt=1, prompts=["the digit 1", "the number two"]))
    return LatentActorCritic(backbone=backbone, rewards=[CallableReward(_brightness, name="brightness")],
                             **{**defaults, **kw})


def _rollout_with_features(module, seed):
    generator = torch.Generator().manual_seed(seed)
    rollout = module.roll_out(module.sample_prompts(generator), generator)  # keeps features: the module replays
    assert rollout.features is not None
    rollout.rewards = module.score(rollout.images, rollout.prompts)
    return rollout


@pytest.mark.parametrize("option, value", [("iterations", 2), ("minibatch_size", 3), ("passes", 2)])
def test_replay_options_change_the_critic(backbone, option, value):
    """Two iterations with one extra critic pass; changing one replay option changes the value head."""
    heads = []
    for kw in ({}, {option: value}):
        torch.manual_seed(0)
        module = _module(backbone, critic_replay=CriticReplay(**{"iterations": 1, "passes": 1, **kw}), actor_lr=0.0)
        optimizers = module.build_optimizers()  # kept across the two iterations, as a Trainer does
        for seed in (0, 1):
            metrics = module.update(_rollout_with_features(module, seed), *optimizers)
        assert metrics["train/critic_replay_pairs"] == (2 if kw.get("iterations") else 1) * 4 * 10
        assert "train/critic_extra_value_loss" in metrics and "train/critic_extra_grad_norm" in metrics
        heads.append(torch.cat([p.detach().flatten() for p in module.value_head.parameters()]))
    assert not torch.equal(heads[0], heads[1])


def test_no_replay_keeps_no_features(backbone):
    module = _module(backbone)  # critic_replay=None: the paper's setting
    assert module.critic_replay is None
    generator = torch.Generator().manual_seed(0)
    rollout = module.roll_out(module.sample_prompts(generator), generator)
    rollout.rewards = module.score(rollout.images, rollout.prompts)
    assert rollout.features is None
    assert "train/critic_replay_pairs" not in module.update(rollout, *module.build_optimizers())


def test_replay_config_is_validated(backbone):
    from lit_diffac.estimators import GroupRelative

    with pytest.raises(ValueError, match=r"critic_replay needs value_gradient='detached'"):
        _module(backbone, critic_replay=CriticReplay(), value_gradient="shared")
    with pytest.raises(ValueError, match="critic_replay was given but this estimator uses no critic"):
        _module(backbone, critic_replay=CriticReplay(), estimator=GroupRelative())


def test_a_nonfinite_extra_pass_drops_the_iteration_from_the_replay(backbone):
    module = _module(backbone, critic_replay=CriticReplay(iterations=4, passes=1))
    optimizers = module.build_optimizers()
    rollout = _rollout_with_features(module, 0)
    module.update(rollout, *optimizers)
    assert len(module.critic_replay.entries) == 1
    rollout.features = [torch.full_like(f, float("nan")) for f in rollout.features]
    with pytest.raises(NonFiniteUpdate, match="extra critic epoch"):
        module.update(rollout, *optimizers)
    assert len(module.critic_replay.entries) == 1  # the failed iteration's entry is gone again
