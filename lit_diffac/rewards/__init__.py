"""Rewards: batched, gradient-free scorers ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``.

See :mod:`lit_diffac.rewards.base` for the protocol and :class:`Reward` for the base class.
"""

from lit_diffac.rewards.base import CallableReward, Reward, RewardFn, as_reward
from lit_diffac.rewards.image import Brightness, JpegCompressibility, JpegIncompressibility
from lit_diffac.rewards.toy import DigitAlignment

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
]
