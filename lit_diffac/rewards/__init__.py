"""Rewards: batched, gradient-free scorers ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``.

See :mod:`lit_diffac.rewards.base` for the protocol and :class:`Reward` for the base class, and
``docs/rewards.md`` for the published scorers, their weights and how to write a new reward.

The published scorers (CLIP score, PickScore, aesthetic, HPSv2, ImageReward, OCR, remote) are imported
lazily, on first access, so that ``import lit_diffac.rewards`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from lit_diffac.rewards.base import CallableReward, Reward, RewardFn, as_reward
from lit_diffac.rewards.image import Brightness, JpegCompressibility, JpegIncompressibility
from lit_diffac.rewards.toy import DigitAlignment, IndependentDigitJudge, PairAlignment

#: Lazily imported public names → their module.
_LAZY = {
    "CLIPScore": "lit_diffac.rewards.clip",
    "PickScore": "lit_diffac.rewards.clip",
    "LaionAesthetic": "lit_diffac.rewards.clip",
    "ClipImagePreprocess": "lit_diffac.rewards.clip",
    "WeightsNotFoundError": "lit_diffac.rewards.clip",
    "HPSv2": "lit_diffac.rewards.hps",
    "ImageReward": "lit_diffac.rewards.image_reward",
    "ImageRewardModel": "lit_diffac.rewards.image_reward",
    "OCRReward": "lit_diffac.rewards.ocr",
    "RemoteReward": "lit_diffac.rewards.remote",
    "RewardServer": "lit_diffac.rewards.server",
}

__all__ = [
    "Reward",
    "RewardFn",
    "CallableReward",
    "as_reward",
    # image statistics (hackable)
    "Brightness",
    "JpegCompressibility",
    "JpegIncompressibility",
    # toy world
    "DigitAlignment",
    "IndependentDigitJudge",
    "PairAlignment",
    # published scorers (local weights) and remote scoring
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
