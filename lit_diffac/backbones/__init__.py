"""Backbones: the diffusion policy networks, which also provide the critic's features.

:mod:`lit_diffac.backbones.loading` finds and loads pipeline folders / hub ids into
:class:`PipelineComponents`; the backbone classes take either a pipeline name or such components as
``pretrained``.
"""

from lit_diffac.backbones.base import BackboneOutput, DiffusionBackbone, PromptEmbeds
from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.backbones.flux import FluxBackbone, load_flux_components
from lit_diffac.backbones.loading import PipelineComponents, load_dit_components, load_unet_components
from lit_diffac.backbones.sdxl import SDXLBackbone, load_sdxl_components
from lit_diffac.backbones.unet import UNetBackbone

__all__ = ["DiffusionBackbone", "BackboneOutput", "PromptEmbeds", "UNetBackbone", "SDXLBackbone", "DiTBackbone",
           "FluxBackbone", "PipelineComponents", "load_dit_components", "load_unet_components", "load_sdxl_components",
           "load_flux_components"]
