"""The two-digit toy task (issue 17): prompts and the seen / unseen split, canvases, the judge on real canvases,
the rewards, non-square (16×32) backbones, the shipped base models and the recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_diffac.backbones.base import to_unit_rgb
from lit_diffac.data.prompts import load_prompts
from lit_diffac.errors import PromptFileError
from lit_diffac.rewards.toy import PairAlignment
from lit_diffac.toy import pairs
from lit_diffac.toy.digits import load_digits
from lit_diffac.toy.pairs import (EVAL_SEEN_PAIRS, HELDOUT_TEMPLATES, SEEN_PAIRS, TRAIN_TEMPLATES, UNSEEN_PAIRS,
                                  make_pair_prompt, pair_of, pair_prompt_table)

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "toy_pairs"


# ---------------------------------------------------------------------------------------------- prompts


def test_unseen_pairs_are_fixed_balanced_and_never_in_training_prompts():
    assert len(UNSEEN_PAIRS) == 20 and len(SEEN_PAIRS) == 80 and len(EVAL_SEEN_PAIRS) == 20
    assert UNSEEN_PAIRS[:4] == ((0, 3), (0, 7), (1, 4), (1, 8))  # (a, a ± 3 mod 10): documented, never changes
    assert not set(UNSEEN_PAIRS) & set(SEEN_PAIRS) and set(EVAL_SEEN_PAIRS) <= set(SEEN_PAIRS)
    for table in (UNSEEN_PAIRS, EVAL_SEEN_PAIRS):  # every digit twice on each side: same digits, seen or not
        assert sorted(a for a, _ in table) == sorted(b for _, b in table) == sorted(list(range(10)) * 2)
    train = pair_prompt_table("train")
    assert len(train) == 480 and {p for _, p in train} == set(SEEN_PAIRS)
    assert not {p for _, p in train} & set(UNSEEN_PAIRS)
    assert {p for _, p in pair_prompt_table("heldout-unseen")} == set(UNSEEN_PAIRS)
    assert {p for _, p in pair_prompt_table("heldout-seen")} == set(EVAL_SEEN_PAIRS)
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    heldout = load_prompts("toy-pairs:heldout")
    assert heldout == load_prompts("toy-pairs:heldout-seen") + load_prompts("toy-pairs:heldout-unseen")
    assert len(heldout) == 80 and not set(heldout) & set(load_prompts("toy-pairs:train"))


def test_every_prompt_parses_to_its_pair_in_order():
    for split in pairs.PAIR_PROMPT_SETS:
        for prompt, pair in pair_prompt_table(split):
            assert pair_of(prompt) == pair, prompt
    assert make_pair_prompt(3, 7, "a {a} to the left of a {b}") == "a 3 to the left of a 7"
    assert pair_of("a 3 to the left of a 7") == pair_of("a seven to the right of a three") == (3, 7)
    assert pair_of("the numbers three and seven") == pair_of("3 and 7") == (3, 7)
    with pytest.raises(ValueError, match="names 1 digits"):
        pair_of("a handwritten digit 7")
    with pytest.raises(PromptFileError, match="did you mean 'toy-pairs:heldout-unseen'"):
        load_prompts("toy-pairs:heldout-unsen")


def test_pair_tokenizer_has_one_token_per_word_and_every_prompt_fits(tmp_path):
    from lit_diffac.toy.text import MAX_LENGTH, write_tokenizer

    tokenizer = write_tokenizer(tmp_path, pairs.pair_vocabulary())
    assert {"left", "right", "and", "then", "numbers"} <= set(pairs.pair_vocabulary())
    for prompt in [*load_prompts("toy-pairs:train"), *load_prompts("toy-pairs:heldout")]:
        ids = tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2 <= MAX_LENGTH, prompt  # BOS, one token per word, EOS


# ---------------------------------------------------------------------------------------------- canvases


def test_canvases_hold_the_digits_side_by_side_with_sideways_jitter_only():
    digits = load_digits("train")
    chosen = torch.tensor([[3, 7], [0, 0]])
    canvases = pairs.canvases_for(digits, chosen, generator=torch.Generator().manual_seed(0), jitter=0)
    assert canvases.shape == (2, 1, 16, 32) and -1 <= canvases.min() and canvases.max() <= 1
    left_ok = [any(torch.equal(canvases[i, :, :, :16], img) for img in digits.images[digits.labels == d])
               for i, d in enumerate(chosen[:, 0].tolist())]
    assert all(left_ok)
    moved = pairs.shift(digits.images[:1], torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(moved[..., 1:], digits.images[:1, ..., :-1]) and bool((moved[..., 0] == -1).all())
    jittered, drawn = pairs.sample_canvases(digits, 64, generator=torch.Generator().manual_seed(1))
    assert jittered.shape == (64, 1, 16, 32) and {tuple(p) for p in drawn.tolist()} <= set(SEEN_PAIRS)
    ink_rows = (jittered > -1).any(dim=-1).any(dim=0).squeeze(0)  # no vertical jitter: the same rows hold ink
    assert ink_rows.tolist() == (digits.images > -1).any(dim=-1).any(dim=0).squeeze(0).tolist()


def test_judge_gets_both_digits_of_real_heldout_canvases():
    from lit_diffac.toy.evaluation import judge_pair_accuracy

    report = judge_pair_accuracy(canvases_per_pair=3)
    assert report["pair_judge_images"] == 300 and report["pair_judge_accuracy"] >= 0.95


# ---------------------------------------------------------------------------------------------- rewards


class _FakeJudge(nn.Module):
    """Reads a half's mean grey level as a digit: p = 0.5 on round(9 · level), 0.5 / 9 on each other digit."""

    def preprocess(self, images):
        return images.float().mean(dim=1, keepdim=True)

    def forward(self, x):
        digit = (x.mean(dim=(1, 2, 3)) * 9).round().long()
        probs = torch.full((x.shape[0], 10), 0.5 / 9)
        probs[torch.arange(x.shape[0]), digit] = 0.5
        return probs.log()


def _canvas(left: int, right: int) -> torch.Tensor:
    image = torch.empty(3, 16, 32)
    image[..., :16], image[..., 16:] = left / 9, right / 9
    return image


def test_pair_rewards_exact_values_on_constructed_canvases():
    dense, sparse = PairAlignment(), PairAlignment(sparse=True)
    for reward in (dense, sparse):
        reward.classifier = _FakeJudge()
    images = torch.stack([_canvas(3, 7), _canvas(3, 7), _canvas(7, 3), _canvas(3, 3)])
    prompts = ["a 3 to the left of a 7", "a seven to the right of a three", "3 and 7", "3 and 7"]
    hit, miss = 0.5, 0.5 / 9
    torch.testing.assert_close(dense(images, prompts), torch.tensor([hit * hit, hit * hit, miss * miss, hit * miss]))
    assert sparse(images, prompts).tolist() == dense.accuracy(images, prompts).tolist() == [1.0, 1.0, 0.0, 0.0]
    groups = dense.accuracy_by_group(torch.stack([_canvas(0, 3), _canvas(0, 1)]), ["0 and 3", "0 and 1"])
    assert groups["unseen"].tolist() == [1.0] and groups["seen"].tolist() == [1.0]
    with pytest.raises(ValueError, match="two-digit canvases"):
        dense(torch.zeros(1, 3, 16, 16), ["3 and 7"])


def test_real_judge_rewards_and_held_out_metrics_split_seen_and_unseen():
    from lit_diffac.evaluation import score_images

    table = pair_prompt_table("heldout")
    prompts = [p for p, _ in table]
    canvases = pairs.canvases_for(load_digits("heldout"), torch.tensor([p for _, p in table]),
                                  generator=torch.Generator().manual_seed(0))
    images = to_unit_rgb(canvases)
    reward = PairAlignment()
    swapped = [make_pair_prompt(b, a, "{a} and {b}") for _, (a, b) in table]
    assert reward(images, prompts).mean() > 0.9 > 0.1 > reward(images, swapped).mean()
    wrong_unseen = images.clone()
    wrong_unseen[40:] = images[:40]  # unseen-pair prompts get seen-pair canvases
    metrics = score_images(wrong_unseen, prompts, [reward])
    assert metrics["eval/pair_alignment_accuracy_seen"] >= 0.95
    assert metrics["eval/pair_alignment_accuracy_unseen"] == 0.0
    assert metrics["eval/pair_alignment_accuracy"] == pytest.approx(metrics["eval/pair_alignment_accuracy_seen"] / 2)


# ---------------------------------------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def pair_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised two-digit toy UNet and DiT pipeline folders."""
    from lit_diffac.toy.models import build_toy_backbone, save_pipeline

    root = tmp_path_factory.mktemp("pair_pipelines")
    torch.manual_seed(0)
    return {family: save_pipeline(build_toy_backbone(family, task="pairs"), root / family, task="pairs")
            for family in ("unet", "dit")}


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_non_square_backbones_keep_their_native_size_through_save_and_load(family, pair_pipelines):
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.evaluation import default_sampler, generate
    from lit_diffac.value_heads import ValueHead

    cls = UNetBackbone if family == "unet" else DiTBackbone
    taps = ["down_blocks.1", "mid_block"] if family == "unet" else [0, 3]
    backbone = cls(str(pair_pipelines[family]), feature_taps=taps)
    assert backbone.latent_shape == (1, 16, 32) and backbone.latent_hw == (16, 32)
    with pytest.raises(ValueError, match="non-square 16x32"):
        backbone.latent_size
    x = torch.randn(2, *backbone.latent_shape)
    out = backbone(x, torch.tensor([10, 900]), backbone.encode_prompts(["3 and 7", "handwritten 7 to the right of 3"]))
    assert out.prediction.shape == x.shape
    head = ValueHead(backbone.feature_dims, backbone.pooled_dim)
    assert head(out.features, torch.tensor([0.1, 0.9]), backbone.encode_prompts(["3 and 7"] * 2).pooled).shape[0] == 2
    images = generate(backbone, default_sampler(backbone, 2), ["3 and 7"], seed=0)
    assert images.shape == (1, 3, 16, 32)
    assert cls(str(pair_pipelines[family]), resolution=16).latent_shape == (1, 16, 16)  # a side: square


def test_resolution_takes_height_and_width(toy_pipelines):
    from lit_diffac.backbones import DiTBackbone

    assert DiTBackbone(str(toy_pipelines["dit"]), resolution=[16, 32]).latent_shape == (1, 16, 32)
    with pytest.raises(ValueError, match="resolution must be one side or"):
        DiTBackbone(str(toy_pipelines["dit"]), resolution=[16, 32, 8])


def test_exported_toy_pipeline_code_draws_the_native_non_square_size(pair_pipelines):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from lit_diffac.toy.diffusers_pipeline import ToyDiTPipeline

    folder = pair_pipelines["dit"]
    pipe = ToyDiTPipeline(SD3Transformer2DModel.from_pretrained(folder / "transformer"),
                          FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                          CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
                          CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("3 and 7", num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 1, 16, 32)


# ---------------------------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_shipped_pair_models_load_generate_and_start_in_the_band(family):
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.backbones.loading import resolve_pretrained
    from lit_diffac.evaluation import default_sampler, generate

    alias = f"toy-pairs-{family}"
    backbone = (UNetBackbone if family == "unet" else DiTBackbone)(alias)
    images = generate(backbone, default_sampler(backbone), ["3 and 7", "the numbers five and one"], seed=0)
    assert images.shape == (2, 3, 16, 32) and images.std() > 0.1
    final = json.loads((Path(resolve_pretrained(alias)) / "lit_diffac.json").read_text())["final_eval"]
    assert final["num_samples"] == 2000  # 80 held-out prompts x 25: seen and unseen pairs both in the band
    assert 0.10 <= final["alignment_accuracy_seen"] <= 0.30 and 0.10 <= final["alignment_accuracy_unseen"] <= 0.30


# ---------------------------------------------------------------------------------------------- recipes


def test_sample_reports_seen_and_unseen_accuracy(tmp_path, capsys):
    """``lit-diffac sample`` scores pair canvases like the held-out evaluation: overall, seen and unseen accuracy."""
    from lit_diffac.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("3 and 4\n0 and 3\n")  # a seen and an unseen pair
    assert main(["sample", "--config", str(RECIPES / "actor_critic_dit.yaml"), "--prompts", str(prompts),
                 "--samples-per-prompt", "2", "--out", str(tmp_path / "out"), "--trainer.logger=false"]) == 0
    report = json.loads((tmp_path / "out" / "rewards.json").read_text())
    accuracy = {k: v for k, v in report["mean"].items() if "accuracy" in k}
    assert set(accuracy) == {"pair_alignment_accuracy", "pair_alignment_accuracy_seen",
                             "pair_alignment_accuracy_unseen"}
    assert accuracy["pair_alignment_accuracy"] == pytest.approx(
        (accuracy["pair_alignment_accuracy_seen"] + accuracy["pair_alignment_accuracy_unseen"]) / 2)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_pair_recipe_runs(recipe, tmp_path, monkeypatch, capsys):
    from test_metrics_docs import logged_keys, undocumented
    from test_recipes import TINY, _kind

    from lit_diffac.cli import main

    monkeypatch.chdir(tmp_path)
    kind = _kind(recipe)
    args = ["run", str(recipe), *TINY[kind], "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    if kind == "pretrain":
        args.append(f"--model.init_args.output_dir={tmp_path / 'pipeline'}")
    else:  # one seen and one unseen pair instead of the 80 held-out prompts
        args.append("--model.init_args.evaluation.init_args.prompts=[3 and 4, 0 and 3]")
    if recipe.stem == "grpo_dit":  # the documented one-line switch to the sparse reward
        args.append("--model.init_args.rewards=[{class_path: lit_diffac.rewards.PairAlignment, "
                    "init_args: {sparse: true}}]")
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and undocumented(logged_keys(str(events[0].parent))) == []  # docs/metrics.md has every key
    if kind == "pretrain":
        provenance = json.loads((tmp_path / "pipeline" / "lit_diffac.json").read_text())
        assert {"alignment_accuracy_seen", "alignment_accuracy_unseen"} <= set(provenance["final_eval"])
        return
    summary = json.loads(Path(out[-1].removeprefix("summary: ")).read_text())
    assert {"eval/pair_alignment_accuracy_seen", "eval/pair_alignment_accuracy_unseen"} <= set(summary["final"])


def test_pair_recipes_mirror_the_single_digit_ones():
    import yaml

    for recipe in RECIPES.glob("*.yaml"):
        pair = yaml.safe_load(recipe.read_text())
        digits = yaml.safe_load((RECIPES.parent / "toy" / recipe.name).read_text())
        assert pair["trainer"]["max_epochs" if "max_epochs" in digits["trainer"] else "max_steps"]
        if recipe.stem.startswith("pretrain"):
            assert pair["model"]["init_args"]["task"] == "pairs"
            continue
        p, d = pair["model"]["init_args"], digits["model"]["init_args"]
        assert p["backbone"]["init_args"] == {**d["backbone"]["init_args"],
                                              "pretrained": d["backbone"]["init_args"]["pretrained"].replace(
                                                  "toy-", "toy-pairs-")}
        assert p["train_prompts"] == "toy-pairs:train"
        assert p["evaluation"]["init_args"]["prompts"] == "toy-pairs:heldout"
        assert p["rewards"] == [{"class_path": "lit_diffac.rewards.PairAlignment"}]
        # measured apart: the critic-chosen half of the steps helps the single-digit DiT, costs the pair task 6-10
        # points (benchmarks/RESULTS.md), so the pair recipe trains every step (the module's defaults)
        own = {"actor_critic_dit.yaml": {"step_selection", "timestep_fraction"}}.get(recipe.name, set())
        assert own <= set(d) and not own & set(p), recipe.name
        same = {k for k in d if k not in ("backbone", "rewards", "train_prompts", "evaluation", *own)}
        assert {k: p.get(k) for k in same} == {k: d[k] for k in same}, recipe.name
        assert pair["trainer"]["max_epochs"] == digits["trainer"]["max_epochs"]
