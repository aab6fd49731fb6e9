"""Bad input: one clear ``error:`` line naming the fix, exit status 2, no traceback (docs/errors.md lists them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lit_diffac.cli import main

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
from helpers_faults import write_tiny_recipe  # noqa: E402

MAIN_RECIPE = str(REPO / "recipes" / "toy" / "actor_critic_dit.yaml")


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs/ goes to tmp_path
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def error_line(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """Run ``lit-diffac ARGS``; check exit status 2, exactly one ``error:`` line and no traceback; return it."""
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert info.value.code == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


def test_unknown_recipe_key(capsys):
    line = error_line(capsys, ["run", MAIN_RECIPE, "--model.init_args.actor_lrr=1e-3"])
    assert line == ("error: unknown key 'model.init_args.actor_lrr' in override --model.init_args.actor_lrr=1e-3 "
                    "(did you mean 'model.init_args.actor_lr'?)")


def test_wrong_type(capsys):
    line = error_line(capsys, ["run", MAIN_RECIPE, "--model.init_args.batch_size=many"])
    assert line.startswith("error: invalid value for 'model.init_args.batch_size' in override "
                           "--model.init_args.batch_size=many: expected int")


def test_missing_pipeline_folder(capsys):
    line = error_line(capsys, ["run", MAIN_RECIPE, "--model.init_args.backbone.init_args.pretrained=/no/such/sd15"])
    assert line.startswith("error: no pipeline folder at '/no/such/sd15': put a diffusers pipeline there "
                           "(sub-folders transformer/, scheduler/, text_encoder/, tokenizer/")


def test_missing_reward_weights(capsys, tmp_path):
    recipe = tmp_path / "pick.yaml"
    recipe.write_text(Path(MAIN_RECIPE).read_text().replace(
        "- class_path: lit_diffac.rewards.DigitAlignment",
        "- class_path: lit_diffac.rewards.PickScore\n        init_args: {pretrained: /models/PickScore_v1}"))
    line = error_line(capsys, ["run", str(recipe)])
    assert line.startswith("error: PickScore weights not found: folder '/models/PickScore_v1' does not exist.")


def test_offline_hub_id(capsys):
    line = error_line(capsys, ["run", MAIN_RECIPE,
                               "--model.init_args.backbone.init_args.pretrained=someorg/some-diffusion-model"])
    assert line == ("error: 'someorg/some-diffusion-model' is not a local folder and the Hugging Face Hub is offline "
                    "(HF_HUB_OFFLINE=1): download it where the hub is reachable (`hf download "
                    "someorg/some-diffusion-model --local-dir DIR`) and pass DIR as `pretrained`")


@pytest.mark.parametrize("content, message", [
    (b"\n# only a comment\n\n", "contains no prompts: save it as UTF-8 text with one prompt per line"),
    (b"a cat\n\xff\xfe a dog\n", "is not UTF-8 text (byte 0xff at offset 6): save it as UTF-8 text"),
    (b"a cat\x00\x00\n", "looks binary (it contains NUL bytes)"),
], ids=["empty", "not-utf8", "binary"])
def test_bad_prompt_file(capsys, tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    line = error_line(capsys, ["run", MAIN_RECIPE, f"--model.init_args.train_prompts={prompts}"])
    assert line == f"error: prompt file '{prompts}' {message}" or line.startswith(
        f"error: prompt file '{prompts}' {message}")


@pytest.mark.parametrize("reward, message", [
    ("wrong_shape", "error: reward 'brightness': score() must return shape [2] (one score per image), got [2, 3]"),
    ("integer_scores", "error: reward 'brightness': score() must return a floating tensor, got torch.int64 "
                       "(convert it with .float())"),
    ("always_nan", "error: 3 consecutive iterations had non-finite values (last, iteration 2: reward 'brightness' "
                   "is not finite for 4/4 samples); fix the reward or lower the learning rates, then resume; "
                   "saved a resumable checkpoint to "),
], ids=["shape", "dtype", "nan"])  # shape and dtype fail at the base evaluation (2 images), before training
def test_bad_reward_output(capsys, tmp_path, toy_pipelines, reward, message):
    recipe = write_tiny_recipe(tmp_path, toy_pipelines, reward=reward)
    line = error_line(capsys, ["run", str(recipe), "--trainer.max_epochs=5"])
    assert line.startswith(message)


def test_mismatched_checkpoint_for_resume_and_sample(capsys, tmp_path, toy_pipelines):
    dit = write_tiny_recipe(tmp_path, toy_pipelines, family="dit", reward="brightness", name="dit.yaml")
    assert main(["run", str(dit), "--trainer.max_epochs=1"]) == 0
    ckpt = tmp_path / "runs" / "dit" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    unet = write_tiny_recipe(tmp_path, toy_pipelines, family="unet", reward="brightness", name="unet.yaml")
    expected = f"error: checkpoint {ckpt} was written by a different model ("
    line = error_line(capsys, ["run", str(unet), "--ckpt_path", str(ckpt)])
    assert line.startswith(expected) and "Use the recipe that wrote it" in line
    line = error_line(capsys, ["sample", "--config", str(unet), "--ckpt", str(ckpt), "--out", str(tmp_path / "s")])
    assert line.startswith(expected)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0  # the checkpoint is untouched
    out = tmp_path / "ok"  # the recipe that wrote it samples from it
    assert main(["sample", "--config", str(dit), "--ckpt", str(ckpt), "--prompts", "toy:heldout",
                 "--out", str(out)]) == 0
    assert (out / "rewards.json").is_file()
