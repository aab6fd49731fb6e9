"""LoRA policies via peft, through diffusers' adapter integration."""

from __future__ import annotations

from typing import Sequence

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def apply_lora(denoiser: nn.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] = DEFAULT_TARGETS, adapter_name: str = "policy") -> None:
    """Freeze ``denoiser`` and add a trainable LoRA adapter of ``rank`` on the ``targets`` modules.

    ``alpha`` defaults to ``rank`` (scale 1).  The LoRA up-projections start at zero, so the adapted
    model equals the base model at initialisation.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights="gaussian", target_modules=list(targets))
    denoiser.add_adapter(config, adapter_name=adapter_name)
