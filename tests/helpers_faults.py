"""Rewards with injected faults for the fault-handling tests (importable by dotted path from a recipe)."""

from __future__ import annotations

import os
import signal

import torch

#: Training-batch calls seen by :func:`brightness_or_sigterm` in this process.
_CALLS = {"train": 0}


def brightness(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def brightness_or_sigterm(images, prompts, **_):
    """Brightness; sends SIGTERM (or ``$LIT_DIFFAC_TEST_SIGNAL``, e.g. ``SIGINT``) to this very process on
    training call ``$LIT_DIFFAC_TEST_SIGTERM_AT`` (0-based; training calls have 4 images, evaluation calls 2)."""
    if len(prompts) == 4:
        at = os.environ.get("LIT_DIFFAC_TEST_SIGTERM_AT")
        if at is not None and _CALLS["train"] == int(at):
            os.kill(os.getpid(), getattr(signal, os.environ.get("LIT_DIFFAC_TEST_SIGNAL", "SIGTERM")))
        _CALLS["train"] += 1
    return brightness(images, prompts)


def always_nan(images, prompts, **_):
    return torch.full((images.shape[0],), float("nan"))


def wrong_shape(images, prompts, **_):
    return images.mean(dim=(2, 3))  # [B, 3] instead of [B]


def integer_scores(images, prompts, **_):
    return torch.ones(images.shape[0], dtype=torch.long)


#: A tiny RL recipe: ``.format(backbone=..., pipeline=..., sampler=..., reward=...)``; 4 trajectories × 4 steps.
TINY_RECIPE = """\
seed_everything: 0
trainer:
  max_epochs: 4
  accelerator: cpu
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
model:
  class_path: lit_diffac.modules.LatentActorCritic
  init_args:
    backbone: {{class_path: lit_diffac.backbones.{backbone}, init_args: {{pretrained: {pipeline}}}}}
    rewards:
      - class_path: lit_diffac.rewards.CallableReward
        init_args: {{fn: helpers_faults.{reward}, name: brightness}}
    sampler: {{class_path: lit_diffac.samplers.{sampler}, init_args: {{num_steps: 4}}}}
    train_prompts: [a 1, a 2]
    evaluation:
      class_path: lit_diffac.evaluation.HeldOutEvaluation
      init_args: {{prompts: [the digit 1, the number two], samples_per_prompt: 1}}
    batch_size: 4
    minibatch_size: 8
    clip_range: 0.01
    actor_lr: 0.001
"""


def write_tiny_recipe(folder, pipelines, family: str = "dit", reward: str = "brightness_or_sigterm",
                      name: str = "tiny_rl.yaml"):
    """Write :data:`TINY_RECIPE` for the toy ``family`` ("dit" or "unet") into ``folder``; return its path."""
    backbone, sampler = ("DiTBackbone", "FlowSDESampler") if family == "dit" else ("UNetBackbone", "DDIMSampler")
    path = folder / name
    path.write_text(TINY_RECIPE.format(backbone=backbone, pipeline=pipelines[family], sampler=sampler,
                                       reward=reward))
    return path


def error_line(capsys, args: list[str]) -> str:
    """Run ``lit-diffac ARGS``; check exit status 2, exactly one ``error:`` line and no traceback; return it."""
    import pytest

    from lit_diffac.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert info.value.code == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]
