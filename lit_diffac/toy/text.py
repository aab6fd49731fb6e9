"""A tiny CLIP tokenizer and text encoder for the toy world, built offline.

The tokenizer is a real :class:`transformers.CLIPTokenizer` (byte-level BPE) whose vocabulary holds every
byte symbol plus one token per toy word, with merges that assemble each word.  Unknown words still
tokenise (into characters), so arbitrary prompts work.  It is written as ``vocab.json`` + ``merges.txt``,
exactly the files a Stable Diffusion ``tokenizer/`` folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTokenizer

from lit_diffac.toy.prompts import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention).

    Printable Latin-1 bytes map to themselves; the others map to code points from 256 upwards.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word`` + ``</w>`` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for sym in symbols[1:]:
        merges.append((current, sym))
        current = current + sym
    return merges


def write_tokenizer(folder: str | Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` for ``words`` (default: the toy vocabulary) and load it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = vocabulary() if words is None else words
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        for a, b in _word_merges(word):
            if (a, b) not in merges:
                merges.append((a, b))
            if a + b not in tokens:
                tokens.append(a + b)
    tokens += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {"model_max_length": MAX_LENGTH, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Load back through the same call a Stable Diffusion ``tokenizer/`` folder uses.
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_config(tokenizer: CLIPTokenizer, hidden_size: int = 64, num_layers: int = 2) -> CLIPTextConfig:
    """A tiny CLIP text-encoder config matched to ``tokenizer``.

    ``eos_token_id`` is set to the tokenizer's so the pooled output reads the EOS position.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
