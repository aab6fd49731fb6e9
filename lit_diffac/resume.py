"""Exact resume: the training state Lightning's checkpoint does not carry by itself, in a ``weights_only`` form.

Lightning's checkpoint already holds the module's ``state_dict`` (policy / LoRA, critic, the reward
normaliser's running statistics, which are buffers), both optimisers, the schedulers and the loop counters.
An RL module additionally needs, to continue *bit for bit*:

* the run's :class:`~lit_diffac.history.RunHistory` (``samples_seen``, the held-out evaluations, the recent training
  metrics behind ``summary.json``) and the :class:`~lit_diffac.faults.NonFiniteGuard` counters;
* the advantage estimator's own state (DDPO's per-prompt reward buffers);
* the critic replay (cached features and value targets of the last iterations; ``CriticReplay(checkpoint=...)``);
* the global random number generators (rollout and minibatch randomness is drawn from generators seeded
  by (seed, iteration, rank) and needs none, but user code, dropout or a reward may use the global ones).

Everything is stored as tensors, numbers, strings, lists and dicts, so checkpoints load with
``torch.load(..., weights_only=True)``.  :func:`check_compatible` turns a checkpoint of another model into
one clear error.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

from lit_diffac.errors import CheckpointMismatchError

#: Key of lit_diffac's own section in a Lightning checkpoint.
CHECKPOINT_KEY = "lit_diffac"


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, every CUDA device, NumPy, Python) as ``weights_only``-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s output (CUDA only if it was saved and is present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def estimator_state(estimator: Any) -> dict[str, Any] | None:
    """``estimator.state_dict()`` when the estimator keeps state across iterations, else ``None``."""
    getter = getattr(estimator, "state_dict", None)
    return getter() if callable(getter) else None


def training_state(module: Any) -> dict[str, Any]:
    """An RL module's resume state beyond its ``state_dict`` and optimisers (see the module docstring).

    Reads the module's public parts: ``history`` (:class:`~lit_diffac.history.RunHistory`), ``estimator``,
    ``faults`` (:class:`~lit_diffac.faults.NonFiniteGuard`) and ``critic_replay``.
    """
    replay = module.critic_replay
    return {
        **module.history.state_dict(),
        "estimator": estimator_state(module.estimator),
        **module.faults.state_dict(),
        "critic_replay": replay.state_dict() if replay is not None and len(replay) and replay.checkpoint else None,
        "rng": capture_rng_state(),
    }


def load_training_state(module: Any, state: Mapping[str, Any], rng: bool = True) -> None:
    """Put :func:`training_state`'s output back into ``module`` (and, if ``rng``, the global RNGs)."""
    module.history.load_state_dict(state)
    if state["estimator"] is not None:
        module.estimator.load_state_dict(state["estimator"])
    module.faults.load_state_dict(state)
    if state.get("critic_replay") is not None and module.critic_replay is not None:
        module.critic_replay.load_state_dict(state["critic_replay"])
    if rng:
        restore_rng_state(state["rng"])


def check_compatible(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], source: str,
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``found`` has ``expected``'s keys with the same shapes.

    Args:
        expected: the model's own ``state_dict()``.
        found: the checkpoint's ``state_dict``.
        source: the checkpoint's path (for the message).
        ignore_prefixes: keys allowed to be missing from the checkpoint (e.g. ``"rewards."`` when sampling).
    """
    missing = [k for k in expected if k not in found and not k.startswith(ignore_prefixes)]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and torch.is_tensor(found[k])
              and tuple(found[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"tensors missing: {len(missing)}, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"not in this model: {len(unexpected)}, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"with another shape: {len(shapes)}, e.g. {k} {list(found[k].shape)} in the checkpoint vs "
                     f"{list(expected[k].shape)} here")
    raise CheckpointMismatchError(
        f"checkpoint {source} was written by a different model ({'; '.join(parts)}). Use the recipe that wrote it "
        "(its config.yaml sits next to the checkpoints/ folder), or start without this checkpoint")
