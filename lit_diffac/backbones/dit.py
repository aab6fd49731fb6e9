"""DiT backbones (SD3 family and the toy DiT): v-prediction (flow matching), SDE sampling."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from lit_diffac.backbones.base import (BackboneOutput, DiffusionBackbone, PromptEmbeds, require_local_folder,
                                       resolve_pretrained, to_unit_rgb)
from lit_diffac.backbones.lora import DEFAULT_TARGETS
from lit_diffac.backbones.unet import _has_subfolder


def _image_tokens(output):
    """Joint blocks return ``(text_states, image_states)``; keep the image tokens ``[B, N, D]``."""
    return output[1] if isinstance(output, tuple) else output


class DiTBackbone(DiffusionBackbone):
    """An ``SD3Transformer2DModel`` with CLIP text encoding, flow-matching scheduler and optional VAE.

    The toy DiT (``"toy-dit"``) uses one CLIP text encoder with projection: its token states are the
    joint-attention context and its projected pooled output the ``pooled_projections``.  It is pixel
    space (no ``vae/``).

    Args:
        pretrained: a local folder, a hub id, or ``"toy-dit"``.
        feature_taps: indices of transformer blocks whose image tokens feed the value head
            (SD3.5-M in the paper: 7, 15, 23).  Negative indices count from the end.
        lora_rank, lora_alpha, lora_targets: as :class:`~lit_diffac.backbones.unet.UNetBackbone`.
    """

    sampler_family = "flow"

    def __init__(
        self,
        pretrained: str = "toy-dit",
        feature_taps: Sequence[int] = (-1,),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
    ) -> None:
        path = resolve_pretrained(pretrained)
        for sub in ("transformer", "scheduler", "text_encoder", "tokenizer"):
            require_local_folder(path, sub)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae") if _has_subfolder(path, "vae") else None
        super().__init__(
            denoiser=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
            vae=vae, feature_taps=feature_taps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets,
        )
        self.pretrained = pretrained

    def _tap_names(self, feature_taps: Sequence[int]) -> list[str]:
        n_blocks = len(self.denoiser.transformer_blocks)
        return [f"transformer_blocks.{i % n_blocks}" for i in feature_taps]

    def _tap_select(self, output):
        return _image_tokens(output)

    def _tap_dim(self, name: str) -> int:
        return self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        device = self.text_encoder.device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        out = self.text_encoder(ids)
        return PromptEmbeds(hidden=out.last_hidden_state, pooled=out.text_embeds)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> BackboneOutput:
        prediction = self.denoiser(hidden_states=latents, encoder_hidden_states=embeds.hidden,
                                   pooled_projections=embeds.pooled, timestep=timesteps).sample
        return BackboneOutput(prediction=prediction, features=self.taps.pop())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            images = latents.float()
        else:
            cfg = self.vae.config
            shift = getattr(cfg, "shift_factor", None) or 0.0
            images = self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + shift).sample.float()
        return to_unit_rgb(images)
