"""Value pretraining, starting a critic from it (``ValueHead(init_from=...)``), and multi-reward value targets."""

from functools import partial

import lightning as L
import pytest
import torch

from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules import LatentActorCritic, MultiRewardActorCritic, ValuePretraining
from lit_diffac.rewards.base import CallableReward
from lit_diffac.value_heads import ValueHead


def _bright(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def _contrast(images, prompts, **_):
    return images.std(dim=(1, 2, 3))


def small(**kw):
    """Tiny settings (a fresh evaluation component each time)."""
    return dict(batch_size=4, minibatch_size=20,
                evaluation=HeldOutEvaluation(samples_per_prompt=1, prompts=["the digit 1", "the number two"]), **kw)


def _fit(module, epochs=2, tmp_path=None):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module)
    return module


def _policy(module):
    return [p.detach().clone() for p in module.backbone.denoiser.parameters()]


def test_value_pretraining_keeps_policy_bit_identical_then_an_actor_critic_starts_from_its_head(
        dit_backbone, toy_pipelines, tmp_path):
    """The replacement of the in-line value warm-up: pretrain the critic with the policy frozen, then an
    actor-critic whose ``ValueHead(init_from=...)`` is that head trains the policy."""
    module = ValuePretraining(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")],
                              output_path=str(tmp_path / "head.safetensors"), **small())
    before = _policy(module)
    head_before = [p.detach().clone() for p in module.value_head.parameters()]
    _fit(module, tmp_path=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, _policy(module)))
    assert any(not torch.equal(a, b) for a, b in zip(head_before, module.value_head.parameters()))
    assert module.last_metrics["train/actor_updated"] == 0.0
    assert module.history.evaluations == []  # the policy does not change: no held-out evaluation
    assert (tmp_path / "head.safetensors").is_file()
    # ... and an actor-critic (a fresh run: ValuePretraining froze its backbone) starts from it, then trains the
    # policy too
    from lit_diffac.backbones import DiTBackbone

    ac = LatentActorCritic(backbone=DiTBackbone(str(toy_pipelines["dit"])),
                           rewards=[CallableReward(_bright, name="b")],
                           value_head=partial(ValueHead, init_from=str(tmp_path / "head.safetensors")), **small())
    for a, b in zip(ac.value_head.state_dict().values(), module.value_head.state_dict().values()):
        assert torch.equal(a, b)
    _fit(ac, epochs=1, tmp_path=tmp_path)
    assert ac.last_metrics["train/actor_updated"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, _policy(ac)))


def test_init_from_errors(dit_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from: no value-head file"):
        LatentActorCritic(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")],
                          value_head=partial(ValueHead, init_from=str(tmp_path / "missing.safetensors")), **small())
    from lit_diffac.value_heads import save_value_head

    save_value_head(ValueHead([8], text_dim=4), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        LatentActorCritic(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")],
                          value_head=partial(ValueHead, init_from=str(tmp_path / "other.safetensors")), **small())


def _targets(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    from lit_diffac.rollout import collect_rollout

    prompts = module.sample_prompts(generator)
    r = collect_rollout(module.backbone, module.sampler, prompts, module.value_head, module.num_values,
                        generator=generator)
    r.rewards = module.score(r.images, prompts)
    normalized = module.reward_normalizer(r.rewards)
    return r, normalized


def test_per_reward_heads_receive_per_reward_targets(dit_backbone):
    rewards = [CallableReward(_bright, name="bright"), CallableReward(_contrast, name="contrast")]
    module = MultiRewardActorCritic(backbone=dit_backbone, rewards=rewards, reward_weights=[1.0, 0.5], **small())
    assert module.num_values == 2
    r, normalized = _targets(module)
    est = module.estimator(normalized, r.values, r.prompts, module.reward_weights)
    for j in range(2):  # γ = λ = 1: every step's target is that reward's standardised value
        assert torch.allclose(est.targets[..., j], normalized[:, j:j + 1].expand(-1, r.num_steps).clamp(-5, 5))


def test_single_head_on_weighted_sum(dit_backbone, tmp_path):
    rewards = [CallableReward(_bright, name="bright"), CallableReward(_contrast, name="contrast")]
    module = MultiRewardActorCritic(backbone=dit_backbone, rewards=rewards, reward_weights=[1.0, 0.5],
                                    value_per_reward=False, **small())
    assert module.num_values == 1 and module.value_head.num_outputs == 1
    _fit(module, epochs=1, tmp_path=tmp_path)
    assert {"reward/bright_mean", "reward/contrast_mean"} <= set(module.last_metrics)


def test_multi_reward_needs_two_rewards(dit_backbone):
    with pytest.raises(ValueError, match="at least two rewards"):
        MultiRewardActorCritic(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")], **small())
