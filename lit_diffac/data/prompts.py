"""Prompt sources: where training and evaluation prompts come from.

A source is a list of strings, or one string naming:

* ``"toy:train"`` / ``"toy:heldout"`` — the toy digits world's training / held-out prompts;
* ``"toy-pairs:train"`` / ``"toy-pairs:heldout"`` / ``"toy-pairs:heldout-seen"`` / ``"toy-pairs:heldout-unseen"`` —
  the two-digit task's (:mod:`lit_diffac.toy.pairs`);
* a path to a text file with one prompt per line (blank lines and ``#`` comments are skipped).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from lit_diffac.errors import PromptFileError

PromptSource = str | Sequence[str]

#: The toy world's prompt sets, named ``"toy:<set>"``.
TOY_PROMPT_SETS = ("train", "heldout")


def _toy_set(source: str, prefix: str, sets, table, what: str) -> list[str]:
    """The prompts of the embedded set ``source`` (``"<prefix>:<set>"``), or a one-line error naming the sets."""
    split = source.split(":", 1)[1]
    if split not in sets:
        names = [f"{prefix}:{name}" for name in sets]
        match = difflib.get_close_matches(source, names, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        listed = [repr(n) for n in names]
        raise PromptFileError(f"unknown toy prompt set {source!r}{hint}: {what} are "
                              f"{', '.join(listed[:-1])} and {listed[-1]}")
    return [p for p, _ in table(split)]


def load_prompts(source: PromptSource) -> list[str]:
    """Resolve a prompt source to a non-empty list of prompts (clear errors otherwise).

    Raises:
        PromptFileError: an unknown ``toy:`` / ``toy-pairs:`` set, an empty list, or an unusable prompt file.
        FileNotFoundError: a prompt file that does not exist.
    """
    if isinstance(source, str):
        if source.startswith("toy:"):
            from lit_diffac.toy.prompts import prompt_table

            return _toy_set(source, "toy", TOY_PROMPT_SETS, prompt_table, "the toy prompt sets")
        if source.startswith("toy-pairs:"):
            from lit_diffac.toy.pairs import PAIR_PROMPT_SETS, pair_prompt_table

            return _toy_set(source, "toy-pairs", PAIR_PROMPT_SETS, pair_prompt_table,
                            "the two-digit task's prompt sets")
        return read_prompt_file(source)
    prompts = [str(p) for p in source]
    if not prompts:
        raise PromptFileError("the prompt list is empty: give at least one prompt")
    return prompts


def read_prompt_file(source: str) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (blank lines and ``#`` comments skipped).

    Raises:
        FileNotFoundError: the file does not exist.
        PromptFileError: it is a folder, not UTF-8 text (or binary), or holds no prompt.
    """
    path = Path(source)
    fix = "save it as UTF-8 text with one prompt per line"
    if path.is_dir():
        raise PromptFileError(f"prompt file {source!r} is a folder: {fix}, and pass the file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} not found (or use 'toy:train' / 'toy:heldout')")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"prompt file {source!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                              f"offset {err.start}): {fix}") from None
    if "\x00" in text:
        raise PromptFileError(f"prompt file {source!r} looks binary (it contains NUL bytes): {fix}")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PromptFileError(f"prompt file {source!r} contains no prompts: {fix} (blank lines and # comments "
                              "are skipped)")
    return prompts


class PromptDataset(Dataset):
    """Prompts drawn uniformly with replacement; ``length`` draws per epoch, reproducible from ``seed``."""

    def __init__(self, prompts: list[str], length: int, seed: int = 0) -> None:
        self.prompts = prompts
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> str:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.prompts[int(torch.randint(len(self.prompts), (1,), generator=generator))]
