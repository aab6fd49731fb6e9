"""SDXL (``StableDiffusionXLPipeline`` folders) on tiny random pipelines of SDXL's architecture, written by the
pipeline's own ``save_pretrained`` and loaded back through the code path real SDXL weights take.

What is checked against diffusers itself: the prompt embeddings and the unconditional branch equal
``StableDiffusionXLPipeline.encode_prompt`` (with and without ``force_zeros_for_empty_prompt``, with and without a
negative prompt); the prediction is the pipeline's UNet call with ``added_cond_kwargs`` (pooled embedding and the
training resolution's ``time_ids``); SDXL's Euler scheduler config read as DDIM gives a sane schedule whose η = 0
step is ``DDIMScheduler.step``; and a whole rollout equals the stock pipeline's latents with a trailing-spaced DDIM
scheduler (η = 0 and η = 1 with the same generator, with and without CFG).  Then the RL contract: one denoiser
forward per PPO minibatch, the on-policy ratio |ratio − 1| < 1e-5 in fp32 (with and without CFG), bf16 and
gradient checkpointing, export to folders plain diffusers loads, and every ``recipes/sdxl`` recipe through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lit_diffac.backbones.sdxl import SDXLBackbone, load_sdxl_components
from lit_diffac.cli import main
from lit_diffac.tiny_pipelines import ADDITION_TIME_EMBED_DIM, TEXT_WIDTH, save_sdxl_pipeline
from test_sd_recipes import _tiny_rewards, geneval_server, reward_weights  # noqa: F401 - module-scoped fixtures

ROOT = Path(__file__).resolve().parent.parent
SDXL_RECIPES = sorted((ROOT / "recipes" / "sdxl").glob("*.yaml"))
PROMPTS = ["a photo of a cat", 'a red sign saying "hi" on the road', ""]
SIZE = 16  # pixels of the tiny pipelines' images: latent side 8, two-level VAE


@pytest.fixture(scope="session")
def sdxl_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random SDXL pipeline folders: as SDXL base (``force_zeros_for_empty_prompt: true``) and without."""
    root = tmp_path_factory.mktemp("sdxl_pipelines")
    return {"zeros": save_sdxl_pipeline(root / "sdxl"),
            "encoded": save_sdxl_pipeline(root / "sdxl_encoded_negative", force_zeros_for_empty_prompt=False)}


@pytest.fixture(scope="session")
def sdxl_folder(sdxl_folders) -> Path:
    return sdxl_folders["zeros"]


def _pipeline(folder, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False, **kwargs)


def _inputs(backbone, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *backbone.latent_shape, generator=g)
    return latents, torch.tensor([900.0, 500.0, 20.0])[:n], backbone.encode_prompts(PROMPTS[:n])


# ------------------------------------------------------------------------------------------ text encoders

def test_prompt_embeds_equal_the_pipelines_encode_prompt(sdxl_folder):
    backbone = SDXLBackbone(str(sdxl_folder))
    hidden, _, pooled, _ = _pipeline(sdxl_folder).encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    embeds = backbone.encode_prompts(PROMPTS)
    # both encoders' penultimate states side by side (32 + 32); pooled: text_encoder_2's projection
    assert embeds.hidden.shape == hidden.shape == (3, 77, 2 * TEXT_WIDTH)
    assert embeds.pooled.shape == pooled.shape == (3, TEXT_WIDTH) and backbone.pooled_dim == TEXT_WIDTH
    # the backbone encodes one prompt at a time (exact resume): equal up to batch-order rounding
    torch.testing.assert_close(embeds.hidden, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.pooled, pooled, rtol=0, atol=1e-5)
    # and not by accident: the first encoder's last layer or its own pooled output would differ
    assert (embeds.hidden[..., :TEXT_WIDTH] - backbone.text_encoder(
        backbone.tokenizer(PROMPTS[:1], padding="max_length", return_tensors="pt").input_ids).last_hidden_state
    ).abs().max() > 1e-3


@pytest.mark.parametrize("folder, negative_prompt, override, zeros", [
    ("zeros", "", None, True),            # SDXL base as shipped: the pipeline without a negative prompt → zeros
    ("zeros", "blurry", None, False),     # a negative prompt is encoded as the pipeline encodes it
    ("encoded", "", None, False),         # force_zeros_for_empty_prompt: false → the encoded empty prompt
    ("zeros", "", False, False),          # the constructor option overrides the folder's flag
], ids=["sdxl-base-zeros", "negative-prompt", "flag-false", "option-false"])
def test_the_unconditional_branch_is_the_pipelines(sdxl_folders, folder, negative_prompt, override, zeros):
    backbone = SDXLBackbone(str(sdxl_folders[folder]), negative_prompt=negative_prompt,
                            force_zeros_for_empty_prompt=override)
    pipe = _pipeline(sdxl_folders[folder])
    if override is not None:
        pipe.register_to_config(force_zeros_for_empty_prompt=override)
    assert backbone.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt == (folder == "zeros"
                                                                                           and override is None)
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:2], do_classifier_free_guidance=True,
                                                         negative_prompt=negative_prompt or None)
    uncond = backbone.encode_negative(2)
    assert uncond.hidden.shape == negative.shape and uncond.pooled.shape == negative_pooled.shape
    torch.testing.assert_close(uncond.hidden, negative, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond.pooled, negative_pooled, rtol=0, atol=1e-5)
    assert bool(uncond.hidden.abs().max() == 0) == zeros and bool(uncond.pooled.abs().max() == 0) == zeros


# ------------------------------------------------------------------------------------------ the denoiser call

def test_prediction_is_the_pipelines_unet_call_with_added_conditioning(sdxl_folder):
    backbone = SDXLBackbone(str(sdxl_folder), feature_taps=["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"],
                            resolution=SIZE)
    pipe = _pipeline(sdxl_folder)
    latents, t, embeds = _inputs(backbone)
    out = backbone(latents, t, embeds)
    assert backbone.add_time_ids == (SIZE, SIZE, 0, 0, SIZE, SIZE)
    time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=embeds.hidden.dtype,
                                      text_encoder_projection_dim=TEXT_WIDTH)  # the pipeline's own (and its check)
    expected = pipe.unet(latents, t, encoder_hidden_states=embeds.hidden,
                         added_cond_kwargs={"text_embeds": embeds.pooled, "time_ids": time_ids.repeat(3, 1)}).sample
    torch.testing.assert_close(out.prediction, expected, rtol=0, atol=0)
    # the added conditioning matters: other time ids give another prediction
    other = pipe.unet(latents, t, encoder_hidden_states=embeds.hidden,
                      added_cond_kwargs={"text_embeds": embeds.pooled, "time_ids": 2 * time_ids.repeat(3, 1)}).sample
    assert (other - expected).abs().max() > 1e-4
    # taps on down / mid / up blocks: 3-level UNet (16, 32, 32 channels), 8 → 4 → 2 latent cells
    assert [tuple(f.shape[1:]) for f in out.features] == [(32, 2, 2), (32, 2, 2), (32, 4, 4), (32, 8, 8)]
    assert backbone.feature_dims == [32, 32, 32, 32]
    # decoding: SDXL's latent scaling 0.13025
    assert backbone.vae_scaling_factor == 0.13025
    images = backbone.decode(latents)
    reference = pipe.image_processor.postprocess(pipe.vae.decode(latents / 0.13025).sample, output_type="pt")
    assert images.shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-6)


def test_the_resolution_is_the_size_sdxl_is_conditioned_on(sdxl_folder):
    backbone = SDXLBackbone(str(sdxl_folder), resolution=32)
    assert backbone.latent_shape == (4, 16, 16) and backbone.add_time_ids == (32, 32, 0, 0, 32, 32)
    assert SDXLBackbone(str(sdxl_folder)).add_time_ids == (SIZE, SIZE, 0, 0, SIZE, SIZE)  # native: sample_size 8


def test_one_forward_per_call_and_the_taps_do_not_change_it(sdxl_folder):
    backbone = SDXLBackbone(str(sdxl_folder), feature_taps=["down_blocks.1", "mid_block", "up_blocks.2"])
    calls = []
    backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    backbone(*_inputs(backbone))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ scheduler, sampler

def test_sdxls_scheduler_config_reads_as_a_sane_ddim_schedule(sdxl_folder):
    """SDXL ships Euler (``timestep_spacing: leading``, ``steps_offset: 1``); read as DDIM with the sampler's
    trailing spacing it gives the SD1.5 noise schedule, every step with non-zero variance, and an η = 0 step that is
    diffusers' ``DDIMScheduler.step`` on that config."""
    from diffusers import DDIMScheduler

    from lit_diffac.samplers import DDIMSampler

    raw = json.loads((sdxl_folder / "scheduler" / "scheduler_config.json").read_text())
    assert raw["_class_name"] == "EulerDiscreteScheduler" and raw["timestep_spacing"] == "leading"
    backbone = SDXLBackbone(str(sdxl_folder))
    scheduler = backbone.scheduler
    assert type(scheduler) is DDIMScheduler and scheduler.config.steps_offset == 1
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.beta_schedule == "scaled_linear"
    # the folder's own spacing would end on t = 1 (901, 801, ..., 1): the sampler uses trailing spacing instead
    leading = DDIMScheduler.from_config(scheduler.config)
    leading.set_timesteps(10)
    assert leading.timesteps.tolist() == list(range(901, 0, -100))
    reference = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    reference.set_timesteps(10)
    sampler = DDIMSampler(num_steps=10, eta=0.0)
    sampler.setup(scheduler)
    assert sampler.timesteps.tolist() == reference.timesteps.tolist() == list(range(999, 0, -100))
    stochastic = DDIMSampler(num_steps=10, eta=1.0)
    stochastic.setup(scheduler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for k, t in enumerate(reference.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        ref = reference.step(eps, t, x, eta=0.0)
        out = sampler.step(eps, k, x)
        torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-6)
        assert bool((stochastic.step(eps, k, x).std > 0).all())  # the last step too (t = 99, not 0)
        x = ref.prev_sample
    # the schedule is SD1.5's (same β range): ᾱ falls from ~1 to ~0.005
    assert 0.99 < float(scheduler.alphas_cumprod[0]) < 1.0 and float(scheduler.alphas_cumprod[-1]) < 0.01


def test_a_scheduler_config_without_clip_sample_does_not_clip(sdxl_folder, tmp_path):
    folder = shutil.copytree(sdxl_folder, tmp_path / "sdxl")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    del config["clip_sample"]  # e.g. a folder saved from a stock EulerDiscreteScheduler()
    path.write_text(json.dumps(config))
    assert load_sdxl_components(str(folder)).scheduler.config.clip_sample is False


def _module(backbone, sampler=None, **kwargs):
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards import Brightness
    from lit_diffac.samplers import DDIMSampler

    options = dict(batch_size=3, minibatch_size=4, clip_range=1e-3, train_prompts=PROMPTS,
                   evaluation=HeldOutEvaluation(prompts=PROMPTS[:1], samples_per_prompt=1))
    return LatentActorCritic(backbone=backbone, rewards=[Brightness()], sampler=sampler or DDIMSampler(num_steps=3),
                             **{**options, **kwargs})


@pytest.mark.parametrize("eta, cfg_scale", [(0.0, 1.0), (1.0, 1.0), (1.0, 4.0)])
def test_a_rollout_is_the_stock_pipeline_with_a_ddim_scheduler(sdxl_folder, eta, cfg_scale):
    """The whole chain: the backbone + DDIM log-prob sampler's rollout = ``StableDiffusionXLPipeline`` with
    ``DDIMScheduler(timestep_spacing="trailing")`` from the same initial latents and generator (CFG: zeros for the
    unconditional branch, as the pipeline without a negative prompt)."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from lit_diffac.samplers import DDIMSampler

    backbone = SDXLBackbone(str(sdxl_folder), feature_taps=["mid_block"], cfg_scale=cfg_scale)
    module = _module(backbone, DDIMSampler(num_steps=3, eta=eta))
    rollout = module.roll_out(PROMPTS, torch.Generator().manual_seed(7))

    pipe = _pipeline(sdxl_folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    generator = torch.Generator().manual_seed(7)
    initial = randn_tensor((3, *backbone.latent_shape), generator=generator)
    # the prompt embeddings equal the pipeline's (tested above, up to batch-order rounding that CFG amplifies): give
    # the pipeline the backbone's so that this compares the chains; the pipeline builds its own zero negatives
    embeds = backbone.encode_prompts(PROMPTS)
    final = pipe(prompt_embeds=embeds.hidden, pooled_prompt_embeds=embeds.pooled, num_inference_steps=3,
                 guidance_scale=cfg_scale, eta=eta, latents=initial.clone(), generator=generator, height=SIZE,
                 width=SIZE, output_type="latent").images
    torch.testing.assert_close(rollout.latents[:, 0], initial, rtol=0, atol=0)
    torch.testing.assert_close(rollout.latents[:, -1], final, rtol=1e-5, atol=1e-6)
    assert bool((rollout.log_probs == 0).all()) == (eta == 0.0)


# ------------------------------------------------------------------------------------------ the RL contract

def _attach_trainer(module):
    import lightning as L

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    module.trainer = trainer
    trainer.strategy.setup_optimizers(trainer)


def _scored_rollout(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = module.sample_prompts(generator)
    rollout = module.roll_out(prompts, generator)
    rollout.rewards = module.score(rollout.images, prompts)
    return rollout


@pytest.mark.parametrize("cfg_scale, negative_prompt", [(1.0, ""), (3.0, ""), (3.0, "blurry")],
                         ids=["no-cfg", "cfg-zeros", "cfg-negative-prompt"])
def test_one_forward_per_minibatch_and_on_policy_ratio(sdxl_folder, cfg_scale, negative_prompt):
    backbone = SDXLBackbone(str(sdxl_folder), feature_taps=["down_blocks.2", "mid_block"], lora_rank=2,
                            cfg_scale=cfg_scale, negative_prompt=negative_prompt)
    module = _module(backbone, num_inner_epochs=2)
    _attach_trainer(module)
    rollout = _scored_rollout(module)
    rows = []
    handle = backbone.denoiser.register_forward_hook(lambda *a: rows.append(a[2].sample.shape[0]))
    metrics = module.update(rollout, *module.actor_critic_optimizers())
    handle.remove()
    pairs, guided = 3 * module.sampler.num_steps, 2 if cfg_scale != 1.0 else 1
    assert len(rows) == 2 * -(-pairs // 4)  # epochs × minibatches: log-prob and value from ONE pass each
    assert sum(rows) == 2 * pairs * guided  # CFG: unconditional and conditional rows in that same pass
    assert metrics["train/onpolicy_max_abs_ratio_dev"] < 1e-5  # fp32: the update recomputes the rollout's log-probs


def test_bf16_weights_keep_lora_and_outputs_float32(sdxl_folder):
    full = SDXLBackbone(str(sdxl_folder), lora_rank=4)
    half = SDXLBackbone(str(sdxl_folder), lora_rank=4, weights_dtype="bfloat16")
    assert half.text_encoder.dtype == half.text_encoder_2.dtype == half.vae.dtype == torch.bfloat16
    assert half.autocast_dtype == torch.bfloat16
    lora = [p for n, p in half.denoiser.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for n, p in half.denoiser.named_parameters() if "lora_" not in n)
    embeds = half.encode_prompts(PROMPTS)
    assert embeds.hidden.dtype == torch.bfloat16 and embeds.pooled.dtype == torch.float32
    latents, t, _ = _inputs(full)
    ref = full(latents, t, full.encode_prompts(PROMPTS)).prediction
    out = half(latents, t, embeds)
    assert out.prediction.dtype == torch.float32 and all(f.dtype == torch.float32 for f in out.features)
    err = (out.prediction - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1, err  # bf16 rounding, not a different model
    half.cfg_scale = 2.0
    assert half.encode_negative(2).hidden.dtype == torch.bfloat16
    out.prediction.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in half.policy_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(sdxl_folder):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = SDXLBackbone(str(sdxl_folder), feature_taps=["down_blocks.2", "up_blocks.1"], lora_rank=2,
                                gradient_checkpointing=checkpointing).train()
        assert backbone.denoiser.is_gradient_checkpointing == checkpointing
        out = backbone(*_inputs(backbone))
        (out.prediction.pow(2).mean() + sum(f.mean() for f in out.features)).backward()
        assert backbone.taps._captured == {}
        grads.append(torch.cat([p.grad.flatten() for p in backbone.policy_parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------ loading

def test_components_load_from_the_folder_or_from_memory(sdxl_folder):
    components = load_sdxl_components(str(sdxl_folder))
    assert set(components.extra_text) == {"text_encoder_2", "tokenizer_2"} and components.vae is not None
    assert type(components.extra_text["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    backbone = SDXLBackbone(components)  # in-memory: nothing loaded, diffusers' default flag
    assert backbone.pretrained is None and backbone.force_zeros_for_empty_prompt is True
    assert SDXLBackbone(str(sdxl_folder)).pretrained == str(sdxl_folder)
    assert backbone.denoiser.config.addition_time_embed_dim == ADDITION_TIME_EMBED_DIM


def test_an_sd15_folder_or_components_fail_clearly(sd_pipelines, sdxl_folder, tmp_path):
    from lit_diffac.backbones.loading import load_unet_components

    with pytest.raises(FileNotFoundError, match="has no 'text_encoder_2/' folder"):
        SDXLBackbone(str(sd_pipelines["sd15"]))
    with pytest.raises(ValueError, match="needs an SDXL pipeline"):
        SDXLBackbone(load_unet_components(str(sd_pipelines["sd15"])))
    folder = shutil.copytree(sdxl_folder, tmp_path / "sdxl")
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="has no 'tokenizer_2/' folder"):
        SDXLBackbone(str(folder))


def test_fsdp_wrap_policy_wraps_one_unit_per_block(sdxl_folder):
    from lit_diffac.distributed import diffusion_block_wrap_policy

    unet = SDXLBackbone(str(sdxl_folder)).denoiser
    assert sum(diffusion_block_wrap_policy(m, False, 0) for m in unet.modules()) == 3 + 1 + 3  # down, mid, up


# ------------------------------------------------------------------------------------------ export

def _unet_prediction(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 2 * TEXT_WIDTH, generator=g)
    added = {"text_embeds": torch.randn(2, TEXT_WIDTH, generator=g),
             "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([900, 300]), encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_export_loads_with_the_stock_sdxl_pipeline_and_its_lora_with_load_lora_weights(sdxl_folder, tmp_path,
                                                                                     monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    from test_export import TINY

    from lit_diffac.sampling import load_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    recipe = ROOT / "recipes" / "sdxl" / "pickscore.yaml"
    overrides = [f"--model.init_args.backbone.init_args.pretrained={sdxl_folder}",
                 "--model.init_args.backbone.init_args.lora_rank=2",
                 "--model.init_args.backbone.init_args.lora_alpha=2",
                 "--model.init_args.backbone.init_args.weights_dtype=float32",
                 f"--model.init_args.backbone.init_args.resolution={SIZE}",
                 "--model.init_args.backbone.init_args.cfg_scale=1.0", "--model.init_args.actor_lr=1e-2",
                 '--model.init_args.rewards=[{"class_path": "lit_diffac.rewards.Brightness"}]',
                 "--model.init_args.sampler.init_args.num_steps=2", "--trainer.accelerator=cpu",
                 f"--model.init_args.train_prompts={tmp_path / 'prompts.txt'}",
                 f"--model.init_args.evaluation.init_args.prompts={tmp_path / 'prompts.txt'}"]
    assert main(["run", str(recipe), *TINY, *overrides]) == 0
    (ckpt,) = Path("runs").rglob("last.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", "exported", "--merge"]) == 0
    module = load_module(str(recipe), str(ckpt), overrides)
    trained = _unet_prediction(module.backbone.denoiser)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)  # base + adapter
    assert not torch.allclose(_unet_prediction(pipe.unet), trained, atol=1e-4)  # the LoRA trained
    pipe.load_lora_weights("exported/lora", adapter_name="rl")
    ours = get_peft_model_state_dict(module.backbone.denoiser, adapter_name="policy")
    theirs = get_peft_model_state_dict(pipe.unet, adapter_name="rl")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(_unet_prediction(pipe.unet), trained, rtol=0, atol=1e-5)
    generate = dict(num_inference_steps=2, guidance_scale=1.0, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(0))
    assert pipe("a red cat", **generate).images[0].size == (SIZE, SIZE)

    merged = DiffusionPipeline.from_pretrained("exported/pipeline", add_watermarker=False)
    assert type(merged) is StableDiffusionXLPipeline and not any("lora" in k for k in merged.unet.state_dict())
    assert merged.config.force_zeros_for_empty_prompt is True  # the base's model_index.json, kept
    torch.testing.assert_close(_unet_prediction(merged.unet), trained, rtol=1e-5, atol=1e-5)
    assert merged("a blue dog", **generate).images[0].size == (SIZE, SIZE)
    record = json.loads(Path("exported/pipeline/lit_diffac.json").read_text())
    assert record["policy"]["backbone"] == "lit_diffac.backbones.sdxl.SDXLBackbone"
    assert record["policy"]["lora"] == {"rank": 2, "alpha": 2, "merged": True}


def test_an_sdxl_folder_without_model_index_gets_the_stock_one(sdxl_folder, tmp_path):
    """SDXL folders downloaded without ``model_index.json`` (only the sub-folders lit_diffac reads) export loadable
    as ``StableDiffusionXLPipeline``."""
    from lit_diffac.export import write_model_index

    folder = shutil.copytree(sdxl_folder, tmp_path / "sdxl")
    original = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").unlink()
    write_model_index(folder, "unet")
    written = json.loads((folder / "model_index.json").read_text())
    assert {k: v for k, v in written.items() if k != "_diffusers_version"} == \
        {k: v for k, v in original.items() if k != "_diffusers_version"}


# ------------------------------------------------------------------------------------------ recipes

#: Per-recipe extra overrides, so that the runs together cover fp32 with CFG and a negative prompt (and check the
#: on-policy ratio there), the recipes' own bf16 + CFG 5 with zero negative embeddings, and the critic adapter.
EXTRA = {
    "pickscore": ["--model.init_args.backbone.init_args.weights_dtype=float32",
                  "--model.init_args.backbone.init_args.cfg_scale=2.0",
                  "--model.init_args.backbone.init_args.negative_prompt=blurry, low quality"],
    "hpsv21": ["--model.init_args.backbone.init_args.critic_lora_rank=2",
               "--model.init_args.value_gradient=critic_lora"],
}


@pytest.mark.parametrize("recipe", SDXL_RECIPES, ids=lambda p: p.stem)
def test_sdxl_recipe_runs_through_the_cli(recipe, tmp_path, monkeypatch, sdxl_folder, reward_weights, geneval_server):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    eval_prompts = ROOT / config["evaluation"]["init_args"]["prompts"]
    if recipe.stem == "ocr":  # RapidOCR takes ~1.5 s an image on one CPU thread: evaluate on one held-out prompt
        eval_prompts = tmp_path / "one_prompt.txt"
        eval_prompts.write_text('a wooden sign that says "Welcome Home"\n')
    args = ["run", str(recipe), "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.backbone.init_args.pretrained={sdxl_folder}",
            f"--model.init_args.backbone.init_args.resolution={SIZE}",
            "--model.init_args.sampler.init_args.num_steps=2", "--model.init_args.batch_size=2",
            "--model.init_args.minibatch_size=4", "--model.init_args.evaluation.init_args.samples_per_prompt=1",
            f"--model.init_args.train_prompts={ROOT / config['train_prompts']}",
            f"--model.init_args.evaluation.init_args.prompts={eval_prompts}",
            f"--model.init_args.rewards={json.dumps(_tiny_rewards(recipe, reward_weights, geneval_server))}",
            *EXTRA.get(recipe.stem, [])]
    assert main(args) == 0
    (summary,) = Path(tmp_path).rglob("summary.json")
    summary = json.loads(summary.read_text())
    assert summary["iterations"] == 1 and summary["samples_seen"] == 2
    assert summary["base"] and set(summary["base"]) == set(summary["final"])
    train = summary["final_train"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in train.items() if k.startswith("reward/"))
    if recipe.stem == "pickscore":  # fp32 with CFG and a negative prompt: the update recomputes the log-probs
        assert train["train/onpolicy_max_abs_ratio_dev"] < 1e-5


def test_every_sdxl_recipe_documents_its_values_memory_time_and_smaller_gpus():
    assert {p.stem for p in SDXL_RECIPES} == {"pickscore", "hpsv21", "ocr", "geneval", "multi_reward"}
    for recipe in SDXL_RECIPES:
        header = recipe.read_text().split("\nseed_everything")[0]
        for needle in ("Expected GPU memory (ESTIMATE", "Expected time per iteration (ESTIMATE", "Smaller GPUs",
                       "Paper values", "RockeyCoss/SPO", "Our choices"):
            assert needle in header, (recipe.name, needle)
        init = yaml.safe_load(recipe.read_text())["model"]["init_args"]
        backbone = init["backbone"]
        assert backbone["class_path"] == "lit_diffac.backbones.sdxl.SDXLBackbone"
        assert backbone["init_args"]["lora_rank"] > 0 and backbone["init_args"]["gradient_checkpointing"] is True
        assert backbone["init_args"]["weights_dtype"] == "bfloat16" and backbone["init_args"]["resolution"] == 1024
        assert init["sampler"]["class_path"] == "lit_diffac.samplers.DDIMSampler"
