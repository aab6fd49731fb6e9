"""Prompt-independent image statistics used as rewards.

These are cheap, deterministic and *deliberately hackable*: optimising them alone produces blank, flat or
noisy images, which is how the toy recipes demonstrate reward hacking and its multi-reward mitigation.

* :class:`Brightness` — mean pixel intensity in ``[0, 1]``.
* :class:`JpegCompressibility` — minus the JPEG size in kB (the DDPO convention: higher is more
  compressible).
* :class:`JpegIncompressibility` — plus the JPEG size in kB.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_diffac.rewards.base import Reward

__all__ = ["Brightness", "JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


class Brightness(Reward):
    """Mean pixel intensity over channels and pixels, in ``[0, 1]`` (1: an all-white image).

    Args:
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "brightness"

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG-encode each image with PIL and return the file sizes in kB (1 kB = 1000 bytes).

    Args:
        images: ``[B, 3, H, W]`` float in ``[0, 1]``; converted to uint8 by ``round(x * 255)``.
        quality: PIL JPEG quality (1–95).

    Returns:
        ``[B]`` float32 on the CPU.
    """
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """Minus the JPEG file size in kB at ``quality`` (DDPO's compressibility reward; higher is smaller).

    Args:
        quality: PIL JPEG quality (1–95; DDPO uses 95).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        if not 1 <= quality <= 95:
            raise ValueError(f"quality must be in [1, 95], got {quality}")
        self.quality = quality

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        return -jpeg_size_kb(images, self.quality)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}"


class JpegIncompressibility(JpegCompressibility):
    """The JPEG file size in kB at ``quality`` (DDPO's incompressibility reward; higher is larger).

    Args:
        quality: PIL JPEG quality (1–95; DDPO uses 95).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "jpeg_incompressibility"

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        return jpeg_size_kb(images, self.quality)
