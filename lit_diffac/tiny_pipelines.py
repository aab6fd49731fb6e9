"""Tiny random Stable Diffusion 1.5-, SDXL-, SD3- and FLUX.1-format pipeline folders, for tests and smoke runs.

They are written by the diffusers pipelines' own ``save_pretrained`` (``model_index.json`` and one
sub-folder per component), so :class:`~lit_diffac.backbones.UNetBackbone` /
:class:`~lit_diffac.backbones.DiTBackbone` / :class:`~lit_diffac.backbones.flux.FluxBackbone` load them through
exactly the code path real SD1.5 / SDXL / SD3.5 / FLUX.1 weights take — only the widths and depths are tiny and the
weights random:

* SD1.5 layout: ``unet/`` (UNet2DConditionModel, cross-attention down block + plain down block),
  ``vae/`` (AutoencoderKL, 4 latent channels, scaling 0.18215), ``text_encoder/`` (CLIPTextModel),
  ``tokenizer/`` (CLIPTokenizer), ``scheduler/`` (PNDMScheduler with SD1.5's β schedule, as the real
  folder ships it; the DDIM sampler reads it as a DDIMScheduler).
* SD3 layout: ``transformer/`` (SD3Transformer2DModel), ``vae/`` (AutoencoderKL with SD3's shift factor,
  no quant convs), ``text_encoder/`` + ``text_encoder_2/`` (CLIPTextModelWithProjection),
  ``tokenizer/`` + ``tokenizer_2/`` (CLIPTokenizer), ``text_encoder_3/`` (T5EncoderModel),
  ``tokenizer_3/`` (T5 tokenizer), ``scheduler/`` (FlowMatchEulerDiscreteScheduler, shift 3).
* FLUX.1 layout (``FluxPipeline``): ``transformer/`` (FluxTransformer2DModel: 19 double-stream + 38 single-stream
  blocks as FLUX.1 but 16 wide, 64 = 16 × 2 × 2 packed input channels, the guidance embedding of FLUX.1-dev),
  ``vae/`` (AutoencoderKL, 16 latent channels, FLUX's scaling / shift factors, no quant convs), ``text_encoder/``
  (CLIPTextModel, pooled output only) + ``tokenizer/``, ``text_encoder_2/`` (T5EncoderModel) + ``tokenizer_2/``,
  ``scheduler/`` (FlowMatchEulerDiscreteScheduler with FLUX.1-dev's resolution-dependent dynamic shifting).
* SDXL layout (``StableDiffusionXLPipeline``): ``unet/`` laid out like SDXL's — three levels (a plain
  ``DownBlock2D``, then two ``CrossAttnDownBlock2D``; SDXL's 1 / 2 / 10 transformer layers per level here 1 / 1 / 2),
  linear projections, ``addition_embed_type="text_time"``, cross-attention width = both text encoders' widths side by
  side (SDXL 768 + 1280; here 32 + 32) —, ``text_encoder/`` (CLIPTextModel) + ``text_encoder_2/``
  (CLIPTextModelWithProjection) and their tokenizers, ``vae/`` (scaling 0.13025, ``force_upcast``),
  ``scheduler/`` (EulerDiscreteScheduler with SDXL's config keys, read as DDIM by the DDIM sampler) and
  ``model_index.json``'s ``force_zeros_for_empty_prompt``.

Tokenizers are built offline (a byte-level CLIP BPE vocabulary and a character-level T5 unigram
vocabulary); nothing touches the hub.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch

from lit_diffac.toy.text import write_tokenizer

#: Words with their own CLIP token (anything else tokenises into characters).
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "sign", "saying", "the", "on", "and", "two"]
CLIP_MAX_LENGTH = 77  # the real SD tokenizers' model_max_length
T5_MAX_LENGTH = 32    # SD3 pipelines pad T5 tokens to max_sequence_length (256 by default; shorter here)


def _clip_tokenizer(folder: Path):
    tok = write_tokenizer(folder, WORDS)
    tok.model_max_length = CLIP_MAX_LENGTH
    tok.save_pretrained(folder)
    return tok


def _clip_config(tokenizer, hidden: int, projection: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                          projection_dim=projection, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _t5_tokenizer():
    """A character-level T5 unigram tokenizer (``<pad>``, ``</s>``, ``<unk>``, ``▁`` + printable ASCII)."""
    from transformers import T5TokenizerFast

    pieces = ["▁", *string.ascii_lowercase, *string.digits, *string.punctuation]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def sd15_components(sample_size: int = 8, seed: int = 0) -> dict:
    """Random SD1.5-architecture components (keyword arguments of ``StableDiffusionPipeline``)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden=32, projection=32))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=0.18215)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    scheduler.register_to_config(clip_sample=False)  # as the real v1-5 scheduler_config.json (read by DDIM)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd3_components(sample_size: int = 8, seed: int = 0, with_t5: bool = True, num_layers: int = 24) -> dict:
    """Random SD3-architecture components (keyword arguments of ``StableDiffusion3Pipeline``).

    CLIP widths 32 + 32 concatenate to 64 = ``joint_attention_dim`` = the T5 width; pooled 32 + 32 = 64.
    24 transformer blocks (as SD3.5-Medium), so the paper's value-head taps 7 / 15 / 23 exist.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp) / "a")
        tokenizer_2 = _clip_tokenizer(Path(tmp) / "b")
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, hidden=32, projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden=32, projection=32, layers=3))
    tokenizer_3 = _t5_tokenizer() if with_t5 else None
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=16, d_ff=64, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                             eos_token_id=1)) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=sample_size)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                tokenizer_3=tokenizer_3, scheduler=scheduler)


def flux_components(seed: int = 0, guidance_embeds: bool = True, num_layers: int = 19,
                    num_single_layers: int = 38) -> dict:
    """Random FLUX.1-architecture components (keyword arguments of ``FluxPipeline``).

    19 double-stream + 38 single-stream blocks, as FLUX.1, so the recipes' value-head taps (18, 37, 56) exist.
    The scheduler's configuration is FLUX.1-dev's ``scheduler_config.json`` (dynamic shifting between
    ``base_shift`` 0.5 at 256 and ``max_shift`` 1.15 at 4096 image tokens); the VAE has FLUX's 16 latent channels,
    ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159 but 2 blocks (×2 downsampling, so a 16-px image is an
    8×8 latent, 4×4 = 16 packed tokens).  ``guidance_embeds=False`` gives the FLUX.1-schnell layout.  CLIP and T5
    are 32 wide: ``pooled_projection_dim`` = ``joint_attention_dim`` = 32.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden=32, projection=32))
    tokenizer_2 = _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_sd15_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random SD1.5-format pipeline folder with ``StableDiffusionPipeline.save_pretrained``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    StableDiffusionPipeline(**sd15_components(sample_size=sample_size, seed=seed)).save_pretrained(
        folder, safe_serialization=True)
    return folder


def save_sd3_pipeline(folder: str | Path, seed: int = 0, with_t5: bool = True, sample_size: int = 8) -> Path:
    """Write a tiny random SD3-format pipeline folder with ``StableDiffusion3Pipeline.save_pretrained``."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    StableDiffusion3Pipeline(**sd3_components(sample_size=sample_size, seed=seed, with_t5=with_t5)).save_pretrained(
        folder, safe_serialization=True)
    return folder


def save_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny random FLUX.1-format pipeline folder with ``FluxPipeline.save_pretrained``."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    FluxPipeline(**flux_components(seed=seed, guidance_embeds=guidance_embeds)).save_pretrained(
        folder, safe_serialization=True)
    return folder


#: ``UNet2DConditionModel.addition_time_embed_dim`` of the tiny model (SDXL: 256).
ADDITION_TIME_EMBED_DIM = 8
#: Width of the tiny text encoders' hidden states and of ``text_encoder_2``'s projection (SDXL: 768 / 1280 / 1280).
TEXT_WIDTH = 32


def sdxl_components(sample_size: int = 8, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> dict:
    """Random SDXL-architecture components (keyword arguments of ``StableDiffusionXLPipeline``).

    Args:
        sample_size: the UNet's native latent side (the images are twice as wide: a two-level VAE).
        seed: seeds every random weight.
        force_zeros_for_empty_prompt: the pipeline flag (SDXL base: true): an absent negative prompt under CFG
            is all-zero embeddings instead of the encoded empty prompt.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp) / "a")
        tokenizer_2 = _clip_tokenizer(Path(tmp) / "b")
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden=TEXT_WIDTH, projection=TEXT_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden=TEXT_WIDTH, projection=TEXT_WIDTH,
                                                              layers=3))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=0.13025,
                        force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear",
                                       use_karras_sigmas=False)
    # keys the real stable-diffusion-xl-base-1.0 scheduler_config.json carries beyond Euler's own (read by DDIM)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                                 sample_max_value=1.0)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler, image_encoder=None, feature_extractor=None,
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


def save_sdxl_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 8,
                       force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write a tiny random SDXL-format pipeline folder with ``StableDiffusionXLPipeline.save_pretrained``."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    StableDiffusionXLPipeline(**sdxl_components(sample_size=sample_size, seed=seed,
                                                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
                              ).save_pretrained(folder, safe_serialization=True)
    return folder


__all__ = ["save_sd15_pipeline", "save_sdxl_pipeline", "save_sd3_pipeline", "save_flux_pipeline", "sd15_components",
           "sdxl_components", "sd3_components", "flux_components", "WORDS", "T5_MAX_LENGTH", "ADDITION_TIME_EMBED_DIM",
           "TEXT_WIDTH"]
