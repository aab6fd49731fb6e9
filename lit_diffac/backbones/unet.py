"""UNet backbones (SD1.5 family and the toy UNet): ε-prediction, DDIM sampling."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.backbones.loading import PipelineComponents, load_unet_components
from lit_diffac.backbones.lora import DEFAULT_TARGETS


def _first(output):
    """Down blocks return ``(hidden, residuals)``; keep the hidden map."""
    return output[0] if isinstance(output, tuple) else output


class UNetBackbone(DiffusionBackbone):
    """A ``UNet2DConditionModel`` with a CLIP text encoder, a DDIM scheduler and (optionally) a VAE.

    Loads a diffusers pipeline folder (``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``,
    ``vae/``) through ``from_pretrained``: the same path for SD1.5 weights and for the embedded
    ``"toy-unet"`` (a pixel-space model with no ``vae/``: latents are the image in [-1, 1]).

    Only the sub-folders it needs are read (from a hub id: downloaded); the hub is touched only when
    ``pretrained`` is a hub id (``owner/name``) that is not a local folder.

    Args:
        pretrained: a local folder, a hub id, or ``"toy-unet"`` (loaded by
            :func:`~lit_diffac.backbones.loading.load_unet_components`); or in-memory
            :class:`~lit_diffac.backbones.loading.PipelineComponents` in that layout, used as they are (then
            :attr:`pretrained` is ``None``).
        feature_taps: names of UNet blocks whose outputs feed the value head: ``"down_blocks.i"``,
            ``"mid_block"``, ``"up_blocks.i"`` (SD1.5: e.g. ``down_blocks.2``, ``mid_block``, ``up_blocks.1``).
        lora_rank: 0 trains the whole UNet (fine for toy models); >0 adds a peft LoRA policy.
        lora_alpha: LoRA scale numerator (default: ``lora_rank``).
        lora_targets: module names LoRA adapts.
        vae_scaling_factor: overrides the VAE config's latent scaling (SD1.5: 0.18215).
        weights_dtype, autocast_dtype, gradient_checkpointing, vae_decode_batch, critic_lora_rank,
        critic_lora_alpha, resolution, max_cached_prompts, cfg_scale, negative_prompt: see :class:`~lit_diffac.backbones.base.DiffusionBackbone`.
    """

    sampler_family = "ddim"

    def __init__(
        self,
        pretrained: str | PipelineComponents = "toy-unet",
        feature_taps: Sequence[str] = ("mid_block", "up_blocks.0"),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        vae_scaling_factor: float | None = None,
        weights_dtype: str = "float32",
        autocast_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        vae_decode_batch: int | None = None,
        critic_lora_rank: int = 0,
        critic_lora_alpha: float | None = None,
        resolution: int | tuple[int, int] | None = None,
        max_cached_prompts: int | None = None,
        cfg_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> None:
        loaded = not isinstance(pretrained, PipelineComponents)
        components = load_unet_components(pretrained) if loaded else pretrained
        super().__init__(
            components, feature_taps=feature_taps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets, weights_dtype=weights_dtype, autocast_dtype=autocast_dtype,
            gradient_checkpointing=gradient_checkpointing, vae_decode_batch=vae_decode_batch,
            critic_lora_rank=critic_lora_rank, critic_lora_alpha=critic_lora_alpha, resolution=resolution,
            max_cached_prompts=max_cached_prompts, cfg_scale=cfg_scale,
            negative_prompt=negative_prompt,
        )
        #: the pipeline name this was loaded from (``None`` when built from in-memory components).
        self.pretrained = pretrained if loaded else None
        if self.vae is not None:
            self.vae_scaling_factor = vae_scaling_factor or self.vae.config.scaling_factor

    def _tap_names(self, feature_taps: Sequence[str]) -> list[str]:
        return list(feature_taps)

    def _tap_select(self, output):
        return _first(output)

    def _tap_dim(self, name: str) -> int:
        return _out_channels(self.denoiser, name)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        device = self.text_encoder.device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        out = self.text_encoder(ids)
        return PromptEmbeds(hidden=out.last_hidden_state, pooled=out.pooler_output)

    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.denoiser(latents, timesteps, encoder_hidden_states=embeds.hidden).sample

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae_scaling_factor).sample


def _out_channels(unet: UNet2DConditionModel, tap: str) -> int:
    """Channel width of a UNet block's output (down/mid/up blocks by name)."""
    channels = list(unet.config.block_out_channels)
    parts = tap.split(".")
    if parts == ["mid_block"]:
        return channels[-1]
    if len(parts) == 2 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit():
        index = int(parts[1])
        if index >= len(channels):
            raise ValueError(f"feature tap {tap!r}: this UNet has {len(channels)} {parts[0]} (0–{len(channels) - 1})")
        return channels[index] if parts[0] == "down_blocks" else list(reversed(channels))[index]
    raise ValueError(f"feature tap {tap!r}: use 'down_blocks.i', 'mid_block' or 'up_blocks.i'")
