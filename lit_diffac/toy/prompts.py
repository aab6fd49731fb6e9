"""Prompts of the toy digits world.

Each digit 0–9 has several phrasings.  Training templates are what RL and base pretraining see;
held-out templates are kept for evaluation only, so held-out alignment measures whether the policy
learned the *digit*, not a template.

>>> make_prompt(7, "the number {word}")
'the number seven'
>>> digit_of("a handwritten digit 7")
7
"""

from __future__ import annotations

import re

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

#: Templates used for base pretraining and RL.  ``{n}`` is the numeral, ``{word}`` the English word.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {n}",
    "the number {word}",
    "a photo of the digit {word}",
    "{n}",
    "an image of a {word}",
    "the digit {n}",
)

#: Templates never seen in training; evaluation uses these.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture of the number {n}",
    "handwritten {word}",
)

_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|\d")


def make_prompt(digit: int, template: str) -> str:
    """Fill ``template`` with ``digit`` (numeral as ``{n}``, English word as ``{word}``)."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return template.format(n=digit, word=DIGIT_WORDS[digit])


def digit_of(prompt: str) -> int:
    """The digit a toy prompt asks for (the last numeral or digit word in it).

    Raises:
        ValueError: if the prompt names no digit.
    """
    found = [tok for tok in _TOKEN.findall(prompt.lower()) if tok.isdigit() or tok in _WORD_TO_DIGIT]
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit (0-9 or zero..nine)")
    last = found[-1]
    return int(last) if last.isdigit() else _WORD_TO_DIGIT[last]


def prompt_table(split: str = "train") -> list[tuple[str, int]]:
    """All (prompt, digit) pairs of a split: ``"train"`` or ``"heldout"``."""
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [(make_prompt(d, t), d) for t in templates for d in range(10)]


def vocabulary() -> list[str]:
    """Every word of every template (train and held-out), in a stable order."""
    words: list[str] = []
    for split in ("train", "heldout"):
        for prompt, _ in prompt_table(split):
            for w in prompt.split():
                if w not in words:
                    words.append(w)
    return words
