"""``lit-diffac validate`` / ``test``: the held-out evaluation of a checkpoint, as Lightning validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lit_diffac.cli import main

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from helpers_faults import write_tiny_recipe  # noqa: E402


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_prints_the_held_out_metrics_of_a_checkpoint(command, toy_pipelines, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path, toy_pipelines, reward="brightness")
    assert main(["run", str(recipe), "--trainer.max_epochs=2"]) == 0
    run = tmp_path / "runs" / "tiny_rl" / "version_0"
    final = json.loads((run / "summary.json").read_text())["final"]
    capsys.readouterr()
    assert main([command, "--config", str(recipe), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    label = "validate" if command == "validate" else "test"
    line = next(line for line in out.splitlines() if line.startswith(f"[eval {label} @"))
    assert line.startswith(f"[eval {label} @ iteration 2, 8 samples] brightness ")
    # the checkpoint's policy gives the run's final held-out figures (same prompts, seeds and sampler)
    assert f"brightness {final['eval/brightness']:.3f}" in line
    assert "eval/brightness" in out  # Lightning's results table


def test_fit_runs_no_lightning_validation(toy_pipelines, tmp_path, monkeypatch, capsys):
    """During fit the held-out evaluation is the module's schedule (base, periodic, final), not a validation loop."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path, toy_pipelines, reward="brightness")
    assert main(["run", str(recipe), "--trainer.max_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "[eval base @ iteration 0" in out and "[eval final @ iteration 1" in out
    assert "[eval validate" not in out and "Sanity Checking" not in out


def test_evaluation_leaves_the_global_rngs_as_they_were(dit_backbone):
    """A reward may draw from the global RNGs; evaluating must not change what training draws next."""
    import random

    import numpy as np
    import torch

    from lit_diffac.evaluation import HeldOutEvaluation, default_sampler
    from lit_diffac.rewards.base import CallableReward

    noisy = CallableReward(lambda images, prompts, **_: images.mean(dim=(1, 2, 3)) + torch.rand(len(prompts))
                           + float(np.random.rand()) + random.random(), name="noisy")
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    HeldOutEvaluation(prompts=["a 1"], samples_per_prompt=2).measure(dit_backbone, default_sampler(dit_backbone),
                                                                    [noisy])
    assert torch.equal(torch.rand(2), expected[0]) and (np.random.rand(), random.random()) == expected[1:]
