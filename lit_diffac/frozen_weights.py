"""Checkpoints that hold only what training changes.

An RL module's ``state_dict`` is mostly weights no optimiser touches: the text encoders, the VAE, the reward
models and — with a LoRA policy — the denoiser's base weights (about 17 GB for SD3.5-Medium with T5).  A
checkpoint keeps none of them: :func:`strip_frozen` removes them from the checkpoint's ``state_dict`` and stores a
SHA-256 of the backbone's frozen weights instead; on resume, sampling or export the recipe loads them again from
its pipeline folder, and :func:`restore_frozen` refuses a checkpoint whose hash differs from the loaded weights
(another base model, or the same name with other weights) before filling them back in.

What is kept: the trainable parameters (the LoRA adapters, or the whole denoiser of a full fine-tune; a critic
adapter), the value head and every other state of the module (e.g. the reward normaliser's statistics).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch import nn

from lit_diffac.errors import CheckpointMismatchError
from lit_diffac.resume import check_compatible

#: Key, in lit_diffac's section of a checkpoint, of the frozen-weights record.
FROZEN_KEY = "frozen_weights"


def frozen_keys(module: nn.Module, trainable: list[nn.Parameter]) -> list[str]:
    """``state_dict`` keys of ``module``'s backbone and rewards that are not in ``trainable``.

    Args:
        module: an RL module with ``backbone`` and ``rewards`` children.
        trainable: the parameters the optimisers update (policy, critic adapter).

    Returns:
        the keys, in ``state_dict`` order (parameters and buffers of the frozen parts).
    """
    trainable_ids = {id(p) for p in trainable}
    keys = []
    for prefix in ("backbone", "rewards"):
        child = getattr(module, prefix, None)
        if child is None:
            continue
        params = dict(child.named_parameters(remove_duplicate=False))
        for name in child.state_dict(keep_vars=True):
            if name not in params or id(params[name]) not in trainable_ids:
                keys.append(f"{prefix}.{name}")
    return keys


def weights_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``tensors``' names, dtypes, shapes and bytes, in sorted name order (device-independent)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_weights_hash(module: nn.Module, keys: list[str]) -> str:
    """:func:`weights_hash` of the backbone's frozen weights (reward models are not hashed), cached on ``module``:
    frozen weights do not change during a run."""
    backbone = [k for k in keys if k.startswith("backbone.")]
    cache = getattr(module, "_base_weights_hash", None)
    if cache is None or cache[0] != backbone:
        state = module.state_dict()
        cache = (backbone, weights_hash({k: state[k] for k in backbone}))
        module._base_weights_hash = cache
    return cache[1]


def strip_frozen(state_dict: dict[str, Any], module: nn.Module, trainable: list[nn.Parameter]) -> dict[str, Any]:
    """Remove the frozen entries from a checkpoint's ``state_dict`` (in place); return the record to store.

    Returns:
        ``{"keys": number of removed entries, "sha256": hash of the backbone's frozen weights,
        "pretrained": the backbone's pipeline name or None}``.
    """
    keys = frozen_keys(module, trainable)
    for key in keys:
        state_dict.pop(key, None)
    return {"keys": len(keys), "sha256": base_weights_hash(module, keys),
            "pretrained": getattr(getattr(module, "backbone", None), "pretrained", None)}


def restore_frozen(state_dict: dict[str, Any], record: Mapping[str, Any] | None, module: nn.Module,
                   trainable: list[nn.Parameter], source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Check a checkpoint's ``state_dict`` against ``module``, then fill the frozen weights in (in place), so
    that a strict ``load_state_dict`` restores exactly what was saved.

    Args:
        state_dict: the checkpoint's ``state_dict``.
        record: what :func:`strip_frozen` stored; ``None`` for a full checkpoint (older runs): checked as it is.
        module, trainable: as :func:`frozen_keys`.
        source: the checkpoint's path, for messages.
        ignore_prefixes: keys that may be missing (see :func:`~lit_diffac.resume.check_compatible`).

    Raises:
        CheckpointMismatchError: the checkpoint is of another model (other trainable tensors), or its base
            weights' hash differs from the frozen weights loaded here.
    """
    keys = frozen_keys(module, trainable) if record is not None else []
    skip = set(keys)
    check_compatible({k: v for k, v in module.state_dict().items() if k not in skip}, state_dict, source,
                     ignore_prefixes)
    if record is None:
        return
    found = base_weights_hash(module, keys)
    if found != record["sha256"]:
        trained_on = record.get("pretrained") or "in-memory components"
        here = getattr(getattr(module, "backbone", None), "pretrained", None) or "in-memory components"
        raise CheckpointMismatchError(
            f"checkpoint {source} holds only trained weights, made for other base weights than this recipe loads "
            f"(trained on {trained_on!r}, base-weights SHA-256 {record['sha256'][:12]}…; loaded here: {here!r}, "
            f"{found[:12]}…). Point the recipe's backbone `pretrained` at the pipeline the run was trained on "
            "(its config.yaml sits next to the checkpoints/ folder)")
    current = module.state_dict()
    for key in keys:
        state_dict.setdefault(key, current[key])
