"""Stable Diffusion XL backbones: SD1.5's UNet family with two text encoders and SDXL's added conditioning.

What SDXL adds to :class:`~lit_diffac.backbones.unet.UNetBackbone` (and what this module does about it, following
diffusers' ``StableDiffusionXLPipeline``):

* **Two text encoders.** The prompt embedding is the penultimate hidden states of ``text_encoder`` (CLIP ViT-L,
  768 wide) and of ``text_encoder_2`` (OpenCLIP bigG, 1280 wide) concatenated on the channel axis (2048, the UNet's
  ``cross_attention_dim``); the pooled embedding is ``text_encoder_2``'s projected ``text_embeds`` (1280) — exactly
  ``StableDiffusionXLPipeline.encode_prompt`` without clip skip (tested).
* **Added conditioning** (``addition_embed_type="text_time"``): every UNet call gets ``added_cond_kwargs =
  {"text_embeds": pooled, "time_ids": original_size + crops_coords_top_left + target_size}``; here the sizes are
  the training resolution, square, with no crop: ``(R, R, 0, 0, R, R)`` (the pipeline's defaults for an R × R image).
* **The negative prompt under CFG.** SDXL base sets ``force_zeros_for_empty_prompt: true`` in ``model_index.json``:
  a pipeline called without a negative prompt guides against all-zero prompt *and* pooled embeddings, not against
  the encoded empty string.  The backbone's default ``negative_prompt=""`` behaves like that pipeline call (zeros
  when the folder's flag is set); any other negative prompt is encoded as the pipeline encodes it.
* **The scheduler.** SDXL ships an ``EulerDiscreteScheduler``; its config (scaled-linear β 0.00085 → 0.012, 1000
  steps, ε-prediction, ``clip_sample: false``, ``set_alpha_to_one: false``) is read as a ``DDIMScheduler`` for the
  DDIM log-prob sampler, whose own trailing timestep spacing replaces the folder's ``"leading"`` +
  ``steps_offset: 1`` (``DDIMSampler`` always uses trailing spacing, so the last step keeps a non-zero variance).
* **The VAE.** Latents are scaled by 0.13025 (SDXL's ``vae/config.json``).  SDXL's VAE overflows in float16
  (``force_upcast: true``; the community ``madebyollin/sdxl-vae-fp16-fix`` VAE avoids that): use
  ``weights_dtype: bfloat16`` (as the recipes do), which has float32's range.

Feature taps are UNet blocks by name, as for SD1.5.  SDXL's levels are 320 / 640 / 1280 channels; at 1024 px the
latent is 128 × 128 and ``down_blocks.2`` / ``mid_block`` give 32 × 32 maps of 1280 channels, ``up_blocks.0``
64 × 64 × 1280, ``up_blocks.1`` 128 × 128 × 640.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from lit_diffac.backbones.base import PromptEmbeds
from lit_diffac.backbones.dit import clip_prompt_embeds
from lit_diffac.backbones.loading import PipelineComponents, load_component, locate_pipeline, require_hub
from lit_diffac.backbones.lora import DEFAULT_TARGETS
from lit_diffac.backbones.unet import UNetBackbone

__all__ = ["SDXLBackbone", "load_sdxl_components", "read_force_zeros_for_empty_prompt"]

#: Sub-folders an SDXL pipeline must have (the refiner, which lacks ``text_encoder/``, is not supported).
SDXL_SUBFOLDERS = ("unet", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


class _SchedulerAsDDIM:
    """``from_pretrained`` that reads any scheduler config of the folder (SDXL: Euler) as a ``DDIMScheduler``.

    A config without a ``clip_sample`` key (Euler's own parameters do not include it) gets ``clip_sample=False``:
    the folder's scheduler never clips x̂0, so its DDIM reading must not either (``DDIMScheduler``'s default is
    ``True``).  SDXL's real ``scheduler_config.json`` carries ``clip_sample: false`` anyway.
    """

    @staticmethod
    def from_pretrained(path: str, subfolder: str, **kwargs: Any):
        from diffusers import DDIMScheduler

        config = DDIMScheduler.load_config(path, subfolder=subfolder, **kwargs)
        return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))


def load_sdxl_components(pretrained: str) -> PipelineComponents:
    """Load an SDXL-layout pipeline (``StableDiffusionXLPipeline`` folders: SDXL base 1.0 and its fine-tunes).

    Reads ``unet/``, ``scheduler/`` (as a ``DDIMScheduler``, whatever scheduler the folder ships; see
    :class:`_SchedulerAsDDIM`), ``text_encoder/`` (``CLIPTextModel``) + ``tokenizer/``, ``text_encoder_2/``
    (``CLIPTextModelWithProjection``) + ``tokenizer_2/`` and ``vae/``; nothing else (no image encoder).

    Args:
        pretrained: a local folder or a hub id (e.g. ``stabilityai/stable-diffusion-xl-base-1.0``).

    Returns:
        the components; ``extra_text`` holds ``text_encoder_2`` and ``tokenizer_2``.

    Raises:
        PipelineNotFoundError, HubUnavailableError, FileNotFoundError: see
        :func:`~lit_diffac.backbones.loading.locate_pipeline`, :func:`~lit_diffac.backbones.loading.load_component`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path, local = locate_pipeline(pretrained, SDXL_SUBFOLDERS)
    return PipelineComponents(
        denoiser=load_component(UNet2DConditionModel, path, "unet", local),
        scheduler=load_component(_SchedulerAsDDIM, path, "scheduler", local),
        tokenizer=load_component(CLIPTokenizer, path, "tokenizer", local),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", local),
        vae=load_component(AutoencoderKL, path, "vae", local),
        extra_text={"text_encoder_2": load_component(CLIPTextModelWithProjection, path, "text_encoder_2", local),
                    "tokenizer_2": load_component(CLIPTokenizer, path, "tokenizer_2", local)},
    )


def read_force_zeros_for_empty_prompt(pretrained: str, default: bool = True) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` from its ``model_index.json`` (``default`` — diffusers'
    own, ``True`` — when the folder has no index or the index does not set it)."""
    path, local = locate_pipeline(pretrained, ())
    if local:
        index = Path(path) / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
    else:
        from diffusers import DiffusionPipeline

        require_hub(path)
        try:
            config = DiffusionPipeline.load_config(path)
        except Exception:  # noqa: BLE001 - the components loaded; a missing index only loses this flag
            config = {}
    return bool(config.get("force_zeros_for_empty_prompt", default))


class SDXLBackbone(UNetBackbone):
    """SDXL: a ``UNet2DConditionModel`` with SDXL's added conditioning, two CLIP text encoders, DDIM, a VAE.

    Loads a ``StableDiffusionXLPipeline`` folder (``unet/ scheduler/ text_encoder/ text_encoder_2/ tokenizer/
    tokenizer_2/ vae/``) through ``from_pretrained`` (:func:`load_sdxl_components`).  Prompt embeddings equal
    ``StableDiffusionXLPipeline.encode_prompt``; every denoiser call passes ``added_cond_kwargs`` with the pooled
    embedding and the ``time_ids`` of the training resolution (see the module docstring).

    Args:
        pretrained: a local folder or a hub id (loaded by :func:`load_sdxl_components`); or in-memory
            :class:`~lit_diffac.backbones.loading.PipelineComponents` in that layout (``extra_text`` with
            ``text_encoder_2`` and ``tokenizer_2``), used as they are (then :attr:`pretrained` is ``None``).
        feature_taps: names of UNet blocks whose outputs feed the value head: ``"down_blocks.i"``, ``"mid_block"``,
            ``"up_blocks.i"`` (SDXL at 1024 px: e.g. ``down_blocks.2``, ``mid_block``, ``up_blocks.0``).
        lora_rank, lora_alpha, lora_targets, vae_scaling_factor: as :class:`~lit_diffac.backbones.unet.UNetBackbone`
            (SDXL's ``vae_scaling_factor`` is 0.13025, read from the VAE config).
        force_zeros_for_empty_prompt: with ``negative_prompt=""`` the unconditional branch of CFG is all-zero
            prompt and pooled embeddings (as the pipeline does without a negative prompt) rather than the encoded
            empty string.  ``None``: the folder's ``model_index.json`` flag (SDXL base: true; in-memory components:
            true, diffusers' default).
        weights_dtype, autocast_dtype, gradient_checkpointing, vae_decode_batch, critic_lora_rank,
        critic_lora_alpha, resolution, max_cached_prompts, cfg_scale, negative_prompt: see
        :class:`~lit_diffac.backbones.base.DiffusionBackbone`.  ``resolution`` is also the size SDXL is
        conditioned on (``time_ids``); default: the UNet's native 1024 px.
    """

    sampler_family = "ddim"
    #: the stock diffusers pipeline of this layout (for exports: LoRA format and ``model_index.json``).
    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(
        self,
        pretrained: str | PipelineComponents,
        feature_taps: Sequence[str] = ("mid_block", "up_blocks.0"),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        vae_scaling_factor: float | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
        weights_dtype: str = "float32",
        autocast_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        vae_decode_batch: int | None = None,
        critic_lora_rank: int = 0,
        critic_lora_alpha: float | None = None,
        resolution: int | None = None,
        max_cached_prompts: int | None = None,
        cfg_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> None:
        loaded = not isinstance(pretrained, PipelineComponents)
        components = load_sdxl_components(pretrained) if loaded else pretrained
        if getattr(components.denoiser.config, "addition_embed_type", None) != "text_time" \
                or "text_encoder_2" not in components.extra_text:
            raise ValueError("SDXLBackbone needs an SDXL pipeline: a UNet with addition_embed_type='text_time' and a "
                             "second text encoder (text_encoder_2/); use UNetBackbone for SD1.5-layout pipelines")
        super().__init__(
            components, feature_taps=feature_taps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets, vae_scaling_factor=vae_scaling_factor, weights_dtype=weights_dtype,
            autocast_dtype=autocast_dtype, gradient_checkpointing=gradient_checkpointing,
            vae_decode_batch=vae_decode_batch, critic_lora_rank=critic_lora_rank,
            critic_lora_alpha=critic_lora_alpha, resolution=resolution, max_cached_prompts=max_cached_prompts,
            cfg_scale=cfg_scale, negative_prompt=negative_prompt,
        )
        #: the pipeline name this was loaded from (``None`` when built from in-memory components).
        self.pretrained = pretrained if loaded else None
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = read_force_zeros_for_empty_prompt(pretrained) if loaded else True
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self._check_added_conditioning()

    # ---- SDXL's added conditioning -----------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side in pixels of the images (the training resolution)."""
        return self.latent_size * self.vae_scale_factor

    @property
    def add_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """``original_size + crops_coords_top_left + target_size`` of a square image at :attr:`image_size`."""
        size = self.image_size
        return (size, size, 0, 0, size, size)

    def _check_added_conditioning(self) -> None:
        """The pipeline's ``_get_add_time_ids`` check: 6 time ids + the pooled width fit the UNet's add embedding."""
        config = self.denoiser.config
        passed = config.addition_time_embed_dim * len(self.add_time_ids) + self.text_encoder_2.config.projection_dim
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"the UNet expects an added embedding of width {expected}, but 6 time ids × "
                             f"{config.addition_time_embed_dim} + the pooled width "
                             f"{self.text_encoder_2.config.projection_dim} = {passed}: not an SDXL base pipeline?")

    # ---- prompts -----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """``StableDiffusionXLPipeline.encode_prompt`` (no clip skip): penultimate hidden states of both encoders
        side by side, ``text_encoder_2``'s projected pooled output."""
        hidden_1, _ = clip_prompt_embeds(self.tokenizer, self.text_encoder, prompts)
        hidden_2, pooled = clip_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts)
        dtype = self.text_encoder_2.dtype
        return PromptEmbeds(hidden=torch.cat([hidden_1, hidden_2], dim=-1).to(dtype), pooled=pooled)

    def encode_negative(self, count: int) -> PromptEmbeds:
        """``count`` copies of the unconditional branch: all-zero embeddings for ``negative_prompt=""`` when
        :attr:`force_zeros_for_empty_prompt` (the pipeline without a negative prompt), else the encoded
        :attr:`negative_prompt`."""
        if self.negative_prompt == "" and self.force_zeros_for_empty_prompt:
            shape = self.encode_prompts([""])
            return PromptEmbeds(hidden=torch.zeros_like(shape.hidden).repeat(count, 1, 1),
                                pooled=torch.zeros_like(shape.pooled).repeat(count, 1))
        return super().encode_negative(count)

    # ---- denoising ---------------------------------------------------------------------------------
    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        time_ids = torch.tensor([self.add_time_ids], dtype=embeds.hidden.dtype, device=latents.device)
        added = {"text_embeds": embeds.pooled, "time_ids": time_ids.expand(latents.shape[0], -1)}
        return self.denoiser(latents, timesteps, encoder_hidden_states=embeds.hidden, added_cond_kwargs=added).sample
