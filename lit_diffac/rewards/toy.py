"""Rewards of the toy digits world."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lit_diffac.rewards.base import Reward
from lit_diffac.toy.classifier import DigitClassifier
from lit_diffac.toy.pairs import is_unseen, pair_of
from lit_diffac.toy.prompts import digit_of
from lit_diffac.toy.svm_judge import SVMJudge

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


class IndependentDigitJudge(Reward):
    """A second digit judge for the toy task, to tell alignment from hacking the reward's classifier.

    An RBF support-vector classifier on the original 8×8 digits (:class:`~lit_diffac.toy.svm_judge.SVMJudge`, shipped
    with the package, 99.4 % on real held-out digits; no scikit-learn needed to run it): another model
    family, resolution and training procedure than the CNN of :class:`DigitAlignment`, which a policy trained on that
    reward can learn to fool (images the CNN reads as the prompted digit and no person would). Images are averaged to
    grey and 2×2-pooled to 8×8. ``score`` and :meth:`accuracy` are both 1 where the SVM's class is the prompted digit,
    else 0. Meant as an evaluation-only reward (``HeldOutEvaluation(rewards=[...])``: ``eval/independent_judge`` and
    ``eval/independent_judge_accuracy``); it has no gradient and a binary score, so it is a poor training reward.

    Args:
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "independent_judge"

    def __init__(self, name: str | None = None, batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.svm = SVMJudge()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``[B]`` long: the SVM's digit for images ``[B, C, H, W]`` in [0, 1]."""
        grey = images.float().mean(dim=1, keepdim=True)
        return self.svm.predict(F.adaptive_avg_pool2d(grey, 8) * 2.0 - 1.0).to(images.device)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return self.accuracy(images, prompts)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` float: 1 where the SVM's class is the prompted digit."""
        digits = torch.tensor([digit_of(p) for p in prompts], device=images.device)
        return (self.predict(images) == digits).float()


class PairAlignment(Reward):
    """The two-digit task's judge (:mod:`lit_diffac.toy.pairs`): the digit classifier on each half of a canvas.

    Images are two-digit canvases (width = 2 × height); the classifier reads the left and the right half.
    ``score`` is dense by default, ``p(left digit | left half) · p(right digit | right half)`` in [0, 1];
    with ``sparse=True`` it is the binary GenEval-style score itself (1 when both argmaxes are the prompted digits,
    else 0), whose all-zero groups are where GRPO wastes samples (the constant-reward warning is then off: an
    all-zero batch is expected at a low success rate).  :meth:`accuracy` is that binary score, and
    :meth:`accuracy_by_group` splits it into seen and unseen pairs (``eval/<name>_accuracy_seen`` / ``_unseen``).

    Args:
        sparse: score with the binary success (else the product of the two probabilities).
        classifier: folder of a :class:`~lit_diffac.toy.classifier.DigitClassifier` (default: the embedded one).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "pair_alignment"

    def __init__(self, sparse: bool = False, classifier: str | None = None, name: str | None = None,
                 batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.sparse = sparse
        self.classifier = DigitClassifier.from_pretrained(classifier or DEFAULT_CLASSIFIER).requires_grad_(False)
        self._warned_constant = sparse  # all-zero batches are a sparse reward's normal early state

    def half_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p(digit | left half), p(digit | right half))``, each ``[B, 10]``, of canvases ``[B, 3, H, 2H]``."""
        height, width = images.shape[-2:]
        if width != 2 * height:
            raise ValueError(f"reward {self.name!r} scores two-digit canvases (width = 2 x height), got "
                             f"{height}x{width} images: use a pair backbone ('toy-pairs-dit', 'toy-pairs-unet') or "
                             "resolution [H, 2H]")
        model = self.classifier.to(images.device)
        left, right = images[..., :height], images[..., height:]
        return model(model.preprocess(left)).softmax(-1), model(model.preprocess(right)).softmax(-1)

    def _targets(self, prompts: list[str], device) -> torch.Tensor:
        return torch.tensor([pair_of(p) for p in prompts], dtype=torch.long, device=device).view(-1, 2)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        if self.sparse:
            return self.accuracy(images, prompts)
        pairs = self._targets(prompts, images.device)
        p_left, p_right = self.half_probs(images)
        return p_left.gather(1, pairs[:, :1]).squeeze(1) * p_right.gather(1, pairs[:, 1:]).squeeze(1)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` float: 1 where the classifier's argmax on each half is the prompted digit of that side."""
        pairs = self._targets(prompts, images.device)
        p_left, p_right = self.half_probs(images)
        return ((p_left.argmax(-1) == pairs[:, 0]) & (p_right.argmax(-1) == pairs[:, 1])).float()

    @torch.no_grad()
    def accuracy_by_group(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{"seen": [n_seen], "unseen": [n_unseen]}``: :meth:`accuracy` of the samples whose prompt asks for a pair
        seen in training, and of those asking for one of :data:`~lit_diffac.toy.pairs.UNSEEN_PAIRS`."""
        correct = self.accuracy(images, prompts)
        unseen = torch.tensor([is_unseen(p) for p in prompts], dtype=torch.bool, device=correct.device)
        return {"seen": correct[~unseen], "unseen": correct[unseen]}

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sparse=True" if self.sparse else "")
