"""Several processes: gathering across them, agreeing, and which modules become one FSDP shard unit.

Recipes name :func:`diffusion_block_wrap_policy` by import path
(``auto_wrap_policy: lit_diffac.distributed.diffusion_block_wrap_policy``; see ``recipes/strategies/fsdp.yaml``).
Under DDP the RL modules gather rewards and advantage statistics with :func:`gather_processes` and skip
non-finite updates together with :func:`all_processes`.
"""

from __future__ import annotations

import torch
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


def gather_processes(module, x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over a LightningModule's processes along dim 0 (identity on one process or without
    a Trainer)."""
    if module._trainer is None or module.trainer.world_size == 1:
        return x
    return module.all_gather(x).flatten(0, 1)


def all_processes(module, ok: bool) -> bool:
    """Whether ``ok`` holds in every process of a LightningModule's Trainer (``ok`` itself on one process)."""
    if module._trainer is None or module.trainer.world_size == 1:
        return ok
    return bool(module.trainer.strategy.reduce_boolean_decision(ok, all=True))
