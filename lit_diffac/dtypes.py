"""Dtype names in recipes (``"bfloat16"``, ``"bf16"``, ``"fp32"``, …) → torch dtypes: the one parser."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (case-insensitive;
    ``None`` stays ``None``)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16 "
                         f"(or {', '.join(sorted(set(DTYPES) - {'float32', 'float16', 'bfloat16'}))})") from None
