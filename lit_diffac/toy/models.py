"""Architectures of the two embedded toy text-to-image models, in real diffusers formats.

Both work in pixel space on 16×16 grey digits (no VAE: the "latent" is the image in [-1, 1]; the two-digit task's
``toy-pairs-*`` models, on 16×32 canvases: :mod:`lit_diffac.toy.pairs`) and are
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

from lit_diffac.backbones.base import NATIVE_SIZE_KEY, DiffusionBackbone
from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.backbones.loading import PipelineComponents
from lit_diffac.backbones.unet import UNetBackbone
from lit_diffac.toy.text import text_config, write_tokenizer

Family = Literal["unet", "dit"]
Task = Literal["digits", "pairs"]
IMAGE_SIZE = 16
TEXT_DIM = 64


def toy_unet(text_dim: int = TEXT_DIM, sample_size: int | tuple[int, int] = IMAGE_SIZE) -> UNet2DConditionModel:
    """A ~1M-parameter conditional UNet on 16×16×1 (or ``sample_size`` ``(H, W)``), cross-attention at half size."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def toy_dit(text_dim: int = TEXT_DIM, sample_size: int | tuple[int, int] = IMAGE_SIZE) -> SD3Transformer2DModel:
    """A small MMDiT (SD3 blocks) on 16×16×1 with 2×2 patches.

    A non-square ``sample_size`` ``(H, W)`` (``SD3Transformer2DModel`` takes only a side) is recorded in the config
    under :data:`~lit_diffac.backbones.base.NATIVE_SIZE_KEY`, with positional embeddings for the longer side.
    """
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    model = SD3Transformer2DModel(
        sample_size=height, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=text_dim,
        caption_projection_dim=64, pooled_projection_dim=text_dim, pos_embed_max_size=max(height, width) // 2,
    )
    if height != width:
        model.register_to_config(**{NATIVE_SIZE_KEY: [height, width]})
    return model


def toy_ddim_scheduler() -> DDIMScheduler:
    """Linear-β DDPM noise schedule with the settings RL rollouts need (DESIGN §2)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing")


def toy_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def task_words(task: Task) -> list[str]:
    """The tokenizer vocabulary of a toy task: every word of its prompt templates."""
    if task == "digits":
        from lit_diffac.toy.prompts import vocabulary

        return vocabulary()
    if task == "pairs":
        from lit_diffac.toy.pairs import pair_vocabulary

        return pair_vocabulary()
    raise ValueError(f"task must be 'digits' or 'pairs', got {task!r}")


def build_toy_backbone(family: Family, feature_taps=None, task: Task = "digits") -> DiffusionBackbone:
    """A freshly initialised toy backbone (random weights; seed with ``torch.manual_seed`` first).

    Args:
        family: ``"unet"`` or ``"dit"``.
        feature_taps: the value head's taps (default: ``mid_block`` / the last block).
        task: ``"digits"`` (16×16 images, the single-digit vocabulary) or ``"pairs"`` (16×32 two-digit canvases,
            the pair templates' vocabulary; :mod:`lit_diffac.toy.pairs`).

    Returns:
        a :class:`UNetBackbone` (``family="unet"``, tapping ``mid_block`` by default) or a
        :class:`DiTBackbone` (``"dit"``, tapping the last block), built from in-memory components (its
        ``pretrained`` is ``None``).
    """
    if family not in ("unet", "dit"):
        raise ValueError(f"family must be 'unet' or 'dit', got {family!r}")
    words = task_words(task)
    size = IMAGE_SIZE if task == "digits" else (IMAGE_SIZE, 2 * IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp, words)
    config = text_config(tokenizer, hidden_size=TEXT_DIM)
    if family == "unet":
        components = PipelineComponents(denoiser=toy_unet(sample_size=size), scheduler=toy_ddim_scheduler(),
                                        tokenizer=tokenizer, text_encoder=CLIPTextModel(config))
        return UNetBackbone.from_components(components, feature_taps=feature_taps or ("mid_block",))
    components = PipelineComponents(denoiser=toy_dit(sample_size=size), scheduler=toy_flow_scheduler(),
                                    tokenizer=tokenizer, text_encoder=CLIPTextModelWithProjection(config))
    return DiTBackbone.from_components(components, feature_taps=feature_taps or (-1,))


def save_pipeline(backbone: DiffusionBackbone, folder: str | Path, provenance: dict | None = None,
                  task: Task = "digits") -> Path:
    """Write a backbone's components as a diffusers pipeline folder (plus ``lit_diffac.json`` provenance);
    ``task`` names the tokenizer vocabulary the backbone was built with."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    denoiser_dir = "unet" if isinstance(backbone, UNetBackbone) else "transformer"
    backbone.denoiser.save_pretrained(folder / denoiser_dir)
    backbone.scheduler.save_pretrained(folder / "scheduler")
    backbone.text_encoder.save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", task_words(task))  # vocab.json + merges.txt + tokenizer.json
    if provenance is not None:
        (folder / "lit_diffac.json").write_text(json.dumps(provenance, indent=2))
    return folder
