"""Monitoring callbacks (``lit_diffac.callbacks``): held-out evaluation, sample grids, the RL progress bar,
and the screenshot-level check: a tiny training run's TensorBoard event file holds the grid and eval scalars."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lit_diffac.callbacks import HeldOutEvaluation, RLProgressBar, SampleGrid, annotate_grid, mean_pairwise_distance
from lit_diffac.callbacks.sample_grid import wrap_text


def tiny_module(backbone, reward, **overrides):
    from lit_diffac.modules import LatentActorCritic

    kwargs = dict(batch_size=2, minibatch_size=20, eval_samples_per_prompt=2, eval_every_n_iterations=0,
                  eval_prompts=["a handwritten digit 3", "handwritten seven"])
    kwargs.update(overrides)
    torch.manual_seed(0)  # the value head's initialisation
    return LatentActorCritic(backbone=backbone, rewards=[reward], **kwargs)


def fit(module, iterations: int, callbacks=(), logger=False, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=iterations, accelerator="cpu", logger=logger, callbacks=list(callbacks),
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=any(isinstance(c, RLProgressBar) for c in callbacks), **trainer_kwargs)
    trainer.fit(module)
    return trainer


# --------------------------------------------------------------------------------------------- pure parts

def test_mean_pairwise_distance_matches_a_double_loop():
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    groups = ["a", "b", "a", "a", "b", "c"]  # "c" has one sample: no pair, left out
    expected = []
    for g in ("a", "b"):
        rows = [i for i, x in enumerate(groups) if x == g]
        pairs = [(features[i] - features[j]).norm().item() for i, j in itertools.combinations(rows, 2)]
        expected.append(sum(pairs) / len(pairs))
    assert mean_pairwise_distance(features, groups) == pytest.approx(sum(expected) / 2, rel=1e-5)
    collapsed = features[[0, 1, 0, 0, 1, 5]]  # every sample of a prompt identical
    assert mean_pairwise_distance(collapsed, groups) == pytest.approx(0.0, abs=1e-6)  # mode collapse reads 0
    assert math.isnan(mean_pairwise_distance(features[:2], ["x", "y"]))
    with pytest.raises(ValueError, match="6 feature rows for 2 group labels"):
        mean_pairwise_distance(features, ["x", "y"])


def test_wrap_text_keeps_every_line_within_the_width():
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()

    def measure(text):
        return draw.textlength(text, font=font)

    text = "a picture of the number 7 with an extraordinarilylongwordthatcannotfit\ndigit_alignment 0.512"
    lines = wrap_text(text, 60, measure)
    assert all(measure(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    assert lines[0] == "a picture of" and lines[-1].endswith("0.512")  # the newline starts a new line


def test_annotate_grid_upscales_each_tile_and_writes_its_caption():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(annotate_grid(images, ["seven", "", "a long caption that wraps"], columns=2, min_tile=32,
                                    gap=4))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tile = 32  # 8 px upscaled x4
    caption_h = (grid.shape[0] + 4) // 2 - 4 - tile
    assert grid.shape[1] == 2 * tile + 4 and caption_h > 0
    for i, (row, col) in enumerate([(0, 0), (0, 1), (1, 0)]):
        x, y = col * (tile + 4), row * (tile + caption_h + 4)
        np.testing.assert_array_equal(grid[y:y + tile, x:x + tile], pixels[i].repeat(4, 0).repeat(4, 1))
        caption = grid[y + tile:y + tile + caption_h, x:x + tile]
        assert (caption.min() < 128) == (i != 1)  # text is drawn under captioned tiles only
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        annotate_grid(images, ["a", "b"])


# --------------------------------------------------------------------------------------------- in training

def test_callback_evaluation_equals_the_builtin_one_and_leaves_training_unchanged(dit_backbone, toy_pipelines,
                                                                                  digit_reward):
    """Same prompts, seed and samples: the callback's eval/<reward> values are the module's own; moving the
    periodic evaluation into the callback changes neither the training nor the figures."""
    from lit_diffac.backbones import DiTBackbone

    builtin = tiny_module(dit_backbone, digit_reward, eval_every_n_iterations=1)
    fit(builtin, 2)
    callback = HeldOutEvaluation(every_n_steps=1, verbose=False)
    moved = tiny_module(DiTBackbone(str(toy_pipelines["dit"])), digit_reward)
    fit(moved, 2, callbacks=[callback])
    periodic = [e for e in builtin.eval_history if e["label"] == "periodic"]
    from_callback = [e for e in moved.eval_history if e["label"] == "callback-periodic"]
    assert len(periodic) == len(from_callback) == 1  # after iteration 1 of 2 (the final one is the module's)
    for key in ("eval/digit_alignment", "eval/digit_alignment_accuracy"):
        assert from_callback[0][key] == periodic[0][key]
        assert moved.eval_history[-1][key] == builtin.eval_history[-1][key]
    assert 0.0 < from_callback[0]["eval/diversity"] < 1.0  # RMS pixel distance of distinct samples
    for (name, a), (_, b) in zip(builtin.state_dict().items(), moved.state_dict().items()):
        assert torch.equal(a, b), name


def test_callbacks_name_the_module_they_need():
    module = L.LightningModule()
    with pytest.raises(TypeError, match="needs a module with a `backbone` and a `sampler`"):
        HeldOutEvaluation(every_n_steps=1).measure(module)
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        SampleGrid(every_n_steps=-1)


def test_sample_grid_writes_the_chosen_rewards_under_the_images(dit_backbone, digit_reward):
    module = tiny_module(dit_backbone, digit_reward)
    plain = np.asarray(SampleGrid(num_prompts=2, rewards=[]).draw(module))
    captioned = np.asarray(SampleGrid(num_prompts=2).draw(module))  # default: the training rewards
    assert plain.shape[1] == captioned.shape[1] and captioned.shape[0] > plain.shape[0]  # one more text line
    with pytest.raises(ValueError, match=r"rewards \['nope'\] are not among the module's rewards"):
        SampleGrid(rewards=["nope"]).draw(module)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel saved with its tokenizer and image processor (like a hub download)."""
    from test_rewards_clip import tiny_clip_config, write_clip_tokenizer
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(folder)
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tokenizer))).save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder))
    return folder


def test_clip_score_is_torchmetrics_on_the_configured_folder(dit_backbone, digit_reward, clip_folder):
    from test_rewards_clip import reference_clip_outputs

    from lit_diffac.evaluation import expand_prompts, generate

    module = tiny_module(dit_backbone, digit_reward)
    callback = HeldOutEvaluation(clip_model=str(clip_folder), samples_per_prompt=3, verbose=False)
    metrics = callback.measure(module)
    prompts = expand_prompts(module.eval_prompt_list, 3)
    images = generate(module.backbone, module.sampler, prompts)
    out = reference_clip_outputs(clip_folder, images, prompts)  # transformers' own processor + forward
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert metrics["eval/clip_score"] == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-3)
    unit = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    assert metrics["eval/clip_diversity"] == pytest.approx(mean_pairwise_distance(unit, prompts), abs=1e-4)
    assert {"eval/digit_alignment", "eval/digit_alignment_accuracy", "eval/diversity"} <= set(metrics)


def test_missing_clip_folder_is_one_clear_error(tmp_path):
    from lit_diffac.rewards.clip import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="HeldOutEvaluation clip_model not found: folder .* does not exist"):
        HeldOutEvaluation(clip_model=str(tmp_path / "nope"))


def test_tensorboard_event_file_has_the_grid_and_the_eval_scalars(dit_backbone, digit_reward, clip_folder, tmp_path,
                                                                 capsys):
    """Screenshot-level: what a user opens in TensorBoard after a tiny run with the callbacks."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = tiny_module(dit_backbone, digit_reward)
    grid = SampleGrid(every_n_steps=1, num_prompts=2, save_png=True)
    evaluation = HeldOutEvaluation(every_n_steps=1, clip_model=str(clip_folder), at_end=True)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit(module, 2, callbacks=[grid, evaluation, RLProgressBar()], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "samples/grid" in tags["images"]
    shots = events.Images("samples/grid")
    assert [s.step for s in shots] == [0, 1, 2]  # base policy, after iteration 1, final
    first = np.asarray(Image.open(__import__("io").BytesIO(shots[0].encoded_image_string)).convert("RGB"))
    assert first.shape == (shots[0].height, shots[0].width, 3) and shots[0].width >= 2 * 128
    np.testing.assert_array_equal(first, np.asarray(Image.open(Path(logger.log_dir) / "sample_grids"
                                                               / "iteration_000000.png").convert("RGB")))
    for key in ("eval/digit_alignment", "eval/digit_alignment_accuracy", "eval/diversity", "eval/clip_score",
                "eval/clip_diversity"):
        assert key in tags["scalars"], key
    assert [e.step for e in events.Scalars("eval/diversity")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/digit_alignment")] == [0, 1, 2, 2]  # module base/final + callback
    out = capsys.readouterr().out
    assert "iteration 2/2" in out and "reward=" in out and "approx_kl=" in out and "ev=" in out


def test_recipe_callbacks_from_the_cli(tmp_path, monkeypatch, capsys):
    """The main recipe's callbacks through ``lit-diffac run``: the progress bar shows iteration, reward, approx_kl
    and explained variance; ``--trainer.enable_progress_bar=false`` drops it instead of failing."""
    from lit_diffac.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "toy" / "actor_critic_dit.yaml"
    tiny = ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
            "--model.init_args.eval_samples_per_prompt=1", "--trainer.enable_model_summary=false"]
    assert main(["run", str(recipe), *tiny]) == 0
    out = capsys.readouterr().out
    assert "iteration 1/1" in out and all(f"{k}=" in out for k in ("reward", "approx_kl", "ev"))
    assert main(["run", str(recipe), *tiny, "--trainer.enable_progress_bar=false"]) == 0
    assert "iteration 1/1" not in capsys.readouterr().out
