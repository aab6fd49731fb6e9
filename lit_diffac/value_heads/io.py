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

    The file is read with safetensors (no pickle: nothing in it can run code).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file's weights do not fit ``head`` (other taps, width or number of rewards).
        lit_diffac.checkpoints.CorruptCheckpointError: the file is not a readable safetensors file (truncated,
            damaged, or another format such as a pickle) or holds non-finite weights.
    """
    from safetensors import SafetensorError

    from lit_diffac.checkpoints import CorruptCheckpointError

    fix = "write it again with the ValuePretraining recipe that made it, or drop init_from"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no value-head file at {path} (write one with a ValuePretraining "
                                "recipe, e.g. recipes/toy/value_pretrain_dit.yaml)")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            saved_class = (f.metadata() or {}).get("class", "?")
    except (SafetensorError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise CorruptCheckpointError(f"init_from {path} is corrupt or truncated, or not a safetensors file "
                                     f"({reason}); {fix}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CorruptCheckpointError(f"init_from {path} is corrupt (non-finite values in {bad[0]}"
                                     f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}); {fix}")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_from {path} (a {saved_class}) does not fit this value head "
                         f"({type(head).__name__}): different feature taps, width or number of rewards?\n{err}") \
            from None
    return head
