"""Monitoring: the modules' held-out evaluation (``lit_diffac.evaluation.HeldOutEvaluation``), the callbacks
(``lit_diffac.callbacks``: sample grids, the RL progress bar), and the screenshot-level check: a tiny training
run's TensorBoard event file holds the grid and eval scalars."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lit_diffac.callbacks import RLProgressBar, SampleGrid, annotate_grid
from lit_diffac.callbacks.sample_grid import wrap_text
from lit_diffac.evaluation import HeldOutEvaluation, mean_pairwise_distance

EVAL_PROMPTS = ["a handwritten digit 3", "handwritten seven"]


def tiny_evaluation(**overrides) -> HeldOutEvaluation:
    """The held-out evaluation of the tests: two prompts, two samples each (diversity needs two)."""
    return HeldOutEvaluation(**{"prompts": EVAL_PROMPTS, "samples_per_prompt": 2, **overrides})


def tiny_module(backbone, reward, **overrides):
    from lit_diffac.modules import LatentActorCritic

    kwargs = dict(batch_size=2, minibatch_size=20, evaluation=tiny_evaluation())
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


# --------------------------------------------------------------------------------------------- held-out evaluation

def test_measure_is_evaluate_plus_diversity_on_the_same_settings(dit_backbone, digit_reward):
    """The component's eval/<reward> values are :func:`evaluate`'s (same prompts, seed, samples, sampler, CFG
    off), i.e. :func:`score_images` of :func:`generate`'s images; diversity is their pairwise RMS distance."""
    from lit_diffac.evaluation import evaluate, expand_prompts, generate, pixel_features, score_images
    from lit_diffac.rewards import Brightness

    module = tiny_module(dit_backbone, digit_reward)
    evaluation = module.evaluation
    assert evaluation.prompts == EVAL_PROMPTS and evaluation.every_n_iterations == 0
    metrics = evaluation.measure(module.backbone, module.sampler, list(module.rewards))
    reference = evaluate(module.backbone, module.sampler, EVAL_PROMPTS, [digit_reward], samples_per_prompt=2)
    assert set(metrics) == {"eval/digit_alignment", "eval/digit_alignment_accuracy", "eval/diversity"}
    assert {k: metrics[k] for k in reference} == reference  # exactly: same images, same scores
    prompts = expand_prompts(EVAL_PROMPTS, 2)
    images = generate(module.backbone, module.sampler, prompts)
    assert score_images(images, prompts, [digit_reward]) == reference
    assert metrics["eval/diversity"] == mean_pairwise_distance(pixel_features(images), prompts)
    assert 0.0 < metrics["eval/diversity"] < 1.0  # RMS pixel distance of distinct samples

    # Evaluation-only rewards are added unless a training reward has their name; diversity can be turned off.
    extra = tiny_evaluation(rewards=[Brightness(), type(digit_reward)()], diversity=False)
    more = extra.measure(module.backbone, module.sampler, list(module.rewards))
    assert set(more) == {"eval/digit_alignment", "eval/digit_alignment_accuracy", "eval/brightness"}
    assert more["eval/digit_alignment"] == metrics["eval/digit_alignment"]
    assert more["eval/brightness"] == pytest.approx(images.mean().item(), rel=1e-5)
    # One sample per prompt: no pair, so no diversity (left out, or NaN, which the loggers drop).
    single = tiny_evaluation(samples_per_prompt=1).measure(module.backbone, module.sampler, [digit_reward])
    assert math.isnan(single.get("eval/diversity", math.nan))


def test_is_due_leaves_the_last_iteration_to_the_final_evaluation():
    every_two = HeldOutEvaluation(prompts=EVAL_PROMPTS, every_n_iterations=2)
    assert [every_two.is_due(n, last=False) for n in (1, 2, 3, 4)] == [False, True, False, True]
    assert not every_two.is_due(4, last=True)
    never = HeldOutEvaluation(prompts=EVAL_PROMPTS, every_n_iterations=0)
    assert not any(never.is_due(n, last=False) for n in (1, 2, 50))


def test_periodic_evaluations_are_recorded_and_leave_training_unchanged(dit_backbone, toy_pipelines, digit_reward):
    """base (iteration 0), periodic every ``every_n_iterations`` (not at the last one) and final, in
    ``module.history.evaluations``; the base one is ``measure()`` of the initial policy; evaluating more often
    changes neither the training nor the base / final figures."""
    from lit_diffac.backbones import DiTBackbone

    module = tiny_module(dit_backbone, digit_reward, evaluation=tiny_evaluation(every_n_iterations=2))
    base = module.evaluation.measure(module.backbone, module.sampler, list(module.rewards))
    fit(module, 3)
    history = module.history.evaluations
    assert [(e["label"], e["iteration"], e["samples_seen"]) for e in history] == \
        [("base", 0, 0), ("periodic", 2, 4), ("final", 3, 6)]
    assert {k: v for k, v in history[0].items() if k.startswith("eval/")} == base
    for entry in history:
        assert {"eval/digit_alignment", "eval/digit_alignment_accuracy", "eval/diversity"} <= set(entry)
        assert 0.0 < entry["eval/diversity"] < 1.0
    assert module.history.samples_seen == 6

    plain = tiny_module(DiTBackbone(str(toy_pipelines["dit"])), digit_reward)  # every_n_iterations=0
    fit(plain, 3)
    assert [e["label"] for e in plain.history.evaluations] == ["base", "final"]
    assert plain.history.evaluations == [history[0], history[-1]]
    for (name, a), (_, b) in zip(module.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_configs_are_validated_and_callbacks_name_the_module_they_need():
    module = L.LightningModule()
    with pytest.raises(TypeError, match="SampleGrid needs a module with a `backbone` and a `sampler`"):
        SampleGrid(prompts=["seven"]).draw(module)
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        SampleGrid(every_n_steps=-1)
    with pytest.raises(ValueError, match=r"invalid HeldOutEvaluation: samples_per_prompt must be >= 1 \(got 0\); "
                                         r"every_n_iterations must be >= 0 \(got -1\)"):
        HeldOutEvaluation(prompts=EVAL_PROMPTS, samples_per_prompt=0, every_n_iterations=-1)


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
    evaluation = tiny_evaluation(clip_model=str(clip_folder), samples_per_prompt=3)
    metrics = evaluation.measure(module.backbone, module.sampler, list(module.rewards))
    prompts = expand_prompts(evaluation.prompts, 3)
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

    module = tiny_module(dit_backbone, digit_reward,
                         evaluation=tiny_evaluation(every_n_iterations=1, clip_model=str(clip_folder)))
    grid = SampleGrid(every_n_steps=1, num_prompts=2, save_png=True)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit(module, 2, callbacks=[grid, RLProgressBar()], logger=logger)
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
    for key in ("eval/diversity", "eval/clip_score", "eval/digit_alignment"):  # base, periodic, final
        assert [e.step for e in events.Scalars(key)] == [0, 1, 2], key
    logged = [e.value for e in events.Scalars("eval/digit_alignment")]
    assert logged == pytest.approx([e["eval/digit_alignment"] for e in module.history.evaluations])
    out = capsys.readouterr().out
    assert "iteration 2/2" in out and "reward=" in out and "approx_kl=" in out and "ev=" in out


def test_recipe_callbacks_from_the_cli(tmp_path, monkeypatch, capsys):
    """The main recipe's callbacks through ``lit-diffac run``: the progress bar shows iteration, reward, approx_kl
    and explained variance; ``--trainer.enable_progress_bar=false`` drops it instead of failing."""
    from lit_diffac.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "toy" / "actor_critic_dit.yaml"
    tiny = ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
            "--model.init_args.evaluation.init_args.samples_per_prompt=1", "--trainer.enable_model_summary=false"]
    assert main(["run", str(recipe), *tiny]) == 0
    out = capsys.readouterr().out
    assert "iteration 1/1" in out and all(f"{k}=" in out for k in ("reward", "approx_kl", "ev"))
    assert main(["run", str(recipe), *tiny, "--trainer.enable_progress_bar=false"]) == 0
    assert "iteration 1/1" not in capsys.readouterr().out
