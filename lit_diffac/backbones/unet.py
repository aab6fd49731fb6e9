"""UNet backbones (SD1.5 family and the toy UNet): ε-prediction, DDIM sampling."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lit_diffac.backbones.base import (BackboneOutput, DiffusionBackbone, PromptEmbeds, require_local_folder,
                                       resolve_pretrained, to_unit_rgb)
from lit_diffac.backbones.lora import DEFAULT_TARGETS


def _first(output):
    """Down blocks return ``(hidden, residuals)``; keep the hidden map."""
    return output[0] if isinstance(output, tuple) else output


class UNetBackbone(DiffusionBackbone):
    """A ``UNet2DConditionModel`` with a CLIP text encoder, a DDIM scheduler and (optionally) a VAE.

    Loads a diffusers pipeline folder (``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``,
    ``vae/``) through ``from_pretrained``: the same path for SD1.5 weights and for the embedded
    ``"toy-unet"`` (a pixel-space model with no ``vae/``: latents are the image in [-1, 1]).

    Args:
        pretrained: a local folder, a hub id, or ``"toy-unet"``.
        feature_taps: names of UNet submodules whose outputs feed the value head.
        lora_rank: 0 trains the whole UNet (fine for toy models); >0 adds a peft LoRA policy.
        lora_alpha: LoRA scale numerator (default: ``lora_rank``).
        lora_targets: module names LoRA adapts.
        vae_scaling_factor: overrides the VAE config's latent scaling (SD1.5: 0.18215).
    """

    sampler_family = "ddim"

    def __init__(
        self,
        pretrained: str = "toy-unet",
        feature_taps: Sequence[str] = ("mid_block", "up_blocks.0"),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        vae_scaling_factor: float | None = None,
    ) -> None:
        path = resolve_pretrained(pretrained)
        for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
            require_local_folder(path, sub)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae") if _has_subfolder(path, "vae") else None
        super().__init__(
            denoiser=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            vae=vae, feature_taps=feature_taps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets,
        )
        self.pretrained = pretrained
        if vae is not None:
            self.vae_scaling_factor = vae_scaling_factor or vae.config.scaling_factor

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

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> BackboneOutput:
        prediction = self.denoiser(latents, timesteps, encoder_hidden_states=embeds.hidden).sample
        return BackboneOutput(prediction=prediction, features=self.taps.pop())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel space: one grey channel in [-1, 1]
            images = latents.float()
        else:
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae_scaling_factor).sample.float()
        return to_unit_rgb(images)


def _has_subfolder(path: str, name: str) -> bool:
    from pathlib import Path

    root = Path(path)
    if root.exists():
        return (root / name).is_dir()
    from diffusers import DiffusionPipeline

    return name in DiffusionPipeline.load_config(path)


def _out_channels(unet: UNet2DConditionModel, tap: str) -> int:
    """Channel width of a UNet block's output (down/mid/up blocks by name)."""
    channels = list(unet.config.block_out_channels)
    parts = tap.split(".")
    if parts[0] == "mid_block":
        return channels[-1]
    if parts[0] == "down_blocks":
        return channels[int(parts[1])]
    if parts[0] == "up_blocks":
        return list(reversed(channels))[int(parts[1])]
    raise ValueError(f"feature tap {tap!r}: use 'down_blocks.i', 'mid_block' or 'up_blocks.i'")
