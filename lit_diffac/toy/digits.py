"""scikit-learn's 8×8 handwritten digits, upsampled, with a fixed train / held-out split.

The data ships inside scikit-learn (no download).  Images are returned as float tensors
``[N, 1, S, S]`` in ``[-1, 1]`` (diffusion convention) and labels ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: The split is fixed: it never depends on a run's seed.
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``[N, 1, S, S]`` in [-1, 1] and labels ``[N]`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


def upsample(images_8x8: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of ``[N, 1, 8, 8]`` images to ``[N, 1, size, size]``."""
    if size == images_8x8.shape[-1]:
        return images_8x8
    return F.interpolate(images_8x8, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(split: str = "train", size: int = 16) -> DigitsSplit:
    """Load a split (``"train"`` or ``"heldout"``) of the digits at ``size × size`` pixels.

    The split is stratified by label with a fixed seed, 80 % train / 20 % held-out.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    heldout_idx = []
    for label in range(10):
        idx = np.flatnonzero(data.target == label)
        n_heldout = int(round(len(idx) * HELDOUT_FRACTION))
        heldout_idx.extend(rng.choice(idx, size=n_heldout, replace=False).tolist())
    mask = np.zeros(len(data.target), dtype=bool)
    mask[heldout_idx] = True
    keep = mask if split == "heldout" else ~mask
    pixels = torch.from_numpy(data.images[keep].astype(np.float32) / 16.0)  # [N, 8, 8] in [0, 1]
    images = upsample(pixels[:, None], size) * 2.0 - 1.0
    labels = torch.from_numpy(data.target[keep].astype(np.int64))
    return DigitsSplit(images=images.clamp(-1.0, 1.0), labels=labels)
