"""Rewards with injected faults for the fault-handling tests (importable by dotted path from a recipe)."""

from __future__ import annotations

import os
import signal

import torch

#: Training-batch calls seen by :func:`brightness_or_sigterm` in this process.
_CALLS = {"train": 0}


def brightness(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def brightness_or_sigterm(images, prompts, **_):
    """Brightness; sends SIGTERM to this very process on training call ``$LIT_DIFFAC_TEST_SIGTERM_AT``
    (0-based; training calls are the ones with 4 images, evaluation calls have 2)."""
    if len(prompts) == 4:
        at = os.environ.get("LIT_DIFFAC_TEST_SIGTERM_AT")
        if at is not None and _CALLS["train"] == int(at):
            os.kill(os.getpid(), signal.SIGTERM)
        _CALLS["train"] += 1
    return brightness(images, prompts)


def always_nan(images, prompts, **_):
    return torch.full((images.shape[0],), float("nan"))


def wrong_shape(images, prompts, **_):
    return images.mean(dim=(2, 3))  # [B, 3] instead of [B]


def integer_scores(images, prompts, **_):
    return torch.ones(images.shape[0], dtype=torch.long)
