"""FLUX.1 (``FluxPipeline`` folders) on tiny random pipelines of the real architecture (19 double- + 38 single-stream
blocks, 16 wide): the equalities with stock diffusers (packing, schedule, step, prompt embeddings, a whole
generation), taps on both block kinds from one forward, the PPO module on it (one forward per minibatch, on-policy
ratio), bf16 / LoRA / checkpointing, every ``recipes/flux`` recipe through the CLI, and an exported LoRA that plain
``FluxPipeline.load_lora_weights`` loads and generates with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lit_diffac.backbones.flux import (FLUX_LORA_TARGETS, FluxBackbone, FluxPipelineScheduler, flux_mu,
                                       latent_image_ids, pack_latents, unpack_latents)
from lit_diffac.cli import main
from lit_diffac.samplers import FlowSDESampler

# the SD recipe tests' tiny reward weights and stand-in GenEval server (pytest fixtures, imported to share them)
from test_sd_recipes import _tiny_rewards, geneval_server, reward_weights  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FLUX_RECIPES = sorted((ROOT / "recipes" / "flux").glob("*.yaml"))
PROMPTS = ["a photo of a cat", 'a red sign saying "hi" on the road', ""]
T5_TOKENS = 16  # max_sequence_length of the tiny runs (FluxPipeline's default is 512)
RES = 16        # pixels: an 8×8 latent (the tiny VAE downsamples ×2), 4×4 = 16 packed image tokens


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-dev-layout folder (``FluxPipeline.save_pretrained``; with the guidance embedding)."""
    from lit_diffac.tiny_pipelines import save_flux_pipeline

    return save_flux_pipeline(tmp_path_factory.mktemp("flux") / "flux")


def backbone(folder, **kw) -> FluxBackbone:
    options = dict(resolution=RES, max_sequence_length=T5_TOKENS, feature_taps=[18, 37, 56])
    options.update(kw)
    return FluxBackbone(str(folder), **options)


def pipeline(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ latents and ids

def test_packing_and_position_ids_equal_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12)) and packed.shape == (2, 4 * 6, 64)
    assert torch.equal(unpack_latents(packed, 8, 12), x)
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 16, 24, 2))
    assert torch.equal(latent_image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


# ------------------------------------------------------------------------------------------ the schedule

@pytest.mark.parametrize("resolution", [16, 32])
def test_the_schedule_is_the_pipelines_and_the_noise_free_step_is_the_scheduler_step(flux_folder, resolution):
    """The sampler's sigmas are what ``FluxPipeline`` gives its scheduler (linspace(1, 1/K, K), shifted by
    ``calculate_shift`` of the image's token count), and the flow SDE with noise 0 is the stock Euler step."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    flux = backbone(flux_folder, resolution=resolution)
    assert isinstance(flux.scheduler, FluxPipelineScheduler) and flux.image_seq_len == (resolution // 4) ** 2
    stock = pipeline(flux_folder).scheduler
    mu = calculate_shift(flux.image_seq_len, 256, 4096, 0.5, 1.15)
    assert flux.scheduler.default_mu == pytest.approx(mu)
    assert flux_mu(stock.config, 1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)  # 512 px FLUX.1: mu ≈ 0.63
    steps = 5
    timesteps, _ = retrieve_timesteps(stock, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sampler = FlowSDESampler(num_steps=steps, noise_level=0.0)
    sampler.setup(flux.scheduler)
    torch.testing.assert_close(sampler.sigmas, stock.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(sampler.timesteps, timesteps, rtol=0, atol=0)
    stock.set_begin_index(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, resolution // 2, resolution // 2, generator=g)
    for k, t in enumerate(timesteps):
        v = torch.randn(x.shape, generator=g)
        ours = sampler.step(v, k, x)
        theirs = stock.step(pack_latents(v), t, pack_latents(x), return_dict=False)[0]  # the pipeline's packed step
        torch.testing.assert_close(ours.mean, unpack_latents(theirs, *x.shape[-2:]), rtol=0, atol=1e-6)
        assert float(ours.std.max()) == 0.0
        x = ours.prev_sample
    noisy = FlowSDESampler(num_steps=steps, noise_level=0.9)
    noisy.setup(flux.scheduler)
    assert torch.equal(noisy.sigmas, sampler.sigmas)  # the SDE runs on the same sigmas


def test_a_sampler_mu_overrides_the_backbones_and_plain_schedulers_still_need_one(flux_folder):
    from lit_diffac.errors import ConfigError

    flux = backbone(flux_folder)
    default, forced = FlowSDESampler(num_steps=3), FlowSDESampler(num_steps=3, mu=1.15)
    default.setup(flux.scheduler)
    forced.setup(flux.scheduler)
    assert not torch.equal(default.sigmas, forced.sigmas)
    with pytest.raises(ConfigError, match="pass FlowSDESampler\\(mu=...\\)"):
        FlowSDESampler(num_steps=3).setup(pipeline(flux_folder).scheduler)  # the stock class has no default mu


# ------------------------------------------------------------------------------------------ prompts

def test_prompt_embeds_equal_the_pipelines_encode_prompt(flux_folder):
    flux = backbone(flux_folder)
    hidden, pooled, text_ids = pipeline(flux_folder).encode_prompt(PROMPTS, None, max_sequence_length=T5_TOKENS)
    embeds = flux.encode_prompts(PROMPTS)
    assert embeds.hidden.shape == hidden.shape == (3, T5_TOKENS, 32)  # T5 states
    assert embeds.pooled.shape == pooled.shape == (3, 32)             # CLIP's pooled output
    # the backbone encodes each prompt alone: equal up to batch-size rounding
    torch.testing.assert_close(embeds.hidden, hidden.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.pooled, pooled.detach(), rtol=0, atol=1e-5)
    assert text_ids.shape == (T5_TOKENS, 3) and not text_ids.any()  # the text ids the backbone passes: zeros
    assert flux.pooled_dim == 32


# ------------------------------------------------------------------------------------------ one generation

def test_a_noise_free_chain_is_the_pipelines_generation(flux_folder):
    """The whole chain — prompts, packing, ids, guidance embedding 3.5, timestep / 1000, schedule, step, VAE decode
    with FLUX's scaling and shift — equals ``FluxPipeline.__call__`` with the same initial noise."""
    flux = backbone(flux_folder)
    pipe = pipeline(flux_folder)
    steps, g = 4, torch.Generator().manual_seed(3)
    noise = torch.randn(2, *flux.latent_shape, generator=g)
    call = dict(height=RES, width=RES, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=T5_TOKENS,
                latents=pack_latents(noise))
    out, final = pipe(PROMPTS[:2], output_type="pt", **call), pipe(PROMPTS[:2], output_type="latent", **call).images
    sampler = FlowSDESampler(num_steps=steps, noise_level=0.0)
    sampler.setup(flux.scheduler)
    embeds, x = flux.encode_prompts(PROMPTS[:2]), noise
    with torch.no_grad():
        for k in range(steps):
            x = sampler.step(flux(x, sampler.timestep_for(torch.full((2,), k)), embeds).prediction, k, x).prev_sample
    torch.testing.assert_close(pack_latents(x), final, rtol=0, atol=1e-6)  # measured: bit-identical on this CPU
    images = flux.decode(x)
    assert images.shape == out.images.shape == (2, 3, RES, RES)
    torch.testing.assert_close(images, out.images, rtol=0, atol=1e-4)


def test_the_guidance_embedding_is_a_backbone_option(flux_folder, tmp_path):
    from lit_diffac.tiny_pipelines import save_flux_pipeline

    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 300.0])
    dev, strong = backbone(flux_folder), backbone(flux_folder, guidance_scale=7.0)
    assert dev.uses_guidance_embedding and dev.guidance_scale == 3.5 and dev.cfg_scale == 1.0  # CFG off by default
    with torch.no_grad():
        assert (dev(x, t, dev.encode_prompts(PROMPTS[:2])).prediction
                - strong(x, t, strong.encode_prompts(PROMPTS[:2])).prediction).abs().max() > 1e-4
    schnell = backbone(save_flux_pipeline(tmp_path / "schnell", guidance_embeds=False))  # FLUX.1-schnell layout
    assert not schnell.uses_guidance_embedding
    with torch.no_grad():
        assert schnell(x, t, schnell.encode_prompts(PROMPTS[:2])).prediction.shape == x.shape


# ------------------------------------------------------------------------------------------ taps

def test_taps_read_image_tokens_of_double_and_single_blocks_from_the_same_forward(flux_folder):
    flux = backbone(flux_folder, feature_taps=[0, 18, 19, -1, "single_transformer_blocks.20"])
    assert flux.taps.names == ["transformer_blocks.0", "transformer_blocks.18", "single_transformer_blocks.0",
                               "single_transformer_blocks.37", "single_transformer_blocks.20"]
    assert flux.feature_dims == [16] * 5
    seen, calls = {}, []
    for name in ("transformer_blocks.18", "single_transformer_blocks.37"):
        dict(flux.denoiser.named_modules())[name].register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o))
    flux.denoiser.register_forward_hook(lambda *a: calls.append(1))
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        out = flux(x, t, flux.encode_prompts(PROMPTS[:2]))
    assert len(calls) == 1  # prediction and every feature from ONE transformer call
    assert [f.shape for f in out.features] == [(2, flux.image_seq_len, 16)] * 5  # image tokens only
    text, image = seen["single_transformer_blocks.37"]
    assert text.shape[1] == T5_TOKENS and torch.equal(out.features[3], image.float())
    assert torch.equal(out.features[1], seen["transformer_blocks.18"][1].float())
    with pytest.raises(ValueError, match="out of range: this transformer has 57 blocks"):
        backbone(flux_folder, feature_taps=[57])
    with pytest.raises(ValueError, match="out of range"):
        backbone(flux_folder, feature_taps=["single_transformer_blocks.38"])


def test_resolution_must_fit_the_2x2_packing(flux_folder):
    assert backbone(flux_folder, resolution=32).latent_shape == (16, 16, 16)
    assert FluxBackbone(str(flux_folder), max_sequence_length=T5_TOKENS).latent_shape == (16, 128, 128)  # 128 cells
    with pytest.raises(ValueError, match="multiple of 4"):
        backbone(flux_folder, resolution=18)


def test_fsdp_wraps_one_unit_per_double_and_single_block(flux_folder):
    from lit_diffac.distributed import diffusion_block_wrap_policy

    flux = backbone(flux_folder)
    assert sum(diffusion_block_wrap_policy(m, False, 0) for m in flux.denoiser.modules()) == 19 + 38


# ------------------------------------------------------------------------------------------ LoRA, bf16, checkpointing

def test_lora_adapts_the_attention_and_mlp_projections_of_both_block_kinds(flux_folder):
    flux = backbone(flux_folder, lora_rank=4)
    adapted = {n.split(".lora_A")[0] for n, _ in flux.denoiser.named_parameters() if ".lora_A." in n}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
            "single_transformer_blocks.37.attn.to_v"} <= adapted
    assert len(adapted) == 19 * 12 + 38 * 3 and all(n.split(".")[-1] in {t.split(".")[-1] for t in FLUX_LORA_TARGETS}
                                                    for n in adapted)


def test_bf16_weights_keep_lora_outputs_and_log_probs_float32(flux_folder):
    full = backbone(flux_folder, lora_rank=4)
    half = backbone(flux_folder, lora_rank=4, weights_dtype="bfloat16")
    assert half.text_encoder.dtype == half.text_encoder_2.dtype == half.vae.dtype == torch.bfloat16
    assert half.autocast_dtype == torch.bfloat16
    base = [p for n, p in half.denoiser.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert all(p.dtype == torch.float32 for p in half.policy_parameters()) and half.policy_parameters()
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 300.0])
    ref = full(x, t, full.encode_prompts(PROMPTS[:2])).prediction
    out = half(x, t, half.encode_prompts(PROMPTS[:2]))
    assert out.prediction.dtype == torch.float32 and all(f.dtype == torch.float32 for f in out.features)
    err = (out.prediction - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1, err  # bf16 rounding, not a different model
    sampler = FlowSDESampler(num_steps=3)
    sampler.setup(half.scheduler)
    step = sampler.step(out.prediction, torch.tensor([1, 2]), x, generator=torch.Generator().manual_seed(0))
    assert step.log_prob.dtype == torch.float32 and torch.isfinite(step.log_prob).all()
    step.log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in half.policy_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(flux_folder):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        flux = backbone(flux_folder, lora_rank=2, gradient_checkpointing=checkpointing).train()
        assert flux.denoiser.is_gradient_checkpointing == checkpointing
        x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 300.0])
        out = flux(x, t, flux.encode_prompts(PROMPTS[:2]))
        (out.prediction.pow(2).mean() + sum(f.mean() for f in out.features)).backward()
        assert flux.taps._captured == {}  # recomputation in backward recorded nothing
        grads.append(torch.cat([p.grad.flatten() for p in flux.policy_parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------ the PPO module on FLUX

def test_one_forward_per_minibatch_and_the_on_policy_ratio(flux_folder):
    from test_actor_critic import attach_trainer, make_module, rollout_for, update

    flux = backbone(flux_folder, lora_rank=2)
    module = make_module(flux, sampler=FlowSDESampler(num_steps=3, noise_level=0.9), batch_size=2, minibatch_size=4,
                         num_inner_epochs=2, train_prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    attach_trainer(module)
    calls = []
    # the backbone calls the transformer with return_dict=False: its output is a tuple
    handle = flux.denoiser.register_forward_hook(lambda *a: calls.append(a[2][0].shape[0]))
    rollout = rollout_for(module)
    assert len(calls) == 3 and rollout.latents.shape == (2, 4, 16, 8, 8)  # one transformer call per rollout step
    calls.clear()
    metrics = update(module, rollout)
    handle.remove()
    pairs = 2 * 3
    assert len(calls) == 2 * -(-pairs // 4) and sum(calls) == 2 * pairs  # log π and V from ONE pass per minibatch
    assert metrics["train/onpolicy_max_abs_ratio_dev"] < 1e-5            # fp32: exactly the rollout's log-probs


# ------------------------------------------------------------------------------------------ recipes through the CLI

def _cli_args(recipe: Path, folder: Path, tmp_path: Path, rewards: list[dict]) -> list[str]:
    config = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    return ["run", str(recipe), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.backbone.init_args.pretrained={folder}",
            f"--model.init_args.backbone.init_args.resolution={RES}",
            f"--model.init_args.backbone.init_args.max_sequence_length={T5_TOKENS}",
            "--model.init_args.sampler.init_args.num_steps=2", "--model.init_args.batch_size=2",
            "--model.init_args.minibatch_size=4", "--model.init_args.evaluation.init_args.samples_per_prompt=1",
            f"--model.init_args.train_prompts={ROOT / config['train_prompts']}",
            f"--model.init_args.evaluation.init_args.prompts={ROOT / config['evaluation']['init_args']['prompts']}",
            f"--model.init_args.rewards={json.dumps(rewards)}"]


#: Per-recipe extra overrides: float32 with CFG + a negative prompt (the on-policy check), the critic adapter.
EXTRA = {
    "pickscore": ["--model.init_args.backbone.init_args.weights_dtype=float32",
                  "--model.init_args.backbone.init_args.cfg_scale=2.0",
                  "--model.init_args.backbone.init_args.negative_prompt=blurry"],
    "geneval": ["--model.init_args.backbone.init_args.weights_dtype=float32"],
    "ocr": ["--model.init_args.backbone.init_args.critic_lora_rank=2", "--model.init_args.value_gradient=critic_lora"],
}


@pytest.mark.parametrize("recipe", FLUX_RECIPES, ids=lambda p: p.stem)
def test_flux_recipe_runs(recipe, tmp_path, monkeypatch, flux_folder, reward_weights, geneval_server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    extra = list(EXTRA.get(recipe.stem, []))
    if recipe.stem == "ocr":  # RapidOCR takes ~1.5 s an image on one CPU thread: evaluate on one held-out prompt
        (tmp_path / "one_prompt.txt").write_text('a wooden sign that says "Welcome Home"\n')
        extra.append(f"--model.init_args.evaluation.init_args.prompts={tmp_path / 'one_prompt.txt'}")
    rewards = _tiny_rewards(recipe, reward_weights, geneval_server)
    assert main(_cli_args(recipe, flux_folder, tmp_path, rewards) + extra) == 0
    (summary,) = [json.loads(p.read_text()) for p in Path(tmp_path).rglob("summary.json")]
    assert summary["iterations"] == 1 and summary["samples_seen"] == 2
    assert summary["base"] and set(summary["base"]) == set(summary["final"])
    train = summary["final_train"]
    assert all(np.isfinite(v) for k, v in train.items() if k.startswith("reward/"))
    if "weights_dtype=float32" in " ".join(extra):
        assert train["train/onpolicy_max_abs_ratio_dev"] < 1e-5


def test_every_flux_recipe_documents_its_sources_memory_and_time():
    assert {p.stem for p in FLUX_RECIPES} >= {"pickscore", "hpsv21", "ocr", "geneval", "multi_reward"}
    for recipe in FLUX_RECIPES:
        header = recipe.read_text().split("\nseed_everything")[0]
        for needle in ("Expected GPU memory (ESTIMATE", "Expected time per iteration (ESTIMATE", "Smaller GPUs",
                       "flow_grpo", "config/", "Paper values"):
            assert needle in header, (recipe.name, needle)
        backbone_args = yaml.safe_load(recipe.read_text())["model"]["init_args"]["backbone"]
        assert backbone_args["class_path"] == "lit_diffac.backbones.flux.FluxBackbone"
        args = backbone_args["init_args"]
        assert args["lora_rank"] > 0 and args["gradient_checkpointing"] is True and args["weights_dtype"] == "bfloat16"
        assert args["cfg_scale"] == 1.0 and args["guidance_scale"] == 3.5


# ------------------------------------------------------------------------------------------ export

def test_an_exported_flux_lora_loads_in_plain_diffusers_and_generates(flux_folder, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "flux" / "pickscore.yaml"
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    overrides = [f"--model.init_args.backbone.init_args.pretrained={flux_folder}",
                 f"--model.init_args.backbone.init_args.resolution={RES}",
                 f"--model.init_args.backbone.init_args.max_sequence_length={T5_TOKENS}",
                 "--model.init_args.backbone.init_args.lora_rank=2",
                 "--model.init_args.backbone.init_args.lora_alpha=2",
                 "--model.init_args.backbone.init_args.weights_dtype=float32", "--model.init_args.actor_lr=1e-2",
                 '--model.init_args.rewards=[{"class_path": "lit_diffac.rewards.Brightness"}]',
                 "--model.init_args.sampler.init_args.num_steps=2", "--trainer.accelerator=cpu",
                 f"--model.init_args.train_prompts={tmp_path / 'prompts.txt'}",
                 f"--model.init_args.evaluation.init_args.prompts={tmp_path / 'prompts.txt'}"]
    assert main(["run", str(recipe), "--trainer.max_epochs=1", "--model.init_args.batch_size=2",
                 "--model.init_args.minibatch_size=4", "--model.init_args.evaluation.init_args.samples_per_prompt=1",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *overrides]) == 0
    (ckpt,) = Path("runs").rglob("last.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", "exported", "--merge"]) == 0
    module = load_module(str(recipe), str(ckpt), overrides)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t, embeds = torch.tensor([700.0]), module.backbone.encode_prompts(["a red cat"])
    with torch.no_grad():
        trained = module.backbone(x, t, embeds).prediction

    def predict(transformer):
        saved, module.backbone.denoiser = module.backbone.denoiser, transformer
        try:
            with torch.no_grad():
                return module.backbone._denoise(x, t, embeds)
        finally:
            module.backbone.denoiser = saved

    pipe = FluxPipeline.from_pretrained(flux_folder)  # the base + the exported adapter, plain diffusers
    assert not torch.allclose(predict(pipe.transformer), trained, atol=1e-5)  # the LoRA trained
    pipe.load_lora_weights("exported/lora", adapter_name="rl")
    ours = get_peft_model_state_dict(module.backbone.denoiser, adapter_name="policy")
    theirs = get_peft_model_state_dict(pipe.transformer, adapter_name="rl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(predict(pipe.transformer), trained, rtol=0, atol=1e-5)
    generate = dict(height=RES, width=RES, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                    generator=torch.Generator().manual_seed(0))
    assert pipe("a red cat", **generate).images[0].size == (RES, RES)

    merged = DiffusionPipeline.from_pretrained("exported/pipeline")  # the merged policy: the stock class
    assert type(merged) is FluxPipeline and not any("lora" in k for k in merged.transformer.state_dict())
    torch.testing.assert_close(predict(merged.transformer), trained, rtol=1e-5, atol=1e-5)
    assert merged("a blue dog", **generate).images[0].size == (RES, RES)
    assert json.loads((flux_folder / "model_index.json").read_text()) == \
        json.loads(Path("exported/pipeline/model_index.json").read_text())


def test_a_flux_folder_without_model_index_gets_the_stock_one(flux_folder, tmp_path):
    import shutil

    from lit_diffac.export import write_model_index

    folder = shutil.copytree(flux_folder, tmp_path / "flux")
    original = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").unlink()
    write_model_index(folder, "transformer")
    assert json.loads((folder / "model_index.json").read_text()) == original
