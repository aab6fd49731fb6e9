"""Rewards of the toy digits world."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_diffac.rewards.base import Reward
from lit_diffac.toy.classifier import DigitClassifier
from lit_diffac.toy.prompts import digit_of

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent.parent / "toy" / "assets" / "digit-classifier"


class DigitAlignment(Reward):
    """The toy GenEval analogue: the digit classifier's probability of the digit the prompt names.

    ``score`` is ``p(prompted digit | image)`` in [0, 1]; :meth:`accuracy` is whether the classifier's
    argmax equals the prompted digit (the *alignment accuracy* metric).

    Args:
        classifier: folder of a :class:`~lit_diffac.toy.classifier.DigitClassifier` (default: the
            embedded one, 99.7 % held-out accuracy).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "digit_alignment"

    def __init__(self, classifier: str | None = None, name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.classifier = DigitClassifier.from_pretrained(classifier or DEFAULT_CLASSIFIER).requires_grad_(False)

    def _probs(self, images: torch.Tensor) -> torch.Tensor:
        model = self.classifier.to(images.device)
        return model(model.preprocess(images)).softmax(-1)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        digits = torch.tensor([digit_of(p) for p in prompts], device=images.device)
        return self._probs(images).gather(1, digits[:, None]).squeeze(1)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` float: 1 where the classifier's argmax is the prompted digit."""
        digits = torch.tensor([digit_of(p) for p in prompts], device=images.device)
        return (self._probs(images).argmax(-1) == digits).float()
