"""Helpers for Lightning's sharded strategies (FSDP): which modules become one shard unit.

Recipes name :func:`diffusion_block_wrap_policy` by import path
(``auto_wrap_policy: lit_diffac.distributed.diffusion_block_wrap_policy``; see ``recipes/strategies/fsdp.yaml``).
DDP needs nothing here: the modules gather rewards and advantage statistics across processes themselves.
"""

from __future__ import annotations

from torch import nn


def _block_types() -> tuple[type, ...]:
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                                       UNetMidBlock2DCrossAttn, UpBlock2D)

    return (JointTransformerBlock, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
            UpBlock2D, UNetMidBlock2DCrossAttn)


def is_diffusion_block(module: nn.Module) -> bool:
    """Whether ``module`` is one SD3 joint block or one SD1.5 UNet down / mid / up block."""
    return isinstance(module, _block_types())


def diffusion_block_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy (the ``(module, recurse, nonwrapped_numel) → bool`` form): one unit per denoiser block.

    While recursing every child is visited; a module is wrapped when it is a block (:func:`is_diffusion_block`).
    """
    return True if recurse else is_diffusion_block(module)
