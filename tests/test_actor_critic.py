"""LatentActorCritic on tiny random toy backbones: one forward per minibatch, on-policy check, options."""

import json

import lightning as L
import pytest
import torch

from lit_diffac.backbones.unet import UNetBackbone
from lit_diffac.estimators import CriticGAE, GroupRelative
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules.actor_critic import LatentActorCritic
from lit_diffac.rewards.base import CallableReward


def _brightness(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def make_module(backbone, digit_reward=None, **kw):
    rewards = kw.pop("rewards", None) or [digit_reward or CallableReward(_brightness, name="brightness")]
    defaults = dict(batch_size=4, minibatch_size=8, clip_range=1e-3,
                    evaluation=HeldOutEvaluation(prompts=kw.pop("eval_prompts", "toy:heldout"), samples_per_prompt=1))
    defaults.update(kw)
    return LatentActorCritic(backbone=backbone, rewards=rewards, **defaults)


def attach_trainer(module, tmp_path=None, epochs=1):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    module.trainer = trainer
    trainer.strategy.setup_optimizers(trainer)
    return trainer


def update(module, rollout):
    """One PPO update with the module's own optimisers (built without a Trainer when none is attached)."""
    optimizers = module.actor_critic_optimizers() if module._trainer is not None else module.build_optimizers()
    return module.update(rollout, *optimizers)


def rollout_for(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = module.sample_prompts(generator)
    r = module.roll_out(prompts, generator)
    r.rewards = module.score(r.images, prompts)
    return r


def test_rollout_shapes(backbone):
    module = make_module(backbone)
    r = rollout_for(module)
    K = module.sampler.num_steps
    assert r.latents.shape == (4, K + 1, *backbone.latent_shape)
    assert r.log_probs.shape == (4, K) and r.log_probs.dtype == torch.float32
    assert r.values.shape == (4, K, 1) and r.images.shape == (4, 3, 16, 16)
    assert torch.isfinite(r.log_probs).all()


def test_on_policy_first_minibatch(backbone):
    module = make_module(backbone)
    attach_trainer(module)
    metrics = update(module, rollout_for(module))
    assert metrics["train/onpolicy_max_abs_ratio_dev"] < 1e-5


def test_one_backbone_forward_per_minibatch(backbone):
    module = make_module(backbone, num_inner_epochs=2)
    attach_trainer(module)
    rollout = rollout_for(module)
    calls = []
    handle = backbone.denoiser.register_forward_hook(lambda *a: calls.append(a[2].sample.shape[0]))
    update(module, rollout)
    handle.remove()
    pairs = 4 * module.sampler.num_steps
    assert len(calls) == 2 * -(-pairs // 8)  # epochs × minibatches: log-prob and value from ONE pass each
    assert sum(calls) == 2 * pairs


def test_rollout_uses_one_forward_per_step(backbone):
    module = make_module(backbone)
    calls = []
    backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    rollout_for(module)
    assert len(calls) == module.sampler.num_steps


def _changed(before, module):
    return any(not torch.equal(b, p) for b, p in zip(before, module.backbone.policy_parameters()))


def test_update_moves_actor_and_critic(unet_backbone):
    module = make_module(unet_backbone)
    attach_trainer(module)
    actor = [p.detach().clone() for p in module.backbone.policy_parameters()]
    critic = [p.detach().clone() for p in module.value_head.parameters()]
    metrics = update(module, rollout_for(module))
    assert _changed(actor, module)
    assert any(not torch.equal(b, p) for b, p in zip(critic, module.value_head.parameters()))
    for key in ("train/policy_loss", "train/value_loss", "train/approx_kl", "train/clipfrac", "train/ratio_mean",
                "train/explained_variance", "train/explained_variance_late", "train/actor_grad_norm",
                "train/critic_grad_norm", "reward/brightness_mean", "reward/brightness_std"):
        assert key in metrics, key


def test_value_gradient_option_reaches_backbone(dit_backbone):
    """'shared' lets the value loss train the backbone; 'detached' does not."""
    grads = {}
    for mode in ("detached", "shared"):
        module = make_module(dit_backbone, value_gradient=mode, actor_lr=0.0)
        for branch in module.value_head.branches:  # open the AdaLN-Zero gates so features matter
            torch.nn.init.normal_(branch.ada[1].weight, std=0.5)
        attach_trainer(module)
        r = rollout_for(module)
        i, k = torch.arange(4), torch.zeros(4, dtype=torch.long)
        _, values, _ = module.forward_step(r.latents[i, k], k, r.embeds[i], r.latents[i, k + 1])
        module.backbone.zero_grad()
        values.sum().backward()
        grads[mode] = sum(p.grad.abs().sum().item() for p in module.backbone.policy_parameters()
                          if p.grad is not None)
    assert grads["detached"] == 0 and grads["shared"] > 0


@pytest.mark.parametrize("option, value", [
    ("clip_range", 1e-6), ("value_clip_range", 1e-3), ("timestep_fraction", 0.5), ("num_inner_epochs", 2),
    ("actor_lr", 1e-3), ("critic_lr", 1e-1), ("minibatch_size", 5),
    ("max_grad_norm", 1e-6), ("estimator", "no_normalization"), ("critic_replay", "replay"),
    ("train_steps", "first:9")])
def test_every_option_changes_the_update(unet_backbone, toy_pipelines, option, value):
    """Same rollout and seed; changing one option changes the weights after one update."""
    from lit_diffac.backbones.unet import UNetBackbone

    from lit_diffac.critic_replay import CriticReplay
    from lit_diffac.estimators import CriticGAE

    value = {"no_normalization": CriticGAE(reward_normalization="none"), "replay": CriticReplay(iterations=2)}.get(
        value, value)
    results = []
    for kw in ({}, {option: value}):
        L.seed_everything(0)
        module = make_module(UNetBackbone(str(toy_pipelines["unet"])), **kw)
        attach_trainer(module)
        update(module, rollout_for(module))
        results.append(torch.cat([p.detach().flatten() for p in module.backbone.policy_parameters()]
                                 + [p.detach().flatten() for p in module.value_head.parameters()]))
    assert not torch.equal(results[0], results[1])


def test_advantage_step_selection_trains_on_the_critic_s_chosen_steps(toy_pipelines):
    """Same rollout and seed at timestep_fraction 0.5: choosing the steps by |A| trains on other pairs than a random
    subset (so the weights differ) and logs which steps it chose."""
    results, metrics = [], []
    for kw in ({}, {"step_selection": "advantage"}):
        L.seed_everything(0)
        module = make_module(UNetBackbone(str(toy_pipelines["unet"])), timestep_fraction=0.5, **kw)
        attach_trainer(module)
        rollout = rollout_for(module)
        metrics.append(update(module, rollout))
        results.append(torch.cat([p.detach().flatten() for p in module.backbone.policy_parameters()]))
    assert not torch.equal(results[0], results[1])
    assert all(0 <= m["train/trained_step_mean"] <= module.sampler.num_steps - 1 for m in metrics)
    assert metrics[0]["train/trained_step_mean"] != metrics[1]["train/trained_step_mean"]


@pytest.mark.parametrize("spec, expected", [("first:3", [0, 1, 2]), ("last:1", [9]), ([2, 5], [2, 5])])
def test_train_steps_limit_the_trained_steps(unet_backbone, spec, expected):
    """The update trains on the window's steps only (each trajectory once per step), the rollout on all of them."""
    module = make_module(unet_backbone, train_steps=spec)
    attach_trainer(module)
    rollout = rollout_for(module)
    trained = module.training_pairs(rollout, torch.zeros(rollout.batch_size, rollout.num_steps),
                                     torch.Generator().manual_seed(0))
    assert rollout.num_steps == 10 and sorted(set(trained[:, 1].tolist())) == expected
    assert len(trained) == rollout.batch_size * len(expected)
    assert update(module, rollout)["train/trained_step_mean"] == pytest.approx(sum(expected) / len(expected))


def test_cfg_changes_rollout(unet_backbone, toy_pipelines):
    a = rollout_for(make_module(unet_backbone))
    b = rollout_for(make_module(UNetBackbone(str(toy_pipelines["unet"]), cfg_scale=3.0)))
    assert not torch.allclose(a.latents[:, -1], b.latents[:, -1])


def test_cfg_on_policy(toy_pipelines):
    module = make_module(UNetBackbone(str(toy_pipelines["unet"]), cfg_scale=2.0))
    attach_trainer(module)
    assert update(module, rollout_for(module))["train/onpolicy_max_abs_ratio_dev"] < 1e-5


def test_reward_weights_change_advantages(unet_backbone):
    rewards = [CallableReward(_brightness, name="a"), CallableReward(lambda im, p, **_: -im.std(dim=(1, 2, 3)), name="b")]
    module = make_module(unet_backbone, rewards=rewards)
    r = rollout_for(module)
    normalized = module.reward_normalizer(r.rewards)
    a1 = module.estimator(normalized, r.values, r.prompts, torch.tensor([1.0, 0.0])).advantages
    a2 = module.estimator(normalized, r.values, r.prompts, torch.tensor([0.0, 1.0])).advantages
    assert r.values.shape[-1] == 2 and not torch.allclose(a1, a2)


def test_config_validation(unet_backbone):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_module(unet_backbone, batch_size=0)
    with pytest.raises(ValueError, match="timestep_fraction"):
        make_module(unet_backbone, timestep_fraction=0.0)
    with pytest.raises(ValueError, match="reward_weights"):
        make_module(unet_backbone, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="set timestep_fraction < 1"):
        make_module(unet_backbone, step_selection="advantage")
    with pytest.raises(ValueError, match="step_selection='advantage' needs a critic"):
        make_module(unet_backbone, step_selection="advantage", timestep_fraction=0.5, estimator=GroupRelative())
    with pytest.raises(ValueError, match="step_selection must be"):
        make_module(unet_backbone, step_selection="largest")
    with pytest.raises(ValueError, match="train_steps must be 'all', 'first:N', 'last:N'"):
        make_module(unet_backbone, train_steps="middle:3")
    with pytest.raises(ValueError, match=r"train_steps \[10\]: step indices must lie in \[0, 10\)"):
        make_module(unet_backbone, train_steps=[0, 10])
    with pytest.raises(ValueError, match="group_baseline centres advantages on prompt groups"):
        make_module(unet_backbone, estimator=CriticGAE(group_baseline=True))
    make_module(unet_backbone, estimator=CriticGAE(group_baseline=True), samples_per_prompt=2)
    with pytest.raises(ValueError, match="unique"):
        make_module(unet_backbone, rewards=[CallableReward(_brightness, name="x"), CallableReward(_brightness, name="x")])


def test_fit_writes_summary_and_is_deterministic(dit_backbone, toy_pipelines, tmp_path):
    from lit_diffac.backbones.dit import DiTBackbone

    summaries = []
    for run in range(2):
        L.seed_everything(0)
        module = make_module(DiTBackbone(str(toy_pipelines["dit"])), eval_prompts=["the digit 1", "the number two"])
        trainer = L.Trainer(max_epochs=2, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name=f"r{run}"),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu")
        trainer.fit(module)
        summary = json.loads((tmp_path / f"r{run}" / "version_0" / "summary.json").read_text())
        summaries.append(summary)
    assert summaries[0]["samples_seen"] == 8 and summaries[0]["iterations"] == 2
    for key in ("base", "final", "final_explained_variance", "final_train"):
        assert summaries[0][key] == summaries[1][key]
