"""Architectures of the two embedded toy text-to-image models, in real diffusers formats.

Both work in pixel space on 16×16 grey digits (no VAE: the "latent" is the image in [-1, 1]) and are
saved as pipeline folders that :class:`~lit_diffac.backbones.unet.UNetBackbone` /
:class:`~lit_diffac.backbones.dit.DiTBackbone` load with ``from_pretrained`` — the same code path as
SD1.5 / SD3.5 weights:

* ``toy-unet``: ``unet/`` (UNet2DConditionModel), ``scheduler/`` (DDIMScheduler), ``text_encoder/``
  (CLIPTextModel), ``tokenizer/`` (CLIPTokenizer) — the SD1.5 layout minus ``vae/``;
* ``toy-dit``: ``transformer/`` (SD3Transformer2DModel), ``scheduler/`` (FlowMatchEulerDiscreteScheduler),
  ``text_encoder/`` (CLIPTextModelWithProjection), ``tokenizer/`` — the SD3 layout with one text encoder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lit_diffac.backbones.base import DiffusionBackbone
from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.backbones.loading import PipelineComponents
from lit_diffac.backbones.unet import UNetBackbone
from lit_diffac.toy.text import text_config, write_tokenizer

Family = Literal["unet", "dit"]
IMAGE_SIZE = 16
TEXT_DIM = 64


def toy_unet(text_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """A ~1M-parameter conditional UNet on 16×16×1, cross-attention at 8×8."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def toy_dit(text_dim: int = TEXT_DIM) -> SD3Transformer2DModel:
    """A small MMDiT (SD3 blocks) on 16×16×1 with 2×2 patches."""
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=text_dim,
        caption_projection_dim=64, pooled_projection_dim=text_dim, pos_embed_max_size=IMAGE_SIZE // 2,
    )


def toy_ddim_scheduler() -> DDIMScheduler:
    """Linear-β DDPM noise schedule with the settings RL rollouts need (DESIGN §2)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing")


def toy_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_toy_backbone(family: Family, feature_taps=None) -> DiffusionBackbone:
    """A freshly initialised toy backbone (random weights; seed with ``torch.manual_seed`` first).

    Returns:
        a :class:`UNetBackbone` (``family="unet"``, tapping ``mid_block`` by default) or a
        :class:`DiTBackbone` (``"dit"``, tapping the last block), built from in-memory components (its
        ``pretrained`` is ``None``).
    """
    if family not in ("unet", "dit"):
        raise ValueError(f"family must be 'unet' or 'dit', got {family!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp)
    config = text_config(tokenizer, hidden_size=TEXT_DIM)
    if family == "unet":
        components = PipelineComponents(denoiser=toy_unet(), scheduler=toy_ddim_scheduler(),
                                        tokenizer=tokenizer, text_encoder=CLIPTextModel(config))
        return UNetBackbone.from_components(components, feature_taps=feature_taps or ("mid_block",))
    components = PipelineComponents(denoiser=toy_dit(), scheduler=toy_flow_scheduler(), tokenizer=tokenizer,
                                    text_encoder=CLIPTextModelWithProjection(config))
    return DiTBackbone.from_components(components, feature_taps=feature_taps or (-1,))


def save_pipeline(backbone: DiffusionBackbone, folder: str | Path, provenance: dict | None = None) -> Path:
    """Write a backbone's components as a diffusers pipeline folder (plus ``lit_diffac.json`` provenance)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    denoiser_dir = "unet" if isinstance(backbone, UNetBackbone) else "transformer"
    backbone.denoiser.save_pretrained(folder / denoiser_dir)
    backbone.scheduler.save_pretrained(folder / "scheduler")
    backbone.text_encoder.save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")  # vocab.json + merges.txt + tokenizer.json, as SD folders have
    if provenance is not None:
        (folder / "lit_diffac.json").write_text(json.dumps(provenance, indent=2))
    return folder
