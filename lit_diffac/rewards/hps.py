"""HPSv2 / HPSv2.1 (Human Preference Score v2), on a ``transformers`` ``CLIPModel``.

The official checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are OpenCLIP ViT-H-14
state dicts; convert one once with::

    lit-diffac convert-reward hpsv2 HPS_v2.1_compressed.pt OUT_DIR --tokenizer CLIP_TOKENIZER_DIR

(:func:`lit_diffac.rewards.convert.convert_open_clip_state_dict` does the key remapping) and pass
``OUT_DIR`` as ``pretrained``.

Prompts go through OpenCLIP's text cleaning first (:func:`open_clip_clean`), as HPSv2's tokenizer does;
``ftfy`` is not a dependency, so its ``fix_text`` is approximated by :func:`fix_text_approx` (every
``ftfy`` step except the heuristic parts of its mojibake repair, see there).
"""

from __future__ import annotations

import html
import html.entities
import unicodedata
from functools import lru_cache
from typing import Any

from torch import Tensor

from lit_diffac.rewards.base import Reward
from lit_diffac.rewards.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipImagePreprocess,
    _load_clip,
    check_weights,
    clip_cosine,
    load_tokenizer,
    parse_dtype,
)

try:  # OpenCLIP's tokenizer uses `regex` (a dependency of transformers); `re` differs only in what \s matches
    import regex as _re
except ImportError:  # pragma: no cover
    import re as _re

__all__ = ["HPSv2", "HPS_GET", "open_clip_clean", "fix_text_approx"]

HPS_GET = ("Download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from https://huggingface.co/xswu/HPSv2 "
           "and the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
           "(https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K), then convert once with "
           "`lit-diffac convert-reward hpsv2 HPS_v2.1_compressed.pt OUT_DIR --tokenizer TOKENIZER_DIR` "
           "and pass OUT_DIR as pretrained.")


# --------------------------------------------------------------------------------------------- text cleaning
# The steps and tables of ftfy.fix_text (ftfy 6, default TextFixerConfig), re-implemented without ftfy.

_ENTITY_RE = _re.compile(r"&#?[0-9A-Za-z]{1,24};")  # ftfy only decodes entities that end with ';'
_ANSI_RE = _re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_RE = _re.compile("[\x80-\x9f]")
_SINGLE_QUOTES_RE = _re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES_RE = _re.compile("[\u201c-\u201f]")
_SURROGATE_PAIR_RE = _re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = _re.compile("[\ud800-\udfff]")
_WHITESPACE_RE = _re.compile(r"\s+")
_LIGATURES = {ord(k): v for k, v in {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
    "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                0xFEFF, *range(0xFFF9, 0xFFFD)])


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, str], dict[int, str], dict[str, int]]:
    """ftfy's HTML entity table, fullwidth/halfwidth map and 'sloppy-windows-1252' encoder."""
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                entities["&" + name.upper()] = char.upper()  # e.g. &EACUTE; -> É
    width = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        alternate = unicodedata.normalize("NFKC", chr(i))
        if alternate != chr(i):
            width[i] = alternate
    sloppy = {}  # windows-1252, with the 5 bytes it leaves undefined read as Latin-1, and 0x1A as U+FFFD
    for byte in range(256):
        try:
            sloppy[bytes([byte]).decode("cp1252")] = byte
        except UnicodeDecodeError:
            sloppy[chr(byte)] = byte
    del sloppy["\x1a"]
    sloppy["\ufffd"] = 0x1A
    return entities, width, sloppy


def _unescape_entity(match: Any) -> str:
    text = match.group(0)
    entities = _tables()[0]
    if text in entities:
        return entities[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _undo_mojibake(text: str) -> str:
    """UTF-8 read as Latin-1 / Windows-1252 ('cafÃ©' -> 'café'): the whole string, when its Latin-1 or
    (sloppy) Windows-1252 bytes are valid UTF-8."""
    sloppy = _tables()[2]
    for _ in range(8):  # mojibake can be nested (encoded twice); ftfy repeats until nothing changes
        if text.isascii():
            return text
        candidates = []
        if all(ord(c) < 256 for c in text):
            candidates.append(text.encode("latin-1"))
        if all(c in sloppy for c in text):
            candidates.append(bytes(sloppy[c] for c in text))
        for data in candidates:
            try:
                fixed = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            break
        else:
            return text
        if fixed == text:
            return text
        text = fixed
    return text


def _fix_segment(text: str, unescape: bool) -> str:
    _, width, _ = _tables()
    for _ in range(16):  # ftfy repeats the whole chain until the text stops changing
        before = text
        if unescape:
            text = _ENTITY_RE.sub(_unescape_entity, text)
        text = _undo_mojibake(text)
        text = _C1_RE.sub(lambda m: bytes([ord(m.group(0))]).decode("cp1252", errors="ignore") or m.group(0), text)
        text = text.translate(_LIGATURES).translate(width)
        text = _SINGLE_QUOTES_RE.sub("'", _DOUBLE_QUOTES_RE.sub('"', text))
        text = (text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
                .replace("\u0085", "\n"))
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_PAIR_RE.sub(
                lambda m: chr(0x10000 + (ord(m.group(0)[0]) - 0xD800) * 0x400 + ord(m.group(0)[1]) - 0xDC00), text)
            text = _SURROGATE_RE.sub("\ufffd", text)
        text = _ANSI_RE.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            break
    return text


def fix_text_approx(text: str) -> str:
    """``ftfy.fix_text(text)`` with its default settings, without ``ftfy``.

    Reproduced: per line, HTML entities ending in ``;`` are decoded (not when the line, or an earlier one,
    contains ``<``), ANSI terminal escapes and invisible control characters removed, C1 controls read as
    Windows-1252, Latin ligatures split (``ﬁ`` → ``fi``), fullwidth / halfwidth forms and U+3000 replaced
    by their standard forms, curly quotes straightened, line breaks unified, surrogate pairs joined, NFC
    applied, all repeated until the text stops changing.

    Different: ``ftfy``'s mojibake repair (``fix_encoding``) is only approximated.  Here a line is re-decoded
    when *all* of it, encoded as Latin-1 or as ("sloppy") Windows-1252, is valid UTF-8 (``cafÃ©`` → ``café``,
    ``â€œhiâ€\\x9d`` → ``"hi"``).  ``ftfy`` additionally (a) first asks its badness heuristic whether the line
    looks like mojibake at all, so it leaves alone a legitimate line whose Latin-1 bytes happen to be valid
    UTF-8 (e.g. ``CAFÉ—``: an upper-case accented letter directly followed by ``—``), which is re-decoded
    here; (b) tries more encodings (Windows-1250/1251/1253/1254/1257, ISO-8859-2, MacRoman, cp437);
    (c) repairs mojibake *inside* otherwise correct text, sequences whose UTF-8 lost a byte (replaced by
    ``�``/``?``) or whose ``\\xa0`` became a space, and CESU-8 / Java-style UTF-8.  Those prompts are left
    unchanged here.
    """
    out, unescape = [], True
    for segment in _re.findall(r"[^\n]*\n|[^\n]+", text):
        if "<" in segment:
            unescape = False  # ftfy's unescape_html="auto": a literal '<' means real HTML (and stays off)
        out.append(_fix_segment(segment, unescape))
    return "".join(out)


def open_clip_clean(text: str) -> str:
    """The text cleaning of OpenCLIP's ``SimpleTokenizer.encode`` (the tokenizer HPSv2 uses,
    ``hpsv2/src/open_clip/tokenizer.py``): ``basic_clean`` (``ftfy.fix_text``, ``html.unescape`` twice,
    strip), ``whitespace_clean`` (every run of whitespace → one space, strip), then lower-casing.
    ``ftfy.fix_text`` is :func:`fix_text_approx` (see there for what differs)."""
    text = html.unescape(html.unescape(fix_text_approx(text))).strip()
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


# --------------------------------------------------------------------------------------------- reward

class HPSv2(Reward):
    """Human Preference Score v2 / v2.1: the cosine similarity of an OpenCLIP ViT-H-14 fine-tuned on HPD v2.

    Original: ``tgxs002/HPSv2`` (``hpsv2/img_score.py``: ``create_model_and_transforms('ViT-H-14', ...,
    light_augmentation=True)``, ``model.load_state_dict(checkpoint['state_dict'])``), with the eval transform
    of its vendored OpenCLIP (``hpsv2/src/open_clip/transform.py``, ``image_transform(...,
    resize_longest_max=True)``).

    Preprocessing (a letterbox, nothing is cropped): ``ToTensor`` of the uint8 image, then
    ``ResizeMaxSize(224)``: the *longer* side is resized to 224 with bicubic on the float tensor (the
    other to ``round(side * 224 / longest)``; ``F.interpolate``, antialiased as torchvision >= 0.17 does
    by default, ``antialias=False`` gives torchvision 0.15/0.16) and the image is padded with 0 to
    224×224 (``pad // 2`` left/top, the rest right/bottom), then OpenAI mean/std.  Prompts: OpenCLIP's text
    cleaning (:func:`open_clip_clean`: ``ftfy`` approximated, HTML unescaped twice, whitespace collapsed,
    lower-cased), then the CLIP BPE tokenizer, 77 tokens with start/end tokens (OpenCLIP's ``tokenize``).

    Output: ``image_features @ text_features`` of the L2-normalised embeddings (no logit scale), i.e. the
    cosine, about 0.2–0.35 for real images.

    Args:
        pretrained: folder written by ``lit-diffac convert-reward hpsv2`` (``CLIPModel`` + tokenizer).
        dtype: model dtype (the original runs under fp16 autocast on CUDA).
        antialias: antialiased bicubic resize (see above).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "hpsv2"

    def __init__(self, pretrained: str, dtype: str = "float32", antialias: bool = True, name: str | None = None,
                 batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.dtype = parse_dtype(dtype)
        folder = check_weights(pretrained, what="HPSv2 weights (converted)", get=HPS_GET,
                               files=("config.json", "model.safetensors"))
        self.tokenizer = load_tokenizer(folder, what="HPSv2 tokenizer", get=HPS_GET)
        self.model = _load_clip(folder, self.dtype)
        size = self.model.config.vision_config.image_size
        self.preprocess = ClipImagePreprocess(size=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                              resample="tensor", resize_mode="longest", fill=0.0,
                                              antialias=antialias)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """The token ids and attention mask of ``prompts`` after OpenCLIP's cleaning (padded to the longest)."""
        return self.tokenizer([open_clip_clean(p) for p in prompts], padding=True, truncation=True,
                              max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        return clip_cosine(self.model, self.tokenizer, self.preprocess, images, [open_clip_clean(p) for p in prompts],
                           self.dtype, max_length=self.model.config.text_config.max_position_embeddings)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={str(self.dtype).removeprefix('torch.')}"
