"""Shared fixtures: tiny toy pipelines in real diffusers formats, saved and loaded back like real weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test models are tiny: one thread is faster than two here (less threading overhead) and deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised toy UNet and DiT pipeline folders (``save_pretrained`` → tmp)."""
    from lit_diffac.toy.models import build_toy_backbone, save_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    return {family: save_pipeline(build_toy_backbone(family), root / family) for family in ("unet", "dit")}


@pytest.fixture
def unet_backbone(toy_pipelines):
    from lit_diffac.backbones.unet import UNetBackbone

    return UNetBackbone(str(toy_pipelines["unet"]))


@pytest.fixture
def dit_backbone(toy_pipelines):
    from lit_diffac.backbones.dit import DiTBackbone

    return DiTBackbone(str(toy_pipelines["dit"]))


@pytest.fixture(params=["unet", "dit"])
def backbone(request, toy_pipelines):
    """Each toy backbone in turn, freshly loaded from its folder."""
    from lit_diffac.backbones.dit import DiTBackbone
    from lit_diffac.backbones.unet import UNetBackbone

    cls = UNetBackbone if request.param == "unet" else DiTBackbone
    return cls(str(toy_pipelines[request.param]))


@pytest.fixture
def digit_reward():
    from lit_diffac.rewards.toy import DigitAlignment

    return DigitAlignment()


@pytest.fixture(scope="session")
def sd_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny random SD1.5- and SD3-format pipeline folders (``StableDiffusion*Pipeline.save_pretrained``)."""
    from lit_diffac.tiny_pipelines import save_sd3_pipeline, save_sd15_pipeline

    root = tmp_path_factory.mktemp("sd_pipelines")
    return {"sd15": save_sd15_pipeline(root / "sd15"), "sd3": save_sd3_pipeline(root / "sd3")}
