"""OCR reward: does the image show the text quoted in the prompt?

Needs the optional extra ``ocr`` (``pip install "lit-diffac[ocr]"``: ``rapidocr`` + ``onnxruntime``; the
detection / recognition ONNX models ship inside the ``rapidocr`` wheel, nothing is downloaded).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_diffac.rewards.base import Reward
from lit_diffac.rewards.clip import quantize

__all__ = ["OCRReward", "quoted_text", "edit_distance", "ocr_similarity"]

_QUOTES = (re.compile(r'"([^"]*)"'), re.compile(r"“([^”]*)”"))


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes (``"..."`` or ``“...”``) of ``prompt``.

    Raises:
        ValueError: when the prompt quotes nothing.
    """
    for pattern in _QUOTES:
        match = pattern.search(prompt)
        if match:
            return match.group(1)
    raise ValueError(f'the OCR reward needs the target text in double quotes in the prompt, e.g. '
                     f'\'a sign that says "OPEN"\'; got {prompt!r}')


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return text.replace(" ", "").lower()


def ocr_similarity(recognized: str, target: str) -> float:
    """``1 - min(d, n) / n`` with ``d`` the edit distance between the recognised text and the target and
    ``n`` the target's length, both with spaces removed and lower-cased; 1 when the target appears
    verbatim inside the recognised text (Flow-GRPO's convention).  An empty target scores 1 for an
    image with no text and 0 otherwise."""
    rec, tgt = _canonical(recognized), _canonical(target)
    if not tgt:
        return 1.0 if not rec else 0.0
    dist = 0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


class OCRReward(Reward):
    """``1 −`` normalised edit distance between the prompt's quoted text and the text read by OCR.

    Original: Flow-GRPO's OCR reward (``yifan123/flow_grpo``, ``flow_grpo/ocr.py``), which uses PaddleOCR
    (``use_angle_cls=False``, English); here the same PP-OCR detection + recognition models run through
    ``rapidocr`` + ``onnxruntime`` (``RapidOCR``), which ship them in the wheel.

    Preprocessing: the image is quantised to uint8 (``round(x * 255)``) and handed to the OCR engine at
    full resolution (BGR, as OpenCV / RapidOCR expect).  Target: the text between the first double quotes
    of the prompt (Flow-GRPO: ``prompt.split('"')[1]``).  Recognised lines (those above the engine's
    ``text_score`` confidence) are joined without separator.

    Output: in [0, 1]; see :func:`ocr_similarity` (spaces removed, lower-cased, substring match scores
    1, the distance is capped at the target's length).  An OCR failure scores 0 (the original's maximum
    penalty).

    Args:
        use_cls: run the text-direction classifier (Flow-GRPO: off).
        text_score: minimum recognition confidence of a kept line (RapidOCR's ``Global.text_score``).
        num_threads: ONNX Runtime intra-op threads (``None``: its default, all cores).
        params: extra RapidOCR parameters (``{"Det.limit_side_len": 736, ...}``), passed as-is.
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward` (scoring runs on the CPU).
    """

    default_name = "ocr"

    def __init__(self, use_cls: bool = False, text_score: float = 0.5, num_threads: int | None = None,
                 params: dict[str, Any] | None = None, name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.use_cls = use_cls
        self.params: dict[str, Any] = {"Global.log_level": "error", "Global.text_score": float(text_score),
                                       "Global.use_cls": bool(use_cls)}
        if num_threads is not None:
            self.params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(num_threads)
            self.params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self.params.update(params or {})
        self._engine: Any = None
        _ = self.engine  # fail early when the optional dependency is missing

    @property
    def engine(self) -> Any:
        """The RapidOCR engine (built on first use; not part of the module's state)."""
        if self._engine is None:
            try:
                from rapidocr import RapidOCR
            except ImportError as err:
                raise ImportError("the OCR reward needs the optional dependencies rapidocr and onnxruntime: "
                                  'pip install "lit-diffac[ocr]"') from err
            self._engine = RapidOCR(params=dict(self.params))
        return self._engine

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None  # ONNX sessions do not pickle; rebuilt lazily
        return state

    def recognize(self, images: Tensor) -> list[str]:
        """The text read in each image (recognised lines joined), ``[B, 3, H, W]`` in [0, 1]."""
        pixels = quantize(images).permute(0, 2, 3, 1).cpu().numpy()
        texts = []
        for image in pixels:
            bgr = np.ascontiguousarray(image[:, :, ::-1])
            result = self.engine(bgr, use_cls=self.use_cls)
            texts.append("".join(result.txts or ()) if getattr(result, "txts", None) else "")
        return texts

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        targets = [quoted_text(p) for p in prompts]
        scores = []
        for i, target in enumerate(targets):
            try:
                recognized = self.recognize(images[i:i + 1])[0]
            except Exception:  # noqa: BLE001 - the original's maximum penalty for an OCR failure
                scores.append(0.0)
                continue
            scores.append(ocr_similarity(recognized, target))
        return torch.tensor(scores, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, use_cls={self.use_cls}"
