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
from helpers_faults import error_line, write_tiny_recipe  # noqa: E402

MAIN_RECIPE = str(REPO / "recipes" / "toy" / "actor_critic_dit.yaml")


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs/ goes to tmp_path
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")



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
    assert line == ("error: no local folder 'someorg/some-diffusion-model', so it was tried as a Hugging Face Hub id, "
                    "but the hub is offline (HF_HUB_OFFLINE=1) and offline use needs a local folder: download it "
                    "where the hub is reachable (`hf download someorg/some-diffusion-model --local-dir DIR`) and "
                    "pass DIR as `pretrained` (e.g. ./weights/some-diffusion-model)")


def test_mistyped_local_pipeline_folder_fails_at_once(capsys, tmp_path, toy_pipelines, monkeypatch):
    # `weights/toy-ditt` has the shape of a hub id, but ./weights/ exists here: a local path, never the hub.
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "toy-dit").symlink_to(toy_pipelines["dit"], target_is_directory=True)
    monkeypatch.setattr("lit_diffac.backbones.loading.require_hub", _no_hub)  # online, the hub would be retried
    line = error_line(capsys, ["run", MAIN_RECIPE, "--model.init_args.backbone.init_args.pretrained=weights/toy-ditt"])
    assert line == ("error: no pipeline folder at 'weights/toy-ditt' (a local path, not a hub id, as the folder "
                    "'weights/' exists here; did you mean 'weights/toy-dit'?): put a diffusers pipeline there "
                    "(sub-folders transformer/, scheduler/, text_encoder/, tokenizer/; see docs/from_toy_to_sd.md) "
                    "or name a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")


def _no_hub(path: str) -> None:
    raise AssertionError(f"the hub was tried for {path!r}")


@pytest.mark.parametrize("name, hub", [
    ("someorg/some-model", True), ("stabilityai/stable-diffusion-3.5-medium", True),
    ("weights/toy-ditt", False),  # ./weights/ exists (below): a local path
    ("./weights/sd15", False), ("../sd15", False), ("/models/sd15", False), ("~/sd15", False),
    ("weights/sd/v15", False), ("someorg/model.safetensors", False), ("weights\\sd15", False), ("sd15", False),
])
def test_hub_id_rule(tmp_path, name, hub):
    from lit_diffac.backbones.loading import is_hub_id

    (tmp_path / "weights").mkdir()
    assert is_hub_id(name) is hub


def config_error_line(capsys, *overrides: str, recipe: str = MAIN_RECIPE) -> str:
    """:func:`error_line` of the main recipe with ``overrides``; the error comes before any evaluation or training."""
    with pytest.raises(SystemExit) as info:
        main(["run", recipe, "--trainer.max_epochs=1", *overrides])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert info.value.code == 2, text[-2000:]
    assert "Traceback" not in text and "[eval" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and captured.err.rstrip().splitlines()[-1] == lines[0], text[-2000:]
    return lines[0]


def test_batch_size_out_of_range(capsys):
    assert config_error_line(capsys, "--model.init_args.batch_size=-4") == (
        "error: invalid LatentActorCritic config: batch_size must be >= 1 (got -4)")


def test_sampler_num_steps_out_of_range(capsys):
    assert config_error_line(capsys, "--model.init_args.sampler.init_args.num_steps=0") == (
        "error: invalid FlowSDESampler: num_steps must be an integer >= 1 (got 0)")


def test_evaluation_samples_per_prompt_out_of_range(capsys):
    assert config_error_line(capsys, "--model.init_args.evaluation.init_args.samples_per_prompt=0") == (
        "error: invalid HeldOutEvaluation: samples_per_prompt must be >= 1 (got 0)")


@pytest.mark.parametrize("key", ["actor_lr", "critic_lr"])
def test_negative_learning_rate(capsys, key):
    assert config_error_line(capsys, f"--model.init_args.{key}=-1") == (
        f"error: invalid LatentActorCritic config: {key} must be >= 0 (0 freezes that network; got -1.0)")


def test_unknown_toy_prompt_set(capsys):
    assert config_error_line(capsys, "--model.init_args.train_prompts=toy:tran") == (
        "error: unknown toy prompt set 'toy:tran' (did you mean 'toy:train'?): the toy prompt sets are "
        "'toy:train' and 'toy:heldout'")


def test_other_constructor_checks_are_one_line(capsys):
    # A lit_diffac class's own ValueError while the recipe is built (here CriticGAE's range check).
    assert config_error_line(capsys, "--model.init_args.estimator.init_args.gamma=2") == (
        "error: invalid CriticGAE: gamma and lam must lie in [0, 1], got gamma=2.0, lam=1.0")


def test_mistyped_class_path(capsys, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(Path(MAIN_RECIPE).read_text().replace("lit_diffac.rewards.DigitAlignment",
                                                            "lit_diffac.rewards.DigitAlignmnt"))
    assert config_error_line(capsys, recipe=str(recipe)) == (
        "error: no class DigitAlignmnt in lit_diffac.rewards (did you mean 'lit_diffac.rewards.DigitAlignment'?): "
        f"cannot import class_path 'lit_diffac.rewards.DigitAlignmnt' for 'model.init_args.rewards' in {recipe}")


def test_yaml_syntax_error_names_the_file(capsys, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(Path(MAIN_RECIPE).read_text().replace("  max_epochs: 300 ", "  max_epochs: [300 "))
    assert config_error_line(capsys, recipe=str(recipe)) == (
        f"error: cannot read {recipe}: YAML syntax error at line 11, column 3: expected ',' or ']', but got "
        "'<scalar>' (while parsing a flow sequence at line 10, column 15)")


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


def test_a_checkpoint_of_other_base_weights_is_refused_by_resume_and_sample(capsys, tmp_path, toy_pipelines):
    """Checkpoints hold only trained tensors; the frozen ones come from the recipe's pipeline, checked by hash."""
    from lit_diffac.toy.models import build_toy_backbone, save_pipeline

    torch.manual_seed(1)
    other = save_pipeline(build_toy_backbone("dit"), tmp_path / "other-dit")  # same architecture, other weights
    trained = write_tiny_recipe(tmp_path, toy_pipelines, reward="brightness", name="trained.yaml")
    assert main(["run", str(trained), "--trainer.max_epochs=1"]) == 0
    ckpt = tmp_path / "runs" / "trained" / "version_0" / "checkpoints" / "last.ckpt"
    moved = write_tiny_recipe(tmp_path, {"dit": other}, reward="brightness", name="moved.yaml")
    expected = (f"error: checkpoint {ckpt} holds only trained weights, made for other base weights than this recipe "
                f"loads (trained on '{toy_pipelines['dit']}', base-weights SHA-256 ")
    for args in (["run", str(moved), "--ckpt_path", str(ckpt)],
                 ["sample", "--config", str(moved), "--ckpt", str(ckpt), "--out", str(tmp_path / "s")]):
        line = error_line(capsys, args)
        assert line.startswith(expected) and f"loaded here: '{other}'" in line, line


def test_mismatched_checkpoint_for_resume_and_sample(capsys, tmp_path, toy_pipelines):
    dit = write_tiny_recipe(tmp_path, toy_pipelines, family="dit", reward="brightness", name="dit.yaml")
    assert main(["run", str(dit), "--trainer.max_epochs=1"]) == 0
    ckpt = tmp_path / "runs" / "dit" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    before = ckpt.read_bytes()
    capsys.readouterr()
    unet = write_tiny_recipe(tmp_path, toy_pipelines, family="unet", reward="brightness", name="unet.yaml")
    expected = f"error: checkpoint {ckpt} was written by a different model ("
    line = error_line(capsys, ["run", str(unet), "--ckpt_path", str(ckpt)])
    assert line.startswith(expected) and "Use the recipe that wrote it" in line
    line = error_line(capsys, ["sample", "--config", str(unet), "--ckpt", str(ckpt), "--out", str(tmp_path / "s")])
    assert line.startswith(expected)
    assert ckpt.read_bytes() == before  # the checkpoint is untouched
    out = tmp_path / "ok"  # the recipe that wrote it samples from it
    assert main(["sample", "--config", str(dit), "--ckpt", str(ckpt), "--prompts", "toy:heldout",
                 "--out", str(out)]) == 0
    assert (out / "rewards.json").is_file()
