"""Randomly initialised SD3.5-Medium / SD1.5 backbones with the real layer shapes, only shallower, set up as the
SD recipes set them up (LoRA rank 32, the value head and critic replay of ``recipes/sd35`` and ``recipes/sd15``):
what :mod:`benchmarks.overhead_scale` times.  ``quick``: the same code at tiny widths, for the tests.
"""

from __future__ import annotations

import copy
import functools

# What recipes/sd35/*.yaml and recipes/sd15/*.yaml configure.
SD35M_TAPS, SD35M_DEPTH, SD35M_DUAL_ATTENTION = (7, 15, 23), 24, 13
SD15_TAPS = ("down_blocks.1", "mid_block", "up_blocks.1")
VALUE_HEAD = {"dim": 256, "num_heads": 8, "hidden": 512}
PATCH_SIZE = {"sd35m": 4, "sd15": 2}  # the head's pooling (recipes: 32x32 tokens -> 8x8; UNet maps 2x2)
CRITIC_REPLAY = {"iterations": 8, "passes": 2, "minibatch_size": 64, "checkpoint": False}
LORA_RANK = 32
MINIBATCH = 16
CLIP_RANGE = {"sd35m": 1e-4, "sd15": 1e-5}
PROMPTS = ["a photo of a cat", "a red sign saying two", "a blue dog on the cat", "two dogs and a cat"]


# ---------------------------------------------------------------------------------------------- shapes
def scaled_taps(blocks: int) -> list[int]:
    """The recipe's DiT taps 7 / 15 / 23 of 24 at the same relative depths of a ``blocks``-deep transformer."""
    return sorted({max(0, round((tap + 1) * blocks / SD35M_DEPTH) - 1) for tap in SD35M_TAPS})


def sd35m_shape(blocks: int, quick: bool) -> dict:
    """``SD3Transformer2DModel`` keyword arguments and text shapes (SD3.5-Medium's, or tiny with ``quick``)."""
    if quick:
        heads, head_dim, joint, pooled, latent, t5_tokens, clip_proj = 2, 16, 64, 64, 16, 8, (32, 32)
    else:
        heads, head_dim, joint, pooled, latent, t5_tokens, clip_proj = 24, 64, 4096, 2048, 64, 256, (768, 1280)
    transformer = dict(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled,
        # SD3.5-M: 384 — a positional table the model only crops its centre from; 1 GB of float32 for nothing.
        pos_embed_max_size=latent,
        dual_attention_layers=tuple(range(round(SD35M_DUAL_ATTENTION * blocks / SD35M_DEPTH))),
        qk_norm="rms_norm")
    return {"transformer": transformer, "clip_projection_dims": clip_proj, "clip_tokens": 77, "t5_tokens": t5_tokens,
            "image_tokens": (latent // 2) ** 2, "text_tokens": 77 + t5_tokens, "taps": scaled_taps(blocks)}


def sd15_shape(layers: int, quick: bool) -> dict:
    """``UNet2DConditionModel`` keyword arguments and text shapes (SD1.5's, or tiny with ``quick``)."""
    channels, cross, latent, groups = ((32, 32, 64, 64), 32, 16, 8) if quick else ((320, 640, 1280, 1280), 768, 64, 32)
    unet = dict(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=groups)
    return {"unet": unet, "text_width": cross, "clip_tokens": 77, "taps": list(SD15_TAPS)}


# ---------------------------------------------------------------------------------------------- building
def _resized(model, **changes):
    """A new random ``type(model)`` with ``model``'s config changed by ``changes``."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    return type(model)(config)


def build_sd35m(settings: dict, seed: int = 0):
    """``(DiTBackbone, StableDiffusion3Pipeline sharing its denoiser, shape)``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.backbones.loading import PipelineComponents
    from lit_diffac.tiny_pipelines import sd3_components

    shape = sd35m_shape(settings["blocks"], settings["quick"])
    joint = shape["transformer"]["joint_attention_dim"]
    torch.manual_seed(seed)
    tiny = sd3_components(seed=seed, num_layers=1)  # tokenizers and tiny text encoders to widen
    text_encoder = _resized(tiny["text_encoder"], projection_dim=shape["clip_projection_dims"][0])
    text_encoder_2 = _resized(tiny["text_encoder_2"], projection_dim=shape["clip_projection_dims"][1])
    text_encoder_3 = _resized(tiny["text_encoder_3"], d_model=joint)
    transformer = SD3Transformer2DModel(**shape["transformer"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    components = PipelineComponents(
        denoiser=transformer, scheduler=scheduler, tokenizer=tiny["tokenizer"], text_encoder=text_encoder,
        extra_text={"text_encoder_2": text_encoder_2, "tokenizer_2": tiny["tokenizer_2"],
                    "text_encoder_3": text_encoder_3, "tokenizer_3": tiny["tokenizer_3"]})
    backbone = DiTBackbone.from_components(
        components, feature_taps=shape["taps"], lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
        max_sequence_length=shape["t5_tokens"], weights_dtype=settings["dtype"],
        gradient_checkpointing=settings["gradient_checkpointing"])
    pipe = StableDiffusion3Pipeline(
        transformer=backbone.denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
        vae=None, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
        text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2,
        text_encoder_3=backbone.text_encoder_3, tokenizer_3=backbone.tokenizer_3)
    return backbone, pipe, shape


def build_sd15(settings: dict, seed: int = 0):
    """``(UNetBackbone, StableDiffusionPipeline sharing its denoiser, shape)``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from lit_diffac.backbones import UNetBackbone
    from lit_diffac.backbones.loading import PipelineComponents
    from lit_diffac.tiny_pipelines import sd15_components

    shape = sd15_shape(settings["unet_layers"], settings["quick"])
    torch.manual_seed(seed)
    tiny = sd15_components(seed=seed)
    text_encoder = _resized(tiny["text_encoder"], hidden_size=shape["text_width"], projection_dim=shape["text_width"])
    unet = UNet2DConditionModel(**shape["unet"])
    # SD1.5's scheduler_config.json, as the DDIM scheduler the sampler and the pipeline both use.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    components = PipelineComponents(denoiser=unet, scheduler=scheduler, tokenizer=tiny["tokenizer"],
                                    text_encoder=text_encoder)
    backbone = UNetBackbone.from_components(
        components, feature_taps=shape["taps"], lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
        weights_dtype=settings["dtype"], gradient_checkpointing=settings["gradient_checkpointing"])
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.denoiser,
        scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return backbone, pipe, shape


def stock_pipeline_latents(name: str, pipe, embeds, steps: int, generator):
    """The stock pipeline's ``__call__`` on cached prompt embeddings, as the benchmarks compare it with a rollout:
    guidance off, ``output_type="latent"`` (SD1.5: DDIM with η = 1, the RL sampler's)."""
    extra = {"pooled_prompt_embeds": embeds.pooled} if name == "sd35m" else {"eta": 1.0}
    return pipe(prompt_embeds=embeds.hidden, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                generator=generator, **extra).images


def _zero_reward(images, prompts, **_):  # never called: the benchmark sets the rollout's rewards itself
    return images.new_zeros(images.shape[0])


def build_modules(name: str, backbone, settings: dict):
    """``(with critic, without critic)`` LatentActorCritic modules sharing ``backbone``."""
    from lit_diffac.critic_replay import CriticReplay
    from lit_diffac.estimators import CriticGAE, GroupRelative
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards.base import CallableReward
    from lit_diffac.samplers import DDIMSampler, FlowSDESampler
    from lit_diffac.value_heads import ValueHead

    def sampler():
        k = settings["steps"]
        return FlowSDESampler(num_steps=k, noise_level=0.7) if name == "sd35m" else DDIMSampler(num_steps=k, eta=1.0)

    batch = settings["batch"]
    common = dict(rewards=[CallableReward(_zero_reward, name="bench")], train_prompts=PROMPTS,
                  evaluation=HeldOutEvaluation(prompts=PROMPTS[:1], samples_per_prompt=1, diversity=False),
                  value_head=functools.partial(ValueHead, **VALUE_HEAD, patch_size=PATCH_SIZE[name]),
                  batch_size=batch, minibatch_size=MINIBATCH,
                  num_inner_epochs=1, clip_range=CLIP_RANGE[name], actor_lr=1e-4, critic_lr=1e-3,
                  seed=settings["seed"])
    critic = LatentActorCritic(backbone=backbone, sampler=sampler(), **common,
                               critic_replay=CriticReplay(**CRITIC_REPLAY),
                               estimator=CriticGAE(gamma=1.0, lam=1.0, advantage_clip=10.0, target_clip=5.0))
    plain = LatentActorCritic(backbone=backbone, sampler=sampler(), **common, estimator=GroupRelative(),
                              samples_per_prompt=2 if batch % 2 == 0 else 1)
    return critic, plain
