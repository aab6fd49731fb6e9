"""``lit-diffac export``: a tiny trained run's checkpoint → folders plain diffusers loads and generates with
(``DiffusionPipeline.from_pretrained`` for the pipeline, ``pipe.load_lora_weights`` for a LoRA), with weights equal
to the trained module's and a ``lit_diffac.json`` that describes the RL run, not its base model."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from lit_diffac.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
        "--model.init_args.evaluation.init_args.samples_per_prompt=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def readme_block(marker: str) -> str:
    """The fenced code block right after ``<!-- test: marker -->`` in the README."""
    match = re.search(rf"<!-- test: {marker} -->\n```\w+\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, f"README.md has no block marked {marker!r}"
    return match.group(1)


def train(recipe: str | Path, *overrides: str) -> Path:
    """One tiny iteration of a recipe (a toy recipe's name, or a path) through the CLI (cwd = tmp); returns its
    last.ckpt."""
    recipe = Path(recipe) if Path(recipe).is_absolute() else ROOT / "recipes" / "toy" / recipe
    assert main(["run", str(recipe), *TINY, *overrides]) == 0
    (ckpt,) = Path("runs").rglob("last.ckpt")
    return ckpt


def denoiser_inputs(family: str, channels: int = 1, size: int = 16, text_dim: int = 64, pooled_dim: int = 64,
                    seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, size, size, generator=g)
    text, t = torch.randn(2, 8, text_dim, generator=g), torch.tensor([900, 300])
    if family == "unet":
        return {"sample": x, "timestep": t, "encoder_hidden_states": text}
    return {"hidden_states": x, "encoder_hidden_states": text, "timestep": t,
            "pooled_projections": torch.randn(2, pooled_dim, generator=g)}


@torch.no_grad()
def predict(denoiser, family: str, **shape) -> torch.Tensor:
    return denoiser.eval()(**denoiser_inputs(family, **shape)).sample


def check_provenance(folder: Path, ckpt: Path, recipe: Path, base: str, overrides=()) -> dict:
    """``folder/lit_diffac.json`` names the RL run (recipe, checkpoint, iterations, held-out metrics of these
    weights) and, separately, the base model."""
    record = json.loads((folder / "lit_diffac.json").read_text())
    assert record["trained_by"].endswith("LatentActorCritic")
    assert record["recipe"]["path"] == str(recipe.resolve())
    assert record["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert record["recipe"]["config"]["model"]["class_path"] == "lit_diffac.modules.LatentActorCritic"
    assert record["recipe"]["overrides"] == list(overrides)
    assert record["checkpoint"]["path"] == str(ckpt.resolve()) and record["checkpoint"]["checksums_sha256"]
    assert record["iterations"] == 1 and record["samples_seen"] == 2
    held_out = record["held_out"]
    assert [e["label"] for e in held_out["history"]][0] == "base" and held_out["base"]["samples_seen"] == 0
    final = held_out["final"]  # evaluated on the exported weights: after the iteration, as summary.json says
    summary = json.loads(next(Path("runs").rglob("summary.json")).read_text())
    assert final["samples_seen"] == 2 and {k: v for k, v in final.items() if k.startswith("eval/")} == summary["final"]
    assert record["base"]["pretrained"] == base
    assert record["sampling"]["num_steps"] >= 1
    return record


def test_full_fine_tune_exports_a_pipeline_plain_diffusers_loads(tmp_path, monkeypatch, capsys):
    from diffusers import SD3Transformer2DModel

    from lit_diffac.backbones.base import resolve_pretrained
    from lit_diffac.export import TOY_PIPELINE_MODULE
    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    ckpt = train("actor_critic_dit.yaml")  # the README's main job, tiny: runs/actor_critic_dit/version_0/...
    capsys.readouterr()
    command = shlex.split(readme_block("export-command"))
    assert command[:2] == ["lit-diffac", "export"] and Path(command[command.index("--ckpt") + 1]) == ckpt
    assert main(command[1:]) == 0  # as written in the README (recipe: the run's config.yaml)
    printed = capsys.readouterr().out
    assert "pipeline: " in printed and "value_head: " in printed and "lora" not in printed
    module = load_module(str(ROOT / "recipes" / "toy" / "actor_critic_dit.yaml"), str(ckpt))
    trained = module.backbone.denoiser.state_dict()
    namespace: dict = {}
    exec(readme_block("export-load"), namespace)  # the README's example: plain diffusers loads and generates
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "ToyDiTPipeline" and isinstance(pipe.transformer, SD3Transformer2DModel)
    exported = pipe.transformer.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    base = SD3Transformer2DModel.from_pretrained(resolve_pretrained("toy-dit"), subfolder="transformer")
    assert any(not torch.equal(base.state_dict()[k], trained[k]) for k in trained)  # one iteration did train
    assert namespace["image"].size == (16, 16)
    prompts = ["a handwritten digit 3", "seven"]  # the pipeline conditions exactly as training did
    hidden, pooled = pipe.encode_prompt(prompts)
    embeds = module.backbone.encode_prompts(prompts)
    torch.testing.assert_close(hidden, embeds.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, embeds.pooled, rtol=0, atol=1e-5)
    base_dir = Path(resolve_pretrained("toy-dit"))
    assert sorted(p.name for p in Path("exported/pipeline").iterdir()) == sorted(
        [p.name for p in base_dir.iterdir()] + ["model_index.json", f"{TOY_PIPELINE_MODULE}.py"])
    head = namespace["critic"]
    assert head.keys() == module.value_head.state_dict().keys()
    assert all(torch.equal(head[k], v) for k, v in module.value_head.state_dict().items())
    config = ckpt.parent.parent / "config.yaml"
    record = check_provenance(Path("exported/pipeline"), ckpt, config, "toy-dit")
    assert record["base"]["provenance"] == json.loads((base_dir / "lit_diffac.json").read_text())  # the base's own
    assert record["policy"]["lora"] is None and record["policy"]["denoiser"] == "transformer"
    manifest = json.loads(Path("exported/export.json").read_text())
    assert manifest["lora"] is False and manifest["denoiser"] == "transformer"
    assert manifest["checkpoint"] == record["checkpoint"] and manifest["held_out"] == record["held_out"]


def test_lora_policy_exports_an_adapter_and_merged_weights_plain_diffusers_loads(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    lora = ["--model.init_args.backbone.init_args.lora_rank=2", "--model.init_args.backbone.init_args.lora_alpha=4",
            "--model.init_args.actor_lr=1e-2"]
    recipe = ROOT / "recipes" / "toy" / "actor_critic_unet.yaml"
    ckpt = train(recipe.name, *lora)
    assert main(["export", "--ckpt", str(ckpt), "--config", str(recipe), "--out", "exported", "--merge", *lora]) == 0
    module = load_module(str(recipe), str(ckpt), lora)
    trained = predict(module.backbone.denoiser, "unet")

    # plain diffusers: the toy base (exported loadable next to the adapter) + the exported adapter
    pipe = DiffusionPipeline.from_pretrained("exported/base_pipeline", trust_remote_code=True)
    assert type(pipe).__name__ == "ToyUNetPipeline"
    before = predict(pipe.unet, "unet")
    assert not torch.allclose(before, trained, atol=1e-4)  # the LoRA changed the policy
    pipe.load_lora_weights("exported/lora", adapter_name="rl")
    ours = get_peft_model_state_dict(module.backbone.denoiser, adapter_name="policy")
    theirs = get_peft_model_state_dict(pipe.unet, adapter_name="rl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.unet.peft_config["rl"].lora_alpha == 4 and pipe.unet.peft_config["rl"].r == 2
    torch.testing.assert_close(predict(pipe.unet, "unet"), trained, rtol=0, atol=1e-6)
    images = pipe(["a handwritten digit 3", "seven"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 16, 16) and 0 <= images.min() <= images.max() <= 1

    merged = DiffusionPipeline.from_pretrained("exported/pipeline", trust_remote_code=True)
    assert not any("lora" in k for k in merged.unet.state_dict())
    torch.testing.assert_close(predict(merged.unet, "unet"), trained, rtol=1e-5, atol=1e-5)
    assert merged("two", num_inference_steps=2).images[0].size == (16, 16)
    assert module.backbone.denoiser.peft_config  # exporting left the module's adapter in place
    for folder in ("exported/lora", "exported/pipeline"):
        record = check_provenance(Path(folder), ckpt, recipe, "toy-unet", lora)
        assert record["policy"]["lora"] == {"rank": 2, "alpha": 4, "merged": True}
    assert json.loads(Path("exported/base_pipeline/lit_diffac.json").read_text())["trained_by"].endswith(
        "ToyBasePretraining")  # the base's copy keeps the base's record


def sd_overrides(family: str, folder: Path, tmp_path: Path) -> list[str]:
    """A shipped SD recipe, tiny: the tiny random pipeline, brightness as the reward, float32, 2 steps, 2 prompts."""
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    extra = ["--model.init_args.backbone.init_args.resolution=16",
             "--model.init_args.backbone.init_args.max_sequence_length=16"] if family == "sd3" else []
    return [f"--model.init_args.backbone.init_args.pretrained={folder}",
            "--model.init_args.backbone.init_args.lora_rank=2", "--model.init_args.backbone.init_args.lora_alpha=2",
            "--model.init_args.backbone.init_args.weights_dtype=float32", "--model.init_args.actor_lr=1e-2",
            '--model.init_args.rewards=[{"class_path": "lit_diffac.rewards.Brightness"}]',
            "--model.init_args.sampler.init_args.num_steps=2", "--trainer.accelerator=cpu",
            f"--model.init_args.train_prompts={tmp_path / 'prompts.txt'}",
            f"--model.init_args.evaluation.init_args.prompts={tmp_path / 'prompts.txt'}", *extra]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_sd_export_loads_with_the_stock_pipeline_and_its_lora_with_load_lora_weights(family, sd_pipelines, tmp_path,
                                                                                      monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / ("sd15" if family == "sd15" else "sd35") / "pickscore.yaml"
    overrides = sd_overrides(family, sd_pipelines[family], tmp_path)
    ckpt = train(recipe, *overrides)
    assert main(["export", "--ckpt", str(ckpt), "--out", "exported", "--merge"]) == 0  # recipe: the run's config
    module = load_module(str(recipe), str(ckpt), overrides)
    name = "unet" if family == "sd15" else "transformer"
    stock = StableDiffusionPipeline if family == "sd15" else StableDiffusion3Pipeline
    shape = dict(channels=4, size=8, text_dim=32 if family == "sd15" else 64)
    trained = predict(getattr(module.backbone, "denoiser"), name, **shape)
    assert not (Path("exported") / "base_pipeline").exists()  # the SD base folder itself takes the LoRA

    pipe = stock.from_pretrained(sd_pipelines[family])  # the base + the exported adapter, plain diffusers
    assert not torch.allclose(predict(getattr(pipe, name), name, **shape), trained, atol=1e-4)  # the LoRA trained
    pipe.load_lora_weights("exported/lora", adapter_name="rl")
    ours = get_peft_model_state_dict(module.backbone.denoiser, adapter_name="policy")
    theirs = get_peft_model_state_dict(getattr(pipe, name), adapter_name="rl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(predict(getattr(pipe, name), name, **shape), trained, rtol=0, atol=1e-5)
    generate = dict(num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    if family == "sd3":
        generate["max_sequence_length"] = 16
    assert pipe("a red cat", **generate).images[0].size == (16, 16)

    merged = DiffusionPipeline.from_pretrained("exported/pipeline")  # the merged policy: the stock class
    assert type(merged) is stock and not any("lora" in k for k in getattr(merged, name).state_dict())
    torch.testing.assert_close(predict(getattr(merged, name), name, **shape), trained, rtol=1e-5, atol=1e-5)
    assert merged("a blue dog", **generate).images[0].size == (16, 16)
    assert type(stock.from_pretrained("exported/pipeline")) is stock
    record = check_provenance(Path("exported/pipeline"), ckpt, ckpt.parent.parent / "config.yaml",
                              str(sd_pipelines[family]))
    assert record["base"]["folder"] == str(Path(sd_pipelines[family]).resolve())
    assert record["base"]["provenance"] is None  # a plain diffusers base has no lit_diffac.json
    assert json.loads(Path("exported/lora/lit_diffac.json").read_text()) == record


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_an_sd_folder_without_model_index_gets_the_stock_one(family, sd_pipelines, tmp_path):
    """SD folders downloaded without ``model_index.json`` (only the sub-folders lit_diffac reads) export loadable."""
    from lit_diffac.export import write_model_index

    folder = shutil.copytree(sd_pipelines[family], tmp_path / family)
    original = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").unlink()
    write_model_index(folder, "unet" if family == "sd15" else "transformer")
    assert json.loads((folder / "model_index.json").read_text()) == original


def test_export_errors_are_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", "missing.ckpt", "--out", "x"])
    assert err.value.code == 2 and "checkpoint 'missing.ckpt' not found" in capsys.readouterr().err
    Path("lone.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", "lone.ckpt", "--out", "x"])
    assert re.search(r"no recipe: .*config.yaml does not exist; pass --config RECIPE.yaml", capsys.readouterr().err)
