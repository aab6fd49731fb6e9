"""FLUX.1 backbones (``FluxPipeline`` folders): packed 2×2 latents, CLIP + T5 prompts, the guidance embedding.

:class:`FluxBackbone` wraps a ``FluxTransformer2DModel`` so that the rest of lit_diffac sees the same contract as
for SD3: latents ``[B, 16, H, W]`` (unpacked; the samplers and value heads are unchanged), a velocity prediction of
that shape, and image-token features ``[B, N, D]`` from the transformer's double- and single-stream blocks, read by
hooks in the same forward.  Everything FLUX-specific happens inside :meth:`FluxBackbone._denoise` (packing, position
ids, the guidance embedding, the timestep in [0, 1]) and in the schedule, :class:`FluxPipelineScheduler`: the
sigmas ``FluxPipeline`` passes to its scheduler, ``linspace(1, 1/K, K)`` shifted by the resolution-dependent
``mu = calculate_shift(image tokens)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.backbones.loading import PipelineComponents, load_component, locate_pipeline
from lit_diffac.dtypes import parse_dtype

__all__ = ["FLUX_LORA_TARGETS", "FluxBackbone", "FluxPipelineScheduler", "flux_mu", "latent_image_ids",
           "load_flux_components", "pack_latents", "unpack_latents"]

#: LoRA targets of the public FLUX RL work (flow_grpo ``scripts/train_flux.py``; diffusers' FLUX DreamBooth LoRA
#: script uses the same list): the attention projections of the double-stream blocks (image and text streams) and
#: of the single-stream blocks (``attn.to_q/k/v`` match both), and the double-stream blocks' MLPs.
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                     "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

#: ``FluxPipeline`` divides the scheduler's timesteps by 1000 before the transformer (which multiplies back).
TIMESTEP_SCALE = 1000.0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, (H/2)(W/2), 4C]``: 2×2 patches as tokens, row-major
    (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` → ``[B, C, H, W]`` (latent ``height`` ×
    ``width``)."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[(H/2)(W/2), 3]`` position ids of the packed image tokens: ``(0, row, column)`` of each 2×2 patch of a latent
    ``height`` × ``width`` (``FluxPipeline._prepare_latent_image_ids``; text tokens get ``(0, 0, 0)``)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


def flux_mu(scheduler_config, image_seq_len: int) -> float:
    """``FluxPipeline``'s resolution-dependent shift ``mu`` for ``image_seq_len`` packed image tokens.

    Linear in the token count between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``
    of the scheduler's config (FLUX.1-dev: 256 → 0.5, 4096 → 1.15; 512 px is 1024 tokens, mu ≈ 0.63).  The
    exponential time shift with ``mu`` equals a static shift of ``exp(mu)``.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get
    return calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                           get("base_shift", 0.5), get("max_shift", 1.15))


class FluxPipelineScheduler(FlowMatchEulerDiscreteScheduler):
    """A ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(K)`` is the schedule ``FluxPipeline`` uses for
    an image of :attr:`image_seq_len` packed tokens.

    ``FluxPipeline.__call__`` passes ``sigmas = linspace(1, 1/K, K)`` (none when the config sets
    ``use_flow_sigmas``) and ``mu = calculate_shift(image_seq_len, ...)``; this class fills in both when they are
    not given, so a sampler that calls ``set_timesteps(K)`` gets the pipeline's sigmas (the base class alone would
    space them ``linspace(1, 1/1000, K)``).  Build it with :meth:`for_image`; its config is the pipeline's
    scheduler config, unchanged.  It is the backbone's in-memory schedule only: exports copy the pipeline folder's
    own ``scheduler/``.
    """

    image_seq_len: int | None = None

    @classmethod
    def for_image(cls, scheduler, image_seq_len: int) -> "FluxPipelineScheduler":
        """A copy of ``scheduler`` (same config) for images of ``image_seq_len`` packed tokens."""
        new = cls.from_config(scheduler.config)
        new.image_seq_len = int(image_seq_len)
        return new

    @property
    def default_mu(self) -> float | None:
        """``calculate_shift(image_seq_len)`` with this config's parameters (``None`` before :meth:`for_image`)."""
        return None if self.image_seq_len is None else flux_mu(self.config, self.image_seq_len)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """``FlowMatchEulerDiscreteScheduler.set_timesteps`` with ``FluxPipeline``'s ``sigmas`` and ``mu`` as
        defaults."""
        if sigmas is None and timesteps is None and num_inference_steps is not None \
                and not self.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if mu is None:
            mu = self.default_mu
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def load_flux_components(pretrained: str, dtype: torch.dtype | str | None = None,
                         denoiser_dtype: torch.dtype | str | None = None) -> PipelineComponents:
    """Load a ``FluxPipeline`` folder (FLUX.1-dev / -schnell layout, or a hub id).

    Reads ``transformer/`` (``FluxTransformer2DModel``), ``scheduler/``, ``vae/``, ``text_encoder/`` + ``tokenizer/``
    (CLIP: its pooled output) and ``text_encoder_2/`` + ``tokenizer_2/`` (T5: the token states).  FLUX.1-dev is
    23.8 GB in bf16: loading the frozen parts straight in ``dtype`` (and the transformer in ``denoiser_dtype``)
    avoids a float32 copy in host memory (the same numbers as loading float32 and casting).

    Returns:
        the components; ``extra_text`` holds ``text_encoder_2`` and ``tokenizer_2`` (T5).

    Raises:
        PipelineNotFoundError, HubUnavailableError, FileNotFoundError: see
        :func:`~lit_diffac.backbones.loading.locate_pipeline`, :func:`~lit_diffac.backbones.loading.load_component`.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    def typed(d):
        return {} if d is None else {"torch_dtype": parse_dtype(d) if isinstance(d, str) else d}

    path, local = locate_pipeline(pretrained, ("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                               "text_encoder_2", "tokenizer_2"))
    return PipelineComponents(
        denoiser=load_component(FluxTransformer2DModel, path, "transformer", local, **typed(denoiser_dtype)),
        scheduler=load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", local),
        tokenizer=load_component(CLIPTokenizer, path, "tokenizer", local),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", local, **typed(dtype)),
        vae=load_component(AutoencoderKL, path, "vae", local, **typed(dtype)),
        extra_text={"text_encoder_2": load_component(T5EncoderModel, path, "text_encoder_2", local, **typed(dtype)),
                    "tokenizer_2": load_component(T5TokenizerFast, path, "tokenizer_2", local)},
    )


class FluxBackbone(DiffusionBackbone):
    """A ``FluxTransformer2DModel`` with its CLIP + T5 text encoders, 16-channel VAE and flow-matching schedule.

    * **Latents** are ``[B, 16, H, W]`` outside (as the pipeline draws its noise); each forward packs them into
      ``(H/2)(W/2)`` tokens of 64 channels with their position ids and unpacks the prediction, exactly as
      ``FluxPipeline`` does around its transformer call (``timestep / 1000``, text ids zero).
    * **Prompts** are encoded as ``FluxPipeline.encode_prompt``: ``hidden`` = T5's last hidden states
      (``max_sequence_length`` tokens), ``pooled`` = CLIP's pooled output (also what the value head reads).
    * **Guidance embedding** (FLUX.1-dev, ``transformer.config.guidance_embeds``): every forward passes
      ``guidance_scale`` (3.5, the pipeline's default) as the distilled guidance; it is a property of the policy,
      not classifier-free guidance, which stays off (``cfg_scale=1``; with ``cfg_scale > 1`` the negative prompt's
      branch runs too, as ``FluxPipeline``'s ``true_cfg_scale``).  FLUX.1-schnell has no guidance embedding and
      ignores ``guidance_scale``.
    * **Schedule**: :attr:`scheduler` is a :class:`FluxPipelineScheduler` for this backbone's image size, so a
      ``FlowSDESampler`` set up on it gets ``FluxPipeline``'s sigmas and resolution-dependent shift.
    * **Feature taps** index the stack of double-stream blocks followed by single-stream blocks (FLUX.1: 19 + 38
      = 57; ``[18, 37, 56]`` is the last double block, the middle and the last single block; negative indices
      count from the end), or name blocks (``"transformer_blocks.3"``, ``"single_transformer_blocks.10"``).
      Each yields the block's image tokens ``[B, N, D]`` (text tokens dropped) from the policy's own forward.

    Args:
        pretrained: a local ``FluxPipeline`` folder or a hub id (loaded by :func:`load_flux_components`; the frozen
            parts in ``weights_dtype``), or in-memory :class:`~lit_diffac.backbones.loading.PipelineComponents` in
            that layout (T5 under ``extra_text["text_encoder_2"]``), used as they are.
        feature_taps: blocks whose image tokens feed the value head (see above).
        lora_rank, lora_alpha: the LoRA policy (0: full fine-tune).
        lora_targets: module-name suffixes the LoRA adapts (default :data:`FLUX_LORA_TARGETS`).
        guidance_scale: the distilled guidance passed to a guidance-embedding transformer (FLUX.1-dev: 3.5).
        max_sequence_length: T5 tokens (``FluxPipeline``'s default 512, its maximum).
        resolution: image side in pixels, a multiple of 16 (2 × the VAE's factor); default: ``FluxPipeline``'s
            (128 latent cells × the VAE's factor: 1024 px for FLUX.1).
        weights_dtype, autocast_dtype, gradient_checkpointing, vae_decode_batch, critic_lora_rank,
        critic_lora_alpha, max_cached_prompts, cfg_scale, negative_prompt: see
        :class:`~lit_diffac.backbones.base.DiffusionBackbone`.
    """

    sampler_family = "flow"
    #: the stock diffusers pipeline of this layout (for exports: LoRA format and ``model_index.json``).
    pipeline_class = "FluxPipeline"
    #: ``FluxPipeline.default_sample_size``: the default image is 128 latent cells wide.
    DEFAULT_SAMPLE_SIZE = 128

    def __init__(
        self,
        pretrained: str | PipelineComponents,
        feature_taps: Sequence[int | str] = (-1,),
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = FLUX_LORA_TARGETS,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
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
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (FluxPipeline's limit), "
                             f"got {max_sequence_length}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        loaded = not isinstance(pretrained, PipelineComponents)
        if loaded:
            frozen = parse_dtype(weights_dtype)
            components = load_flux_components(pretrained, dtype=frozen,
                                              denoiser_dtype=frozen if lora_rank or critic_lora_rank else torch.float32)
        else:
            components = pretrained
        if components.vae is None or "text_encoder_2" not in components.extra_text:
            raise ValueError("a FLUX backbone needs a VAE and the T5 encoder (extra_text['text_encoder_2'])")
        vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        if resolution is None:
            resolution = self.DEFAULT_SAMPLE_SIZE * vae_scale
        if resolution % (2 * vae_scale):
            raise ValueError(f"resolution {resolution} must be a multiple of {2 * vae_scale} (the VAE's factor "
                             f"{vae_scale} × FLUX's 2×2 packing)")
        super().__init__(
            components, feature_taps=feature_taps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets, weights_dtype=weights_dtype, autocast_dtype=autocast_dtype,
            gradient_checkpointing=gradient_checkpointing, vae_decode_batch=vae_decode_batch,
            critic_lora_rank=critic_lora_rank, critic_lora_alpha=critic_lora_alpha, resolution=resolution,
            max_cached_prompts=max_cached_prompts, cfg_scale=cfg_scale, negative_prompt=negative_prompt,
        )
        #: the pipeline name this was loaded from (``None`` when built from in-memory components).
        self.pretrained = pretrained if loaded else None
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.scheduler = FluxPipelineScheduler.for_image(self.scheduler, self.image_seq_len)

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(16, H, W)``: the unpacked latent (the transformer's 64 input channels are 16 × 2 × 2)."""
        return (self.denoiser.config.in_channels // 4, self.latent_size, self.latent_size)

    @property
    def feature_grid(self) -> tuple[int, int]:
        """``(H/2, W/2)``: the grid of the packed 2×2 image tokens (row-major, as :func:`pack_latents`)."""
        return self.latent_size // 2, self.latent_size // 2

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens per sample, ``(H/2)(W/2)``: what ``FluxPipeline``'s shift ``mu`` depends on."""
        return (self.latent_size // 2) ** 2

    @property
    def uses_guidance_embedding(self) -> bool:
        """Whether the transformer takes the distilled guidance (FLUX.1-dev: yes; FLUX.1-schnell: no)."""
        return bool(self.denoiser.config.guidance_embeds)

    # ---- feature taps ----------------------------------------------------------------------------
    def _tap_names(self, feature_taps: Sequence[int | str]) -> list[str]:
        blocks = [f"transformer_blocks.{i}" for i in range(len(self.denoiser.transformer_blocks))] + \
                 [f"single_transformer_blocks.{i}" for i in range(len(self.denoiser.single_transformer_blocks))]
        names, bad = [], []
        for tap in feature_taps:
            if isinstance(tap, str) and not tap.lstrip("-").isdigit():
                (names if tap in blocks else bad).append(tap)
            elif -len(blocks) <= int(tap) < len(blocks):
                names.append(blocks[int(tap)])
            else:
                bad.append(tap)
        if bad:
            raise ValueError(f"feature taps {bad} out of range: this transformer has {len(blocks)} blocks "
                             f"({len(self.denoiser.transformer_blocks)} double-stream, then "
                             f"{len(self.denoiser.single_transformer_blocks)} single-stream; or name one, e.g. "
                             f"'single_transformer_blocks.0')")
        return names

    def _tap_select(self, output) -> torch.Tensor:
        # Both block types return (text states, image states) in diffusers 0.42: the image tokens.
        return output[1]

    def _tap_dim(self, name: str) -> int:
        return self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim

    # ---- prompts ---------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        hidden = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return PromptEmbeds(hidden=hidden.to(self.text_encoder_2.dtype), pooled=pooled.to(self.text_encoder.dtype))

    # ---- denoising -------------------------------------------------------------------------------
    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        batch, _, height, width = latents.shape
        device = latents.device
        guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32) \
            if self.uses_guidance_embedding else None
        tokens = self.denoiser(
            hidden_states=pack_latents(latents), timestep=timesteps / TIMESTEP_SCALE, guidance=guidance,
            pooled_projections=embeds.pooled, encoder_hidden_states=embeds.hidden,
            txt_ids=torch.zeros(embeds.hidden.shape[1], 3, device=device),
            img_ids=latent_image_ids(height, width, device), return_dict=False)[0]
        return unpack_latents(tokens, height, width)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
