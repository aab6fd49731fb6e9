"""LoRA policies (and an optional critic adapter) via peft, through diffusers' adapter integration."""

from __future__ import annotations

import contextlib
from typing import Sequence

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def apply_lora(denoiser: nn.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] = DEFAULT_TARGETS, adapter_name: str = "policy") -> None:
    """Freeze ``denoiser``'s base weights and add a trainable float32 LoRA adapter of ``rank`` on ``targets``.

    ``alpha`` defaults to ``rank`` (scale 1).  The LoRA up-projections start at zero, so the adapted
    model equals the base model at initialisation.  A second call adds a second adapter (e.g. ``"critic"``);
    every adapter added so far stays trainable and the ``"policy"`` adapter (if any) stays the active one.
    The adapter weights are float32 whatever the base weights' dtype (mixed precision keeps them exact).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for name, param in denoiser.named_parameters():
        if "lora_" not in name:
            param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights="gaussian", target_modules=list(targets))
    denoiser.add_adapter(config, adapter_name=adapter_name)
    for name, param in denoiser.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    names = adapter_names(denoiser)
    _set_active(denoiser, ["policy"] if "policy" in names else [adapter_name])


def adapter_names(denoiser: nn.Module) -> list[str]:
    """Names of the LoRA adapters on ``denoiser`` (from its parameter names)."""
    found = []
    for name, _ in denoiser.named_parameters():
        if ".lora_A." in name:
            adapter = name.split(".lora_A.")[1].split(".")[0]
            if adapter not in found:
                found.append(adapter)
    return found


def _set_active(denoiser: nn.Module, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters (none: the base model); every adapter stays trainable."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            if names:
                module.enable_adapters(True)
                module.set_adapter(names)
            else:
                module.enable_adapters(False)
            for n, p in module.named_parameters():  # peft's set_adapter freezes inactive adapters: undo that
                if "lora_" in n:
                    p.requires_grad_(True)


def adapters_disabled(denoiser: nn.Module) -> bool:
    """Whether the adapters are switched off (``denoiser.disable_adapters()``: the reference policy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is not None and bool(layer.disable_adapters)


@contextlib.contextmanager
def active_adapters(denoiser: nn.Module, names: list[str]):
    """Within the block only the adapters ``names`` act (``[]``: the base model); the previous state after.

    The previous state is the policy adapter alone, or no adapter when they were disabled.
    """
    restore = [] if adapters_disabled(denoiser) or "policy" not in adapter_names(denoiser) else ["policy"]
    _set_active(denoiser, names)
    try:
        yield
    finally:
        _set_active(denoiser, restore)


def lora_parameter_count(denoiser: nn.Module, adapter: str) -> int:
    """Number of weights of one adapter (for logs and the memory table)."""
    return sum(p.numel() for n, p in denoiser.named_parameters() if f".{adapter}." in n and "lora_" in n)


__all__ = ["DEFAULT_TARGETS", "apply_lora", "active_adapters", "adapter_names", "adapters_disabled",
           "lora_parameter_count"]
