"""Exact resume: 4 iterations in one go equal 2 + resume + 2, bit for bit (weights, optimisers, metrics)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.errors import CheckpointMismatchError
from lit_diffac.estimators import PerPromptStats
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


def fit(cls, pipeline, root, name: str, epochs: int, ckpt_path=None, **kw):
    L.seed_everything(0)
    module = cls(backbone=DiTBackbone(str(pipeline)), rewards=[CallableReward(noisy_brightness)],
                 sampler=FlowSDESampler(num_steps=4), batch_size=4, minibatch_size=8, eval_samples_per_prompt=1,
                 eval_prompts=EVAL_PROMPTS, train_prompts=["a 1", "a 2"], clip_range=1e-2, actor_lr=1e-3, **kw)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=epochs, logger=TensorBoardLogger(root, name=name, version=0),
                        callbacks=[ModelCheckpoint(dirpath=root / name / "ckpt", save_last=True), recorder],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)  # resume: weights_only
    return module, recorder.metrics, trainer


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for oa, ob in zip(a.trainer.optimizers, b.trainer.optimizers):
        for (pa, ta), (pb, tb) in zip(oa.state_dict()["state"].items(), ob.state_dict()["state"].items()):
            assert pa == pb and ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("cls, kw", [(LatentActorCritic, {}),
                                     (LatentActorCritic, {"critic_epochs": 1, "critic_replay": 3}),
                                     (DDPO, {"estimator": PerPromptStats(buffer_size=8, min_count=2)})],
                         ids=["actor_critic", "actor_critic_replay", "ddpo"])
def test_four_iterations_equal_two_plus_resume_plus_two(cls, kw, toy_pipelines, tmp_path):
    pipeline = toy_pipelines["dit"]
    whole, whole_metrics, _ = fit(cls, pipeline, tmp_path, "whole", 4, **kw)
    fresh = lambda: {k: PerPromptStats(buffer_size=8, min_count=2) if k == "estimator" else v for k, v in kw.items()}
    kw2 = fresh()  # a fresh estimator per run
    first, first_metrics, _ = fit(cls, pipeline, tmp_path, "split", 2, **kw2)
    ckpt = tmp_path / "split" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain tensors, numbers, lists, dicts
    assert state[CHECKPOINT_KEY]["samples_seen"] == 8 and state["epoch"] == 1
    kw3 = fresh()
    resumed, resumed_metrics, _ = fit(cls, pipeline, tmp_path, "resumed", 4, ckpt_path=ckpt, **kw3)

    assert len(whole_metrics) == 4 and len(resumed_metrics) == 2
    assert first_metrics + resumed_metrics == whole_metrics  # bit-exact: floats compared with ==
    assert_same_state(whole, resumed)
    assert resumed.samples_seen == whole.samples_seen == 16
    assert [e for e in resumed.eval_history if e["label"] == "base"] == \
        [e for e in whole.eval_history if e["label"] == "base"]
    assert resumed.eval_history[-1] == whole.eval_history[-1]  # the final evaluation, at iteration 4
    assert len(resumed.eval_history) == len(whole.eval_history) == 2  # base not re-run on resume
    summaries = [json.loads((tmp_path / n / "version_0" / "summary.json").read_text()) for n in ("whole", "resumed")]
    for key in ("iterations", "samples_seen", "base", "final", "final_train", "eval_history"):
        assert summaries[0][key] == summaries[1][key], key
    if "critic_replay" in kw:  # the replay (2 iterations when saved) came back from the checkpoint
        assert len(state[CHECKPOINT_KEY]["critic_replay"]["entries"]) == 2
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
                               rewards=[CallableReward(noisy_brightness)], batch_size=4, eval_samples_per_prompt=1,
                               eval_prompts=EVAL_PROMPTS)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False)
    with pytest.raises(CheckpointMismatchError,
                       match=r"was written by a different model \(tensors missing: .*\)\. Use the recipe"):
        trainer.fit(module, ckpt_path=ckpt)


def test_a_replay_left_out_of_checkpoints_is_refilled(toy_pipelines, tmp_path):
    """``checkpoint_critic_replay=False``: small checkpoints, and the resumed run starts an empty replay."""
    kw = {"critic_epochs": 1, "critic_replay": 3, "checkpoint_critic_replay": False}
    fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "split", 2, **kw)
    ckpt = tmp_path / "split" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]["critic_replay"] is None
    resumed, _, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "resumed", 3, ckpt_path=ckpt, **kw)
    assert len(resumed.critic_replay.entries) == 1
