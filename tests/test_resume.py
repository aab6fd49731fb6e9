"""Exact resume: 4 iterations in one go equal 2 + resume + 2, bit for bit (weights, optimisers, metrics)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.critic_replay import CriticReplay
from lit_diffac.errors import CheckpointMismatchError
from lit_diffac.estimators import PerPromptStats
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules import DDPO, LatentActorCritic
from lit_diffac.resume import CHECKPOINT_KEY, capture_rng_state, restore_rng_state
from lit_diffac.rewards.base import CallableReward
from lit_diffac.samplers import FlowSDESampler

EVAL_PROMPTS = ["the digit 1", "the number two"]


def noisy_brightness(images, prompts, **_):
    """Brightness plus noise from the *global* torch RNG: resume is exact only if that RNG is restored too."""
    return images.mean(dim=(1, 2, 3)) + 0.05 * torch.rand(images.shape[0])


class Recorder(Callback):
    """Keeps every iteration's training metrics (timings left out: they are wall-clock)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.metrics.append({k: v for k, v in pl_module.last_metrics.items() if not k.startswith("perf/")
                             or k == "perf/samples_seen"})


def fit(cls, pipeline, root, name: str, epochs: int, ckpt_path=None, train_prompts=("a 1", "a 2"),
        backbone_kw=None, **kw):
    L.seed_everything(0)
    options = dict(sampler=FlowSDESampler(num_steps=4), batch_size=4, minibatch_size=8, clip_range=1e-2,
                   actor_lr=1e-3, evaluation=HeldOutEvaluation(samples_per_prompt=2, prompts=EVAL_PROMPTS))
    module = cls(backbone=DiTBackbone(str(pipeline), **(backbone_kw or {})), rewards=[CallableReward(noisy_brightness)],
                 train_prompts=train_prompts if isinstance(train_prompts, str) else list(train_prompts),
                 **{**options, **kw})
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=epochs, logger=TensorBoardLogger(root, name=name, version=0),
                        callbacks=[ModelCheckpoint(dirpath=root / name / "ckpt", save_last=True), recorder],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)  # resume: weights_only
    return module, recorder.metrics, trainer


def untimed(metrics: list[dict[str, float]]) -> list[dict[str, float]]:
    """Training metrics without the wall-clock ``perf/…`` timings."""
    return [{k: v for k, v in m.items() if not k.startswith("perf/") or k == "perf/samples_seen"} for m in metrics]


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for oa, ob in zip(a.trainer.optimizers, b.trainer.optimizers):
        for (pa, ta), (pb, tb) in zip(oa.state_dict()["state"].items(), ob.state_dict()["state"].items()):
            assert pa == pb and ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("cls, kwargs", [
    (LatentActorCritic, lambda: {}),
    (LatentActorCritic, lambda: {"critic_replay": CriticReplay(iterations=3, passes=1)}),
    (DDPO, lambda: {"estimator": PerPromptStats(buffer_size=8, min_count=2)})],
    ids=["actor_critic", "actor_critic_replay", "ddpo"])
def test_four_iterations_equal_two_plus_resume_plus_two(cls, kwargs, toy_pipelines, tmp_path):
    pipeline = toy_pipelines["dit"]
    kw = kwargs()  # fresh stateful components (estimator, replay) for every run
    whole, whole_metrics, _ = fit(cls, pipeline, tmp_path, "whole", 4, **kw)
    first, first_metrics, _ = fit(cls, pipeline, tmp_path, "split", 2, **kwargs())
    ckpt = tmp_path / "split" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain tensors, numbers, lists, dicts
    assert state[CHECKPOINT_KEY]["samples_seen"] == 8 and state["epoch"] == 2  # last.ckpt: the state after training
    assert state[CHECKPOINT_KEY]["skipped_iterations"] == 0 and state[CHECKPOINT_KEY]["consecutive_bad"] == 0
    assert [e["label"] for e in state[CHECKPOINT_KEY]["eval_history"]] == ["base", "final"]  # final state, evaluated
    resumed, resumed_metrics, _ = fit(cls, pipeline, tmp_path, "resumed", 4, ckpt_path=ckpt, **kwargs())

    assert len(whole_metrics) == 4 and len(resumed_metrics) == 2
    assert first_metrics + resumed_metrics == whole_metrics  # bit-exact: floats compared with ==
    assert_same_state(whole, resumed)
    assert resumed.history.samples_seen == whole.history.samples_seen == 16
    # summary.json's final_train window (wall-clock timings aside)
    assert untimed(resumed.history.recent) == untimed(whole.history.recent)
    evaluations, whole_evaluations = resumed.history.evaluations, whole.history.evaluations
    assert [e for e in evaluations if e["label"] == "base"] == [e for e in whole_evaluations if e["label"] == "base"]
    assert evaluations[-1] == whole_evaluations[-1]  # the final evaluation, at iteration 4
    assert evaluations[-1]["label"] == "final" and evaluations[-1]["iteration"] == 4
    assert [(e["label"], e["iteration"]) for e in evaluations] == [("base", 0), ("final", 4)]  # base not re-run
    summaries = [json.loads((tmp_path / n / "version_0" / "summary.json").read_text()) for n in ("whole", "resumed")]
    for key in ("iterations", "samples_seen", "base", "final", "final_train", "eval_history"):
        assert summaries[0][key] == summaries[1][key], key
    if "critic_replay" in kw:  # the replay (2 iterations when saved) came back from the checkpoint
        assert len(state[CHECKPOINT_KEY]["critic_replay"]["entries"]) == 2
        assert state[CHECKPOINT_KEY]["critic_replay"]["entries"][0]["features"][0].dtype == torch.bfloat16
        assert len(resumed.critic_replay.entries) == len(whole.critic_replay.entries) == 3
    if cls is DDPO:
        assert resumed.estimator.state_dict() == whole.estimator.state_dict()
        buffers = whole.estimator.trackers[0].buffers
        assert len(buffers) == 2 and all(len(b) >= 2 for b in buffers.values())  # per-prompt statistics in use


def test_rng_state_round_trip_is_weights_only(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_resuming_a_checkpoint_of_another_backbone_fails_clearly(toy_pipelines, tmp_path):
    fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "dit", 1)
    ckpt = tmp_path / "dit" / "ckpt" / "last.ckpt"
    from lit_diffac.backbones.unet import UNetBackbone

    L.seed_everything(0)
    module = LatentActorCritic(backbone=UNetBackbone(str(toy_pipelines["unet"])),
                               rewards=[CallableReward(noisy_brightness)], batch_size=4,
                               evaluation=HeldOutEvaluation(samples_per_prompt=1, prompts=EVAL_PROMPTS))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False)
    with pytest.raises(CheckpointMismatchError,
                       match=r"was written by a different model \(tensors missing: .*\)\. Use the recipe"):
        trainer.fit(module, ckpt_path=ckpt)


def test_a_replay_left_out_of_checkpoints_is_refilled(toy_pipelines, tmp_path):
    """``CriticReplay(checkpoint=False)``: small checkpoints, and the resumed run starts an empty replay."""
    replay = lambda: {"critic_replay": CriticReplay(iterations=3, passes=1, checkpoint=False)}  # noqa: E731
    first, _, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "split", 2, **replay())
    assert len(first.critic_replay.entries) == 2
    ckpt = tmp_path / "split" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]["critic_replay"] is None
    resumed, _, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "resumed", 3, ckpt_path=ckpt, **replay())
    assert len(resumed.critic_replay.entries) == 1


def test_six_iterations_equal_two_plus_two_plus_two_with_the_real_toy_prompts(tmp_path):
    """The shipped toy DiT and its 60 training prompts: a resumed run's prompt cache starts empty and meets the
    prompts in other batches, so embeddings must not depend on their batch.  Resumed at two points; weights,
    optimiser states, the critic replay and the summary metrics all bit-exact."""
    run = dict(train_prompts="toy:train", batch_size=8, critic_replay=None)
    kw = lambda: {**run, "critic_replay": CriticReplay(iterations=4, passes=1)}  # noqa: E731
    whole, whole_metrics, _ = fit(LatentActorCritic, "toy-dit", tmp_path, "whole", 6, **kw())
    _, metrics, _ = fit(LatentActorCritic, "toy-dit", tmp_path, "a", 2, **kw())
    ckpt = tmp_path / "a" / "ckpt" / "last.ckpt"
    for name, epochs in (("b", 4), ("c", 6)):
        resumed, more, _ = fit(LatentActorCritic, "toy-dit", tmp_path, name, epochs, ckpt_path=ckpt, **kw())
        metrics += more
        ckpt = tmp_path / name / "ckpt" / "last.ckpt"
    assert metrics == whole_metrics  # every iteration's metrics, floats compared with ==
    assert_same_state(whole, resumed)
    for a, b in zip(whole.critic_replay.entries, resumed.critic_replay.entries):
        assert all(torch.equal(x, y) for x, y in zip([*a.features, a.targets, a.old_values],
                                                      [*b.features, b.targets, b.old_values]))
    summaries = [json.loads((tmp_path / n / "version_0" / "summary.json").read_text()) for n in ("whole", "c")]
    for key in ("iterations", "samples_seen", "base", "final", "final_train", "eval_history"):
        assert summaries[0][key] == summaries[1][key], key


def test_last_ckpt_is_the_final_state_and_summary_names_it(toy_pipelines, tmp_path):
    """3 iterations with a checkpoint every 2: last.ckpt holds iteration 3, not 2, and summary.json names it."""
    L.seed_everything(0)
    module = LatentActorCritic(backbone=DiTBackbone(str(toy_pipelines["dit"])), rewards=[CallableReward(noisy_brightness)],
                               sampler=FlowSDESampler(num_steps=2), batch_size=2, minibatch_size=4,
                               evaluation=HeldOutEvaluation(samples_per_prompt=1, prompts=EVAL_PROMPTS))
    trainer = L.Trainer(max_epochs=3, logger=TensorBoardLogger(tmp_path, name="run", version=0),
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=2, save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last[CHECKPOINT_KEY]["samples_seen"] == 6  # three iterations of two samples
    state = module.state_dict()  # the checkpoint holds the trained tensors (frozen ones come from the pipeline)
    assert any(k.startswith("value_head.") for k in last["state_dict"])
    assert all(torch.equal(v, state[k]) for k, v in last["state_dict"].items())
    summary = json.loads((tmp_path / "run" / "version_0" / "summary.json").read_text())
    assert summary["checkpoint"] == str((tmp_path / "ckpt" / "last.ckpt").resolve())


def test_learning_rates_changed_on_resume_are_applied(toy_pipelines, tmp_path, capsys):
    fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "first", 1)
    ckpt = tmp_path / "first" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3
    capsys.readouterr()
    resumed, _, trainer = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "second", 2, ckpt_path=ckpt,
                              actor_lr=5e-4, critic_lr=2e-3)
    assert [g["lr"] for opt in trainer.optimizers for g in opt.param_groups] == [5e-4, 2e-3]
    out = capsys.readouterr().out
    assert "actor learning rate 0.001 -> 0.0005 (the recipe's value replaces the checkpoint's)" in out
    assert "critic learning rate 0.001 -> 0.002" in out


def halving(optimizer):
    """A learning-rate schedule for the tests: ×0.5 per iteration."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def test_a_learning_rate_schedule_steps_per_iteration_and_resumes_exactly(toy_pipelines, tmp_path):
    pipeline = toy_pipelines["dit"]
    whole, whole_metrics, _ = fit(LatentActorCritic, pipeline, tmp_path, "whole", 4, lr_scheduler=halving)
    assert [m["train/actor_lr"] for m in whole_metrics] == [1e-3 * 0.5 ** k for k in range(4)]
    assert [m["train/critic_lr"] for m in whole_metrics] == [1e-3 * 0.5 ** k for k in range(4)]
    _, first_metrics, _ = fit(LatentActorCritic, pipeline, tmp_path, "split", 2, lr_scheduler=halving)
    ckpt = tmp_path / "split" / "ckpt" / "last.ckpt"
    assert len(torch.load(ckpt, weights_only=True)["lr_schedulers"]) == 2  # one schedule per optimiser
    resumed, resumed_metrics, trainer = fit(LatentActorCritic, pipeline, tmp_path, "resumed", 4, ckpt_path=ckpt,
                                            lr_scheduler=halving)
    assert first_metrics + resumed_metrics == whole_metrics  # the schedule went on where it stopped
    assert_same_state(whole, resumed)
    assert [g["lr"] for opt in trainer.optimizers for g in opt.param_groups] == [1e-3 * 0.5 ** 4] * 2


def test_a_recipe_rate_changed_on_resume_rescales_the_schedule(toy_pipelines, tmp_path, capsys):
    fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "first", 2, lr_scheduler=halving)
    ckpt = tmp_path / "first" / "ckpt" / "last.ckpt"
    capsys.readouterr()
    _, metrics, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "second", 3, ckpt_path=ckpt,
                        actor_lr=2e-3, lr_scheduler=halving)
    assert metrics[0]["train/actor_lr"] == 2e-3 * 0.25 and metrics[0]["train/critic_lr"] == 1e-3 * 0.25
    out = capsys.readouterr().out
    assert "actor base learning rate 0.001 -> 0.002, schedule rescaled" in out and "critic" not in out.split("rescaled")[1]


def test_value_pretraining_takes_a_schedule_too(toy_pipelines, tmp_path):
    from lit_diffac.modules import ValuePretraining

    _, metrics, _ = fit(ValuePretraining, toy_pipelines["dit"], tmp_path, "vp", 2, lr_scheduler=halving,
                        output_path=str(tmp_path / "head.safetensors"))
    assert [m["train/critic_lr"] for m in metrics] == [1e-3, 5e-4] and "train/actor_lr" not in metrics[0]
