"""DiT backbones (SD3 family and the toy DiT): v-prediction (flow matching), SDE sampling."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.backbones.loading import PipelineComponents, load_dit_components
from lit_diffac.backbones.lora import DEFAULT_TARGETS


def _image_tokens(output):
    """Joint blocks return ``(text_states, image_states)``; keep the image tokens ``[B, N, D]``."""
    return output[1] if isinstance(output, tuple) else output


def clip_prompt_embeds(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP branch (diffusers ``_get_clip_prompt_embeds``, no clip skip).

    Tokens padded to ``model_max_length`` → ``(penultimate hidden states [B, L, D], projected pooled [B, P])``.
    """
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def t5_prompt_embeds(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int,
                     width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SD3's T5 branch (diffusers ``_get_t5_prompt_embeds``): ``[B, max_sequence_length, width]``.

    Without a T5 encoder (``text_encoder is None``) the pipeline uses zeros of that shape, and so does this.
    """
    if text_encoder is None:
        return torch.zeros(len(prompts), max_sequence_length, width, device=device, dtype=dtype)
    ids = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


class DiTBackbone(DiffusionBackbone):
    """An ``SD3Transformer2DModel`` with its text encoders, flow-matching scheduler and optional VAE.

    **SD3 / SD3.5 folders** (``text_encoder_2/`` present): prompts are encoded exactly as diffusers'
    ``StableDiffusion3Pipeline.encode_prompt`` does — the penultimate hidden states of both CLIP encoders
    concatenated on the channel axis, zero-padded to the T5 width and concatenated on the token axis with
    the T5 states (``max_sequence_length`` tokens); the pooled embedding is both CLIPs' projected pooled
    outputs side by side.  ``use_t5=False`` never loads T5 (saves ~9.5 GB in bf16 for SD3.5) and uses
    zeros in its place, as the pipeline does without ``text_encoder_3``.

    **The toy DiT** (``"toy-dit"``: one CLIP text encoder) uses that encoder's last hidden states and
    projected pooled output, in pixel space (no ``vae/``).

    Args:
        pretrained: a local folder, a hub id, or ``"toy-dit"`` (loaded by
            :func:`~lit_diffac.backbones.loading.load_dit_components`); or in-memory
            :class:`~lit_diffac.backbones.loading.PipelineComponents` in that layout, used as they are
            (then :attr:`pretrained` is ``None`` and ``use_t5`` has no effect: T5 is used if the components
            hold one).
        feature_taps: indices of transformer blocks whose image tokens feed the value head
            (SD3.5-M in the paper: 7, 15, 23 of 24).  Negative indices count from the end.
        lora_rank, lora_alpha, lora_targets: as :class:`~lit_diffac.backbones.unet.UNetBackbone`.
        use_t5: load and use ``text_encoder_3`` (T5) when the folder has one.
        max_sequence_length: T5 tokens (the pipeline's default: 256).
        weights_dtype, autocast_dtype, gradient_checkpointing, vae_decode_batch, critic_lora_rank,
        critic_lora_alpha, resolution, max_cached_prompts, cfg_scale, negative_prompt: see :class:`~lit_diffac.backbones.base.DiffusionBackbone`.
    """

    sampler_family = "flow"

    def __init__(
        self,
        pretrained: str | PipelineComponents = "toy-dit",
        feature_taps: Sequence[int] = (-1,),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        use_t5: bool = True,
        max_sequence_length: int = 256,
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
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        loaded = not isinstance(pretrained, PipelineComponents)
        components = load_dit_components(pretrained, use_t5=use_t5) if loaded else pretrained
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
        self.use_t5 = use_t5
        self.max_sequence_length = max_sequence_length

    @property
    def is_sd3(self) -> bool:
        """Whether this is an SD3-layout model (two CLIP encoders, optionally T5) rather than the toy."""
        return getattr(self, "text_encoder_2", None) is not None

    def _tap_names(self, feature_taps: Sequence[int]) -> list[str]:
        n_blocks = len(self.denoiser.transformer_blocks)
        bad = [i for i in feature_taps if not -n_blocks <= int(i) < n_blocks]
        if bad:
            raise ValueError(f"feature taps {bad} out of range: this transformer has {n_blocks} blocks")
        return [f"transformer_blocks.{int(i) % n_blocks}" for i in feature_taps]

    def _tap_select(self, output):
        return _image_tokens(output)

    @property
    def feature_grid(self) -> tuple[int, int]:
        """``(H/p, W/p)``: the patch grid of the image tokens (row-major, as the transformer's patch embedding)."""
        patch = self.denoiser.config.patch_size
        return self.latent_hw[0] // patch, self.latent_hw[1] // patch

    def _tap_dim(self, name: str) -> int:
        return self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        if not self.is_sd3:  # the toy DiT: one CLIP encoder
            device = self.text_encoder.device
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            out = self.text_encoder(ids)
            return PromptEmbeds(hidden=out.last_hidden_state, pooled=out.text_embeds)
        dtype = self.text_encoder.dtype
        hidden_1, pooled_1 = clip_prompt_embeds(self.tokenizer, self.text_encoder, prompts)
        hidden_2, pooled_2 = clip_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts)
        clip = torch.cat([hidden_1.to(dtype), hidden_2.to(dtype)], dim=-1)
        t5 = t5_prompt_embeds(getattr(self, "tokenizer_3", None), getattr(self, "text_encoder_3", None), prompts,
                              self.max_sequence_length, self.denoiser.config.joint_attention_dim, dtype,
                              self.text_encoder.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(hidden=torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                            pooled=torch.cat([pooled_1, pooled_2], dim=-1))

    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.denoiser(hidden_states=latents, encoder_hidden_states=embeds.hidden,
                             pooled_projections=embeds.pooled, timestep=timesteps).sample

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return self.vae.decode(latents / cfg.scaling_factor + shift).sample
