"""Every ``recipes/sd15`` and ``recipes/sd35`` recipe, as shipped, through the real CLI on tiny random SD1.5 / SD3
pipeline folders and tiny random reward weights (1 iteration, 2 sampler steps).

Only weight paths, prompt-file paths, sizes and the device are overridden on the command line; the rewards list is
the recipe's own with its weight paths (and the GenEval server's URL) pointed at the tiny stand-ins.  LoRA, gradient
checkpointing and bf16 weights come from the recipes themselves; float32, CFG with a negative prompt and the critic
adapter are switched on by overrides in some runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_diffac.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SD_RECIPES = sorted([*(RECIPES / "sd15").glob("*.yaml"), *(RECIPES / "sd35").glob("*.yaml")])


@pytest.fixture(scope="module")
def reward_weights(tmp_path_factory) -> dict[str, str]:
    """Tiny random reward weights in the formats the reward classes load (built as the reward tests do)."""
    from test_rewards_clip import tiny_clip_config, write_clip_tokenizer
    from test_rewards_image_reward import TH, VH, image_reward_state_dict, write_bert_tokenizer
    from torch import nn
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lit_diffac.rewards.convert import convert_reward_main

    root = tmp_path_factory.mktemp("reward_weights")
    clip = root / "clip"  # a CLIPModel folder with tokenizer and processor: CLIP score, PickScore, aesthetic, HPSv2
    tokenizer = write_clip_tokenizer(clip)
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tokenizer))).save_pretrained(str(clip))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip))
    mlp = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.2), nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 4),
                        nn.Dropout(0.1), nn.Linear(4, 4), nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, root / "aesthetic.pth")
    bert = write_bert_tokenizer(root / "bert")
    torch.save(image_reward_state_dict(vocab=len(bert) + 2), root / "ImageReward.pt")
    assert convert_reward_main(["image-reward", str(root / "ImageReward.pt"), str(root / "image_reward"),
                                "--tokenizer", str(root / "bert"), "--vision-heads", str(VH),
                                "--text-heads", str(TH)]) == 0
    return {"pretrained": str(clip), "processor": str(clip), "clip_model": str(clip),
            "predictor": str(root / "aesthetic.pth"), "image_reward": str(root / "image_reward")}


@pytest.fixture(scope="module")
def geneval_server():
    """A stand-in GenEval server: the reference RewardServer scoring brightness."""
    from lit_diffac.rewards import Brightness
    from lit_diffac.rewards.server import RewardServer

    with RewardServer(Brightness(), idle_timeout=300) as server:
        yield server.url


def _tiny_rewards(recipe: Path, weights: dict[str, str], url: str) -> list[dict]:
    """The recipe's own rewards list with weight paths and URLs pointed at the tiny stand-ins."""
    rewards = yaml.safe_load(recipe.read_text())["model"]["init_args"]["rewards"]
    for reward in rewards:
        args = reward.setdefault("init_args", {})
        for key in ("pretrained", "processor", "clip_model", "predictor"):
            if key in args:
                args[key] = weights["image_reward"] if reward["class_path"].endswith(".ImageReward") else weights[key]
        if "url" in args:
            args["url"] = url
    return rewards


def _run(recipe: Path, tmp_path: Path, sd_pipelines, weights, url, extra: list[str]) -> dict:
    model = yaml.safe_load(recipe.read_text())["model"]
    config, pretraining = model["init_args"], model["class_path"].endswith("ValuePretraining")
    family = "sd15" if recipe.parent.name == "sd15" else "sd3"
    args = ["run", str(recipe), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.backbone.init_args.pretrained={sd_pipelines[family]}",
            "--model.init_args.sampler.init_args.num_steps=2", "--model.init_args.batch_size=2",
            "--model.init_args.minibatch_size=4", "--model.init_args.evaluation.init_args.samples_per_prompt=1",
            f"--model.init_args.train_prompts={RECIPES.parent / config['train_prompts']}",
            "--model.init_args.evaluation.init_args.prompts="
            f"{RECIPES.parent / config['evaluation']['init_args']['prompts']}",
            f"--model.init_args.rewards={json.dumps(_tiny_rewards(recipe, weights, url))}"]
    if family == "sd3":
        args += ["--model.init_args.backbone.init_args.resolution=16",
                 "--model.init_args.backbone.init_args.max_sequence_length=16"]
    assert main(args + extra) == 0
    if pretraining:  # the head goes into the run's own folder (no output_path in the recipe)
        assert len(list(Path(tmp_path).rglob("version_0/value_head.safetensors"))) == 1
        return {}
    summaries = list(Path(tmp_path).rglob("summary.json"))
    assert len(summaries) == 1
    return json.loads(summaries[0].read_text())


#: Per-recipe extra overrides, so the runs together cover float32 / bf16, CFG + negative prompt and the critic adapter.
EXTRA = {
    "sd15/pickscore": ["--model.init_args.backbone.init_args.weights_dtype=float32",
                       "--model.init_args.backbone.init_args.cfg_scale=2.0",
                       "--model.init_args.backbone.init_args.negative_prompt=blurry, low quality"],
    "sd15/aesthetic": ["--model.init_args.backbone.init_args.critic_lora_rank=2",
                       "--model.init_args.value_gradient=critic_lora", "--model.init_args.critic_replay=null"],
    "sd35/pickscore": ["--model.init_args.backbone.init_args.weights_dtype=float32",
                       "--model.init_args.backbone.init_args.cfg_scale=3.0",
                       "--model.init_args.backbone.init_args.negative_prompt=blurry"],
    "sd35/ocr": ["--model.init_args.backbone.init_args.critic_lora_rank=2",
                 "--model.init_args.value_gradient=critic_lora", "--model.init_args.critic_replay=null",
                 "--model.init_args.backbone.init_args.use_t5=false"],
}


@pytest.mark.parametrize("recipe", SD_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_sd_recipe_runs(recipe, tmp_path, monkeypatch, sd_pipelines, reward_weights, geneval_server):
    monkeypatch.chdir(tmp_path)
    key = f"{recipe.parent.name}/{recipe.stem}"
    extra = list(EXTRA.get(key, []))
    if key == "sd35/ocr":  # RapidOCR takes ~1.5 s an image on one CPU thread: evaluate on one held-out prompt
        (tmp_path / "one_prompt.txt").write_text('a wooden sign that says "Welcome Home"\n')
        extra.append(f"--model.init_args.evaluation.init_args.prompts={tmp_path / 'one_prompt.txt'}")
    summary = _run(recipe, tmp_path, sd_pipelines, reward_weights, geneval_server, extra)
    if not summary:  # value pretraining: the head file was checked
        return
    assert summary["iterations"] == 1 and summary["samples_seen"] == 2
    assert summary["base"] and set(summary["base"]) == set(summary["final"])
    train = summary["final_train"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in train.items() if k.startswith("reward/"))
    if "weights_dtype=float32" in " ".join(EXTRA.get(key, [])):
        # fp32 with CFG and a negative prompt: the update recomputes exactly the rollout's log-probs
        assert train["train/onpolicy_max_abs_ratio_dev"] < 1e-5


def test_every_sd_recipe_documents_memory_time_and_smaller_gpus():
    assert len(SD_RECIPES) >= 9
    for recipe in SD_RECIPES:
        header = recipe.read_text().split("\nseed_everything")[0]
        for needle in ("Expected GPU memory (ESTIMATE", "Expected time per iteration (ESTIMATE", "Smaller GPUs",
                       "Paper values"):
            assert needle in header, (recipe.name, needle)
        init = yaml.safe_load(recipe.read_text())["model"]["init_args"]
        assert init["backbone"]["init_args"]["lora_rank"] > 0
        assert init["backbone"]["init_args"]["gradient_checkpointing"] is True


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_strategy_fragments_combine_with_a_recipe(strategy, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["run", str(RECIPES / "sd35" / "geneval.yaml"), "--config",
              str(RECIPES / "strategies" / f"{strategy}.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy", "deepspeed": "deepspeed_stage_2"}[strategy]
    assert expected in json.dumps(printed["trainer"]["strategy"])
    assert printed["model"]["init_args"]["backbone"]["init_args"]["feature_taps"] == [7, 15, 23]


def test_a_recipe_without_its_weights_fails_with_one_line_saying_where_to_put_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./weights here
    with pytest.raises(SystemExit) as done:
        main(["run", str(RECIPES / "sd35" / "geneval.yaml")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no pipeline folder at './weights/stable-diffusion-3.5-medium': put a diffusers "
                              "pipeline there")
