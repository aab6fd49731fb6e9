"""Saving and loading critic heads as safetensors (value pretraining → actor-critic)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


def save_value_head(head: nn.Module, path: str | Path, **metadata) -> Path:
    """Write ``head``'s weights to ``path`` (safetensors) with its class and ``metadata`` in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"class": f"{type(head).__module__}.{type(head).__qualname__}",
              "metadata": json.dumps(metadata, default=str)}
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path), metadata=header)
    return path


def load_value_head(head: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by :func:`save_value_head` into ``head`` (same architecture), in place.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file's weights do not fit ``head`` (other taps, width or number of rewards).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no value-head file at {path} (write one with a ValuePretraining "
                                "recipe, e.g. recipes/toy/value_pretrain_dit.yaml)")
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        saved_class = (f.metadata() or {}).get("class", "?")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_from {path} (a {saved_class}) does not fit this value head "
                         f"({type(head).__name__}): different feature taps, width or number of rewards?\n{err}") \
            from None
    return head
