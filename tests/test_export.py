"""``lit-diffac export``: a tiny trained run's checkpoint → files that plain diffusers code loads, with weights
equal to the trained module's."""

from __future__ import annotations

import json
import re
import shlex
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


def train(recipe: str, *overrides: str) -> Path:
    """One tiny iteration of a toy recipe through the CLI (cwd = tmp); returns its last.ckpt."""
    assert main(["run", str(ROOT / "recipes" / "toy" / recipe), *TINY, *overrides]) == 0
    (ckpt,) = Path("runs").rglob("last.ckpt")
    return ckpt


def denoiser_inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x, text, t = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 8, 64, generator=g), torch.tensor([900, 300])
    if family == "unet":
        return {"sample": x, "timestep": t, "encoder_hidden_states": text}
    return {"hidden_states": x, "encoder_hidden_states": text, "timestep": t,
            "pooled_projections": torch.randn(2, 64, generator=g)}


@torch.no_grad()
def predict(denoiser, family: str) -> torch.Tensor:
    return denoiser.eval()(**denoiser_inputs(family)).sample


def test_full_fine_tune_exports_a_pipeline_plain_diffusers_loads(tmp_path, monkeypatch, capsys):
    from diffusers import SD3Transformer2DModel

    from lit_diffac.backbones.base import resolve_pretrained
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
    exec(readme_block("export-load"), namespace)  # the README's loading example, plain diffusers
    exported = namespace["transformer"]
    assert isinstance(exported, SD3Transformer2DModel) and exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(exported.state_dict()[k], trained[k]) for k in trained)
    base = SD3Transformer2DModel.from_pretrained(resolve_pretrained("toy-dit"), subfolder="transformer")
    assert any(not torch.equal(base.state_dict()[k], trained[k]) for k in trained)  # one iteration did train
    base_dir = Path(resolve_pretrained("toy-dit"))
    assert sorted(p.name for p in Path("exported/pipeline").iterdir()) == sorted(p.name for p in base_dir.iterdir())
    head = namespace["critic"]
    assert head.keys() == module.value_head.state_dict().keys()
    assert all(torch.equal(head[k], v) for k, v in module.value_head.state_dict().items())
    manifest = json.loads(Path("exported/export.json").read_text())
    assert manifest["lora"] is False and manifest["denoiser"] == "transformer"
    assert manifest["checkpoint"] == str(ckpt.resolve())


def test_lora_policy_exports_an_adapter_and_merged_weights_plain_diffusers_loads(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    from lit_diffac.backbones.base import resolve_pretrained
    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    lora = ["--model.init_args.backbone.init_args.lora_rank=2", "--model.init_args.backbone.init_args.lora_alpha=4",
            "--model.init_args.actor_lr=1e-2"]
    recipe = ROOT / "recipes" / "toy" / "actor_critic_unet.yaml"
    ckpt = train(recipe.name, *lora)
    assert main(["export", "--ckpt", str(ckpt), "--config", str(recipe), "--out", "exported", "--merge", *lora]) == 0
    module = load_module(str(recipe), str(ckpt), lora)
    trained = predict(module.backbone.denoiser, "unet")

    base = resolve_pretrained("toy-unet")
    pipe = StableDiffusionPipeline(  # plain diffusers: the base pipeline + the exported adapter
        vae=None, unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = predict(pipe.unet, "unet")
    assert not torch.allclose(before, trained, atol=1e-4)  # the LoRA changed the policy
    pipe.load_lora_weights("exported/lora", adapter_name="rl")
    ours = get_peft_model_state_dict(module.backbone.denoiser, adapter_name="policy")
    theirs = get_peft_model_state_dict(pipe.unet, adapter_name="rl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.unet.peft_config["rl"].lora_alpha == 4 and pipe.unet.peft_config["rl"].r == 2
    torch.testing.assert_close(predict(pipe.unet, "unet"), trained, rtol=0, atol=1e-6)

    merged = UNet2DConditionModel.from_pretrained("exported/pipeline", subfolder="unet")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(predict(merged, "unet"), trained, rtol=1e-5, atol=1e-5)
    assert module.backbone.denoiser.peft_config  # exporting left the module's adapter in place


def test_export_errors_are_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", "missing.ckpt", "--out", "x"])
    assert err.value.code == 2 and "checkpoint 'missing.ckpt' not found" in capsys.readouterr().err
    Path("lone.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", "lone.ckpt", "--out", "x"])
    assert re.search(r"no recipe: .*config.yaml does not exist; pass --config RECIPE.yaml", capsys.readouterr().err)
