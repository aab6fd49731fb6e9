"""docs/metrics.md cannot rot: every key the modules (with their held-out evaluation) and callbacks log in a
one-iteration toy run, with every option that adds metrics, is documented there."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_callbacks import clip_folder  # noqa: F401 - the tiny CLIP folder fixture

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_patterns() -> list[re.Pattern]:
    """The keys in the first column of the doc's tables; ``<name>`` stands for any reward name."""
    keys = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split(" | ")[0]
            keys += re.findall(r"`([^`]+)`", first_cell)
    return [re.compile(re.escape(k).replace(re.escape("<name>"), r"[^/]+") + r"\Z") for k in keys]


def logged_keys(log_dir: str) -> set[str]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


def undocumented(keys: set[str]) -> list[str]:
    patterns = documented_patterns()
    return sorted(k for k in keys if not any(p.match(k) for p in patterns))


def test_the_doc_lists_the_metric_families():
    patterns = documented_patterns()
    assert len(patterns) >= 35
    assert undocumented({"reward/anything_mean", "perf/reward_time/ocr", "eval/pickscore_accuracy"}) == []
    assert undocumented({"train/made_up", "reward/a/b_mean"}) == ["reward/a/b_mean", "train/made_up"]


def test_every_key_of_a_one_iteration_run_is_documented(toy_pipelines, clip_folder, tmp_path):  # noqa: F811
    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.critic_replay import CriticReplay
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import MultiRewardActorCritic
    from lit_diffac.rewards import Brightness, DigitAlignment

    torch.manual_seed(0)
    module = MultiRewardActorCritic(  # every option that adds metrics: two rewards, LoRA + KL, extra critic passes
        backbone=DiTBackbone(str(toy_pipelines["dit"]), lora_rank=2), rewards=[Brightness(), DigitAlignment()],
        batch_size=2, minibatch_size=20, kl_coef=0.1, critic_replay=CriticReplay(iterations=1, passes=1),
        value_clip_range=0.2,  # and an evaluation with diversity and CLIP score
        evaluation=HeldOutEvaluation(prompts=["handwritten seven"], samples_per_prompt=2,
                                     clip_model=str(clip_folder)))
    logger = TensorBoardLogger(str(tmp_path), name="rl")
    L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    assert [e["label"] for e in module.history.evaluations] == ["base", "final"]
    keys = logged_keys(logger.log_dir)
    assert {"train/kl_to_reference", "train/critic_extra_value_loss", "train/explained_variance/brightness",
            "train/advantage_std/brightness",
            "eval/clip_score", "eval/clip_diversity", "eval/diversity", "eval/digit_alignment_accuracy",
            "perf/reward_time/digit_alignment", "fault/skipped"} <= keys
    assert undocumented(keys) == []


def test_every_key_of_toy_pretraining_is_documented(tmp_path):
    from lit_diffac.modules import ToyBasePretraining

    L.seed_everything(0)
    module = ToyBasePretraining(family="dit", output_dir=str(tmp_path / "dit"), batch_size=8, eval_every_n_steps=1,
                                eval_samples_per_prompt=1)
    logger = TensorBoardLogger(str(tmp_path), name="pretrain")
    L.Trainer(max_steps=1, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    keys = logged_keys(logger.log_dir)
    assert {"train/loss", "eval/alignment_accuracy"} <= keys
    assert undocumented(keys) == []
