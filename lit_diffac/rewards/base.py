"""The reward protocol (DESIGN §8).

Every reward is a batched, gradient-free :class:`torch.nn.Module`::

    reward(images, prompts, **metadata) -> scores

with ``images`` a float tensor ``[B, 3, H, W]`` with values in ``[0, 1]``, ``prompts`` a list of ``B``
strings, and ``scores`` a float32 tensor ``[B]`` on the images' device.  Each reward has a ``name``,
which the training modules use in its metric keys (``reward/<name>_mean``, ``reward/<name>_std`` per
iteration, ``eval/<name>`` in held-out evaluations).

Subclasses implement only :meth:`Reward.score`; :meth:`Reward.forward` does the rest (input checks,
device placement, chunking into ``batch_size`` pieces, ``no_grad``, output checks, and a
:class:`ConstantRewardWarning`, once per reward, when every image of a batch gets the same score).  A plain function
becomes a reward with :class:`CallableReward` or :func:`as_reward`.
"""

from __future__ import annotations

import abc
import importlib
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from lit_diffac.errors import RewardOutputError

__all__ = ["Reward", "CallableReward", "as_reward", "RewardFn", "ConstantRewardWarning"]

#: Signature of a plain reward function: ``fn(images [B,3,H,W] in [0,1], prompts, **metadata) -> [B]``.
RewardFn = Callable[..., Tensor]

#: Tolerance on the ``[0, 1]`` range of input images (decoders overshoot slightly).
RANGE_TOLERANCE = 1e-3


class ConstantRewardWarning(UserWarning):
    """A reward gave every image of a batch (two or more images) the same score: no learning signal."""


class Reward(torch.nn.Module, abc.ABC):
    """Base class of all rewards: a batched, gradient-free scorer of (image, prompt) pairs.

    Args:
        name: metric key of the reward (logged as ``reward/<name>``); defaults to the class'
            :attr:`default_name`.
        batch_size: largest chunk of images passed to :meth:`score` at once (``None``: the whole batch).
            Chunking only bounds memory; the scores do not depend on it.
        device: where scoring runs (e.g. ``"cuda:1"`` to put a heavy scorer on its own GPU); ``None``
            scores on the images' device.  The module's parameters and buffers are moved there.

    Calling the reward (:meth:`forward`) returns float32 scores ``[B]`` on the *input images'* device.
    When every finite score of a batch of two or more images is the same, it warns once per reward
    (:class:`ConstantRewardWarning`): all advantages are then 0 and the policy learns nothing from it, which
    usually means the reward does not apply to these images (e.g. a colour reward on grey images).
    Non-finite scores (NaN, ±inf) are passed through unchanged: the training loop decides how to treat
    them (it skips that iteration's update and counts it in ``fault/skipped_iterations``; several in a row
    stop the run with a checkpoint), so a single failed sample does not abort scoring of the batch.
    """

    #: Metric key used when no ``name`` is given.  Subclasses override it.
    default_name: str = "reward"

    def __init__(self, name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        self.name: str = name or self.default_name
        self.batch_size = batch_size
        self.device_override: torch.device | None = torch.device(device) if device is not None else None
        self._warned_constant = False

    @abc.abstractmethod
    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score one chunk.

        Args:
            images: ``[b, 3, H, W]`` float in ``[0, 1]`` (up to a 1e-3 overshoot), on the reward's device
                (or the caller's device when the reward has none), ``b <= batch_size``.
            prompts: the ``b`` prompts of the images.
            **metadata: per-sample extras, each chunked like the images when it is a sequence or tensor
                of length ``B`` (e.g. ``labels``), and passed as-is otherwise.

        Returns:
            ``[b]`` floating tensor, on any device.
        """

    def _check_inputs(self, images: Tensor, prompts: list[str]) -> None:
        who = f"reward {self.name!r}"
        if not isinstance(images, Tensor):
            raise TypeError(f"{who}: images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{who}: images must have shape [B, 3, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{who}: images must be a floating tensor with values in [0, 1], "
                             f"got {images.dtype}")
        if isinstance(prompts, str):
            raise TypeError(f"{who}: prompts must be a list of strings, got a single string")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{who}: got {images.shape[0]} images but {len(prompts)} prompts")
        if images.numel():
            lo, hi = images.amin().item(), images.amax().item()
            if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(f"{who}: image values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                                 "(decode latents and map [-1, 1] to [0, 1] before scoring)")

    def _check_output(self, scores: Any, n: int) -> Tensor:
        who = f"reward {self.name!r}"
        if not isinstance(scores, Tensor):
            raise RewardOutputError(f"{who}: score() must return a torch.Tensor of shape [{n}], "
                                    f"got {type(scores).__name__}")
        if tuple(scores.shape) != (n,):
            raise RewardOutputError(f"{who}: score() must return shape [{n}] (one score per image), "
                                    f"got {list(scores.shape)}")
        if not scores.is_floating_point():
            raise RewardOutputError(f"{who}: score() must return a floating tensor, got {scores.dtype} "
                                    "(convert it with .float())")
        return scores

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score a batch: ``images [B, 3, H, W]`` in ``[0, 1]`` and ``B`` prompts → float32 ``[B]``.

        Runs under ``torch.no_grad()``, on the reward's device when it has one, in chunks of
        ``batch_size``.  Raises ``ValueError`` (naming the reward) on malformed inputs or outputs.
        """
        prompts = list(prompts)
        self._check_inputs(images, prompts)
        out_device = images.device
        n = images.shape[0]
        with torch.no_grad():
            if self.device_override is not None:
                self.to(self.device_override)
                images = images.to(self.device_override)
            step = self.batch_size or max(n, 1)
            chunks = []
            for start in range(0, n, step):
                stop = min(start + step, n)
                meta = {k: _chunk(v, start, stop, n) for k, v in metadata.items()}
                scores = self.score(images[start:stop], prompts[start:stop], **meta)
                chunks.append(self._check_output(scores, stop - start).to(out_device, torch.float32))
            if not chunks:
                return torch.zeros(0, dtype=torch.float32, device=out_device)
            scores = torch.cat(chunks)
        self._warn_if_constant(scores)
        return scores

    def _warn_if_constant(self, scores: Tensor) -> None:
        """Warn (once per reward) when every finite score of a batch of >= 2 images is the same."""
        if getattr(self, "_warned_constant", False) or scores.numel() < 2:
            return
        finite = scores[torch.isfinite(scores)]
        if finite.numel() < 2 or not bool((finite == finite[0]).all()):
            return
        self._warned_constant = True
        warning = ConstantRewardWarning(
            f"reward {self.name!r} gave all {finite.numel()} images of a batch the same score "
            f"({finite[0].item():.4g}): a constant reward teaches the policy nothing (all its advantages are 0). "
            "Check it on your images (e.g. a colour reward scores grey images 0); shown once per reward.")
        # Point at the reward's own scoring code (the user's file), not at torch's Module.__call__.
        func = getattr(self, "fn", None) if isinstance(self, CallableReward) else None
        func = func if hasattr(func, "__code__") else type(self).score
        code = getattr(func, "__code__", None)
        if code is None:
            warnings.warn(warning, stacklevel=2)
        else:
            warnings.warn_explicit(warning, ConstantRewardWarning, code.co_filename, code.co_firstlineno,
                                   module=getattr(func, "__module__", None) or __name__)

    def extra_repr(self) -> str:
        parts = [f"name={self.name!r}"]
        if self.batch_size is not None:
            parts.append(f"batch_size={self.batch_size}")
        if self.device_override is not None:
            parts.append(f"device={str(self.device_override)!r}")
        return ", ".join(parts)


def _chunk(value: Any, start: int, stop: int, n: int) -> Any:
    """Slice per-sample metadata (length-``n`` tensors, lists, tuples); pass anything else through."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[start:stop]
    if isinstance(value, (list, tuple)) and len(value) == n:
        return value[start:stop]
    return value


def _import_callable(path: str) -> RewardFn:
    """Import ``"package.module.attr"`` (or ``"package.module:attr"``) and return the callable."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"expected a dotted import path like 'mypkg.mymodule.my_fn', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import module {module_name!r} for reward {path!r}: {err}") from err
    try:
        fn = getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (reward {path!r})") from err
    if not callable(fn):
        raise TypeError(f"{path!r} is not callable")
    return fn


class CallableReward(Reward):
    """A plain function as a :class:`Reward`.

    Args:
        fn: ``fn(images [b,3,H,W] in [0,1], prompts, **metadata) -> [b]``, or its dotted import path
            (``"mypkg.mymodule.my_fn"``) so that a YAML recipe can name it.
        name: metric key; defaults to the function's ``__name__``.
        batch_size, device: see :class:`Reward`.

    Example::

        def redness(images, prompts, **_):
            return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))

        reward = CallableReward(redness)        # reward.name == "redness"
    """

    default_name = "callable"

    # ``str`` first: jsonargparse (4.53) then keeps a recipe's dotted path as given, so the run's saved
    # config.yaml holds it (with ``RewardFn`` first it writes "Unable to serialize instance ...", and
    # ``lit-diffac sample`` / ``export`` cannot rebuild the run from that file).
    def __init__(self, fn: str | RewardFn, name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        resolved = _import_callable(fn) if isinstance(fn, str) else fn
        if not callable(resolved):
            raise TypeError(f"fn must be callable or a dotted import path, got {type(fn).__name__}")
        default = getattr(resolved, "__name__", None)
        if default in (None, "<lambda>"):
            default = self.default_name
        super().__init__(name=name or default, batch_size=batch_size, device=device)
        self.fn = resolved
        # A function that is itself a module (e.g. a scorer network) is registered so .to() moves it.
        if isinstance(resolved, torch.nn.Module):
            self.add_module("scorer", resolved)

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        return self.fn(images, prompts, **metadata)


def as_reward(obj: Reward | RewardFn | str, name: str | None = None) -> Reward:
    """Return ``obj`` as a :class:`Reward`: a Reward is returned as is (renamed when ``name`` is given);
    a callable or a dotted import path is wrapped in a :class:`CallableReward`."""
    if isinstance(obj, Reward):
        if name is not None:
            obj.name = name
        return obj
    if callable(obj) or isinstance(obj, str):
        return CallableReward(obj, name=name)
    raise TypeError(f"cannot make a reward from {type(obj).__name__}; expected a Reward, a callable "
                    "or a dotted import path")
