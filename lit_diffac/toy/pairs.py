"""The toy world's compositional task: two digits side by side on a 16×32 canvas ("toy pairs").

The single-digit task is nearly solved by every method; this one is the toy counterpart of GenEval's two-object
prompts, where the base success rate is low and credit assignment matters.  A canvas holds two of the same
8×8 digits (upsampled to 16×16, each moved sideways by up to one pixel inside its slot); a prompt names both digits
and their order.  Of the 100 ordered pairs, 20 (:data:`UNSEEN_PAIRS`) never appear in training prompts (base
pretraining or RL); evaluation reports seen pairs (with held-out templates) and unseen pairs separately.

* :data:`UNSEEN_PAIRS` — ``(a, a ± 3 mod 10)``: both orders of the ten digit pairs that differ by 3 (mod 10), so
  a model never sees those two digits together.  Every digit is twice on the left and twice on the right.
* :data:`EVAL_SEEN_PAIRS` — ``(a, a + 1)`` and ``(a, a + 5)`` (mod 10): 20 seen pairs with the same balance,
  so a difference between seen and unseen accuracy does not come from which digits each set holds.
* Prompt sets (``load_prompts("toy-pairs:<set>")``): ``train`` (6 training templates × the 80 seen pairs, 480
  prompts), ``heldout-seen`` and ``heldout-unseen`` (2 held-out templates × 20 pairs each, 40 prompts), and
  ``heldout`` (both, 80 prompts: seen first).

>>> make_pair_prompt(3, 7, "a {wb} to the right of a {wa}")
'a seven to the right of a three'
>>> pair_of("a seven to the right of a three")
(3, 7)
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F

from lit_diffac.toy.digits import DigitsSplit
from lit_diffac.toy.prompts import DIGIT_WORDS

#: Canvas size in pixels: two 16×16 slots side by side.
CANVAS_HEIGHT, CANVAS_WIDTH = 16, 32
#: Largest sideways shift (pixels) of a digit inside its slot.  Only sideways: the judge (trained on centred digits
#: with one-pixel rolls) keeps 99.4-99.7 % accuracy under horizontal shifts but drops to 96.7-98.9 % under vertical
#: or diagonal ones, which would make the two-digit judge miss 3 % of real canvases.
JITTER = 1

#: Ordered pairs that never appear in training prompts: both orders of the digit pairs 3 apart (mod 10).
UNSEEN_PAIRS: tuple[tuple[int, int], ...] = tuple(sorted({(a, (a + k) % 10) for a in range(10) for k in (3, 7)}))
#: The other 80 ordered pairs (doubles included): the training pairs.
SEEN_PAIRS: tuple[tuple[int, int], ...] = tuple((a, b) for a in range(10) for b in range(10)
                                                if (a, b) not in UNSEEN_PAIRS)
#: The seen pairs held-out evaluation uses (as balanced over digits and positions as :data:`UNSEEN_PAIRS`).
EVAL_SEEN_PAIRS: tuple[tuple[int, int], ...] = tuple(sorted({(a, (a + k) % 10) for a in range(10) for k in (1, 5)}))

#: Training templates (base pretraining and RL).  ``{a}``/``{b}``: the left / right numeral; ``{wa}``/``{wb}``:
#: their English words.  "right of" templates name the right digit first.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {a} to the left of a {b}",
    "a {wb} to the right of a {wa}",
    "{a} and {b}",
    "the numbers {wa} and {wb}",
    "the digits {a} then {b}",
    "{wa} left of {wb}",
)
#: Templates never seen in training; held-out evaluation uses these.  They recombine training words (numerals and
#: words swapped, articles dropped) rather than add new ones: the toy text encoder is causal and trained from
#: scratch, so an unseen word (an untrained embedding) would corrupt every later token's state, the second digit's
#: included, and measure that instead of the pair.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "the digits {wa} and {wb}",
    "{b} to the right of {a}",
)
#: The prompt sets, named ``"toy-pairs:<set>"``.
PAIR_PROMPT_SETS = ("train", "heldout", "heldout-seen", "heldout-unseen")

_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|\d")


def make_pair_prompt(left: int, right: int, template: str) -> str:
    """Fill ``template`` with the ``left`` and ``right`` digits."""
    if not (0 <= left <= 9 and 0 <= right <= 9):
        raise ValueError(f"digits must be in 0..9, got ({left}, {right})")
    return template.format(a=left, b=right, wa=DIGIT_WORDS[left], wb=DIGIT_WORDS[right])


def pair_of(prompt: str) -> tuple[int, int]:
    """The ``(left, right)`` digits a pair prompt asks for.

    The prompt names exactly two digits (numerals or words); they are read left to right, unless the prompt says
    "right" (``"a 7 to the right of a 3"``), where the first named is the right one.

    Raises:
        ValueError: if the prompt does not name exactly two digits.
    """
    tokens = _TOKEN.findall(prompt.lower())
    digits = [int(t) if t.isdigit() else _WORD_TO_DIGIT[t] for t in tokens if t.isdigit() or t in _WORD_TO_DIGIT]
    if len(digits) != 2:
        raise ValueError(f"prompt {prompt!r} names {len(digits)} digits: a pair prompt names two "
                         "(e.g. 'a 3 to the left of a 7')")
    first, second = digits
    return (second, first) if "right" in tokens else (first, second)


def is_unseen(prompt: str) -> bool:
    """Whether a pair prompt asks for one of the :data:`UNSEEN_PAIRS`."""
    return pair_of(prompt) in UNSEEN_PAIRS


def pair_prompt_table(split: str = "train") -> list[tuple[str, tuple[int, int]]]:
    """All ``(prompt, (left, right))`` of a prompt set (:data:`PAIR_PROMPT_SETS`), templates outermost."""
    if split not in PAIR_PROMPT_SETS:
        raise ValueError(f"split must be one of {PAIR_PROMPT_SETS}, got {split!r}")
    if split == "heldout":
        return pair_prompt_table("heldout-seen") + pair_prompt_table("heldout-unseen")
    templates, pairs = {"train": (TRAIN_TEMPLATES, SEEN_PAIRS),
                        "heldout-seen": (HELDOUT_TEMPLATES, EVAL_SEEN_PAIRS),
                        "heldout-unseen": (HELDOUT_TEMPLATES, UNSEEN_PAIRS)}[split]
    return [(make_pair_prompt(a, b, t), (a, b)) for t in templates for a, b in pairs]


def pair_vocabulary() -> list[str]:
    """Every word of every pair template (train and held-out) with every digit, in a stable order."""
    words: list[str] = []
    for template in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES):
        for left in range(10):
            for w in make_pair_prompt(left, left, template).split():
                if w not in words:
                    words.append(w)
    return words


def shift(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: float = -1.0) -> torch.Tensor:
    """Shift each of ``images [N, C, H, W]`` by its own ``(dy[i], dx[i])`` pixels (down / right when positive),
    filling with ``fill`` (the background, -1) instead of wrapping around."""
    pad = int(max(dy.abs().max().item(), dx.abs().max().item(), 0)) if dy.numel() else 0
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    out = torch.empty_like(images)
    for i in range(images.shape[0]):  # a digit moves by +dy rows, +dx columns
        top, left = pad - int(dy[i]), pad - int(dx[i])
        out[i] = padded[i, :, top:top + h, left:left + w]
    return out


def compose(left: torch.Tensor, right: torch.Tensor, generator: torch.Generator | None = None,
            jitter: int = JITTER) -> torch.Tensor:
    """Canvases ``[N, C, H, 2W]``: ``left`` and ``right`` digit images ``[N, C, H, W]`` (in [-1, 1]) side by side,
    each shifted sideways by up to ``jitter`` pixels inside its slot (random from ``generator``)."""
    if left.shape != right.shape:
        raise ValueError(f"left and right images differ in shape: {list(left.shape)} vs {list(right.shape)}")
    n = left.shape[0]
    dx = torch.randint(-jitter, jitter + 1, (2, n), generator=generator) if jitter \
        else torch.zeros(2, n, dtype=torch.long)
    still = torch.zeros(n, dtype=torch.long)
    return torch.cat([shift(left, still, dx[0]), shift(right, still, dx[1])], dim=-1)


def canvases_for(digits: DigitsSplit, pairs: torch.Tensor, generator: torch.Generator | None = None,
                 jitter: int = JITTER) -> torch.Tensor:
    """Two-digit canvases ``[N, 1, H, 2W]`` in [-1, 1] for the ordered ``pairs [N, 2]`` (left, right): a random
    image of each digit from ``digits`` (random draws from ``generator``; the global one when ``None``),
    jittered by :func:`compose`."""
    by_label = [torch.nonzero(digits.labels == d).flatten() for d in range(10)]

    def pick(labels: torch.Tensor) -> torch.Tensor:
        u = torch.rand(labels.numel(), generator=generator)
        index = torch.stack([by_label[d][int(x * len(by_label[d]))] for d, x in zip(labels.tolist(), u.tolist())])
        return digits.images[index]

    left, right = pick(pairs[:, 0]), pick(pairs[:, 1])
    return compose(left, right, generator=generator, jitter=jitter)


def sample_canvases(digits: DigitsSplit, count: int, pairs: Sequence[tuple[int, int]] = SEEN_PAIRS,
                    generator: torch.Generator | None = None, jitter: int = JITTER
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` two-digit canvases from one digits split, each of an ordered pair drawn uniformly from ``pairs``.

    The images come from ``digits``: the train split for training canvases, the held-out split for judging the
    judge (:func:`canvases_for`; random draws from ``generator``, the global one when ``None``).

    Returns:
        ``(canvases [count, 1, H, 2W] in [-1, 1], pairs [count, 2] (left, right) int64)``.
    """
    table = torch.tensor(list(pairs), dtype=torch.long)
    chosen = table[torch.randint(len(table), (count,), generator=generator)]
    return canvases_for(digits, chosen, generator=generator, jitter=jitter), chosen
