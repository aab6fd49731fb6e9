"""Backbones: the diffusion policy networks, which also provide the critic's features."""

from lit_diffac.backbones.base import BackboneOutput, DiffusionBackbone, PromptEmbeds
from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.backbones.unet import UNetBackbone

__all__ = ["DiffusionBackbone", "BackboneOutput", "PromptEmbeds", "UNetBackbone", "DiTBackbone"]
