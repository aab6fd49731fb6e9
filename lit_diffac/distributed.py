"""Several processes: gathering across them, agreeing, and sharding an RL module with FSDP.

Under DDP and FSDP the RL modules gather rewards and advantage statistics with :func:`gather_processes` and skip
non-finite updates together with :func:`all_processes`.

FSDP (``recipes/strategies/fsdp.yaml``, Lightning's ``FSDPStrategy``): an RL module's ``configure_model`` calls
:func:`shard_module`, which makes the denoiser one FSDP unit with one nested unit per block
(:func:`diffusion_block_wrap_policy`) and the value head another, and leaves the LightningModule itself unwrapped
(Lightning then does not wrap it either).  Wrapping the whole LightningModule, Lightning's default, does not fit
an RL module: its own parameters would be whole only inside its ``forward`` (``training_step``), while the
held-out evaluation runs from callbacks.  Gradients of sharded parameters are shards, so each group's norm for
clipping is summed over the processes (:func:`clip_grad_norm`).  ``tests/test_fsdp.py`` runs all of it with two
CPU processes.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

#: Attribute that :func:`shard_module` sets on each parameter whose gradient FSDP shards: the process group
#: over which the shards are spread (each gradient element then lives in exactly one of its processes).
SHARD_GROUP_ATTR = "_lit_diffac_shard_group"


def _block_types() -> tuple[type, ...]:
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                                       UNetMidBlock2DCrossAttn, UpBlock2D)

    return (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock, CrossAttnDownBlock2D,
            CrossAttnUpBlock2D, DownBlock2D, UpBlock2D, UNetMidBlock2DCrossAttn)


def is_diffusion_block(module: nn.Module) -> bool:
    """Whether ``module`` is one SD3 joint block, one FLUX double- or single-stream block, or one UNet down / mid /
    up block (SD1.5, SDXL)."""
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


def shard_module(module: nn.Module) -> None:
    """Wrap an RL module's denoiser and value head in FSDP units: its ``configure_model`` under ``FSDPStrategy``.

    Lightning calls ``configure_model`` inside the strategy's ``model_sharded_context``, whose settings
    (sharding strategy, mixed precision, ``use_orig_params=True``, ...) ``torch.distributed.fsdp.wrap.wrap``
    applies.  The denoiser becomes one unit with a nested unit per block (:func:`diffusion_block_wrap_policy`),
    the value head its own unit; the frozen text encoders, VAE and rewards stay whole on every process, as
    under DDP.  Feature taps keep working (their hooks sit on the blocks inside the units), and LoRA needs
    ``use_orig_params=True`` (frozen and trainable weights in one unit), which Lightning sets.  Each parameter
    whose gradient becomes a shard is marked (:data:`SHARD_GROUP_ATTR`) for :func:`clip_grad_norm`.

    Outside ``FSDPStrategy`` (no ``enable_wrap`` context) nothing changes; a second call (another ``fit``) does
    nothing.  Raises ``RuntimeError`` if a trainable parameter is left outside every unit (its gradient would
    not be averaged over the processes).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import wrap

    backbone = module.backbone
    if isinstance(backbone.denoiser, FullyShardedDataParallel):
        return
    denoiser = wrap(backbone.denoiser, auto_wrap_policy=diffusion_block_wrap_policy)
    if denoiser is backbone.denoiser:  # not inside FSDPStrategy's model_sharded_context
        return
    backbone.denoiser = denoiser
    if getattr(module, "value_head", None) is not None:
        module.value_head = wrap(module.value_head, auto_wrap_policy=None)
    units = FullyShardedDataParallel.fsdp_modules(module)  # outer units before the units nested in them
    owner = {}
    for unit in units:
        for param in unit.parameters():
            owner[param] = unit
    outside = [name for name, p in module.named_parameters() if p.requires_grad and p not in owner]
    if outside:
        raise RuntimeError(f"FSDP: trainable parameters outside every FSDP unit (their gradients would not be "
                           f"averaged over the processes): {outside[:5]}")
    for param, unit in owner.items():
        sharded = unit.sharding_strategy != ShardingStrategy.NO_SHARD
        setattr(param, SHARD_GROUP_ATTR, unit.process_group if sharded else None)


def is_sharded(module: nn.Module) -> bool:
    """Whether :func:`shard_module` has wrapped ``module``'s denoiser in FSDP (its checkpoints then hold every
    weight, frozen ones included, written and read by the strategy)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(getattr(getattr(module, "backbone", None), "denoiser", None), FullyShardedDataParallel)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of ``params`` in place to a total L2 norm of ``max_norm`` (``None``: no clipping);
    return the total norm before clipping (0.0 when no parameter has a gradient).

    Plain parameters: ``torch.nn.utils.clip_grad_norm_``.  Parameters marked by :func:`shard_module` hold only
    this process's shard of their gradient, so their squared norms are summed over the shard group's processes
    first; every process then clips by the same, whole-gradient norm (as DDP's clipping would).  Must then be
    called by every process (it all-reduces, even where this process holds no gradient of ``params``).
    """
    import torch.distributed as dist

    params = list(params)
    groups: dict = {}  # process group → its sharded parameters, in the order met (the same on every process)
    plain = []
    for p in params:
        group = getattr(p, SHARD_GROUP_ATTR, None)
        if group is None:
            plain.append(p)
        else:
            groups.setdefault(group, []).append(p)
    if not groups:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm if max_norm is not None else float("inf")))
    grads = [p.grad for p in params if p.grad is not None]
    device = next(iter(groups.values()))[0].device
    if device.type == "cpu" and dist.get_backend(next(iter(groups))) == "nccl":  # CPU-offloaded parameters
        device = torch.device("cuda", torch.cuda.current_device())
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for group, members in groups.items():
        local = torch.zeros((), dtype=torch.float32, device=device)
        for p in members:
            if p.grad is not None:
                local += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square().to(device)
        dist.all_reduce(local, group=group)
        squares += local
    for p in plain:
        if p.grad is not None:
            squares += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square().to(device)
    total = squares.sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coef.to(grad.device, grad.dtype))
    return float(total)
