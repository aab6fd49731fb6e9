"""OCR reward: target extraction, the normalised edit distance, and RapidOCR on a word drawn with PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lit_diffac.rewards.ocr import edit_distance, ocr_similarity, quoted_text


def test_quoted_text():
    assert quoted_text('New York skyline with "Hello World" written in fireworks') == "Hello World"
    assert quoted_text("a sign that says “OPEN” on a door") == "OPEN"
    assert quoted_text('two "A" and "B"') == "A"
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text("a cat")


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
                                     ("abc", "abc", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_ocr_similarity_follows_flow_grpo():
    assert ocr_similarity("Hello World", "hello world") == 1.0  # spaces and case ignored
    assert ocr_similarity("xxHELLOxx", "hello") == 1.0  # the target inside the recognised text
    assert ocr_similarity("HELL0", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_similarity("", "cat") == 0.0
    assert ocr_similarity("a long unrelated sentence", "cat") == 0.0  # distance capped at the target length
    assert ocr_similarity("", "") == 1.0 and ocr_similarity("x", "") == 0.0


def render(word: str | None, size: int = 64) -> torch.Tensor:
    """A white ``size × size`` image with ``word`` drawn in black by PIL, as ``[3, H, W]`` in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    if word:
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=22)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        draw.text(((size - right + left) / 2 - left, (size - bottom + top) / 2 - top), word, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_ocr_reward_scores_a_rendered_word_above_a_blank():
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    from lit_diffac.rewards.ocr import OCRReward

    reward = OCRReward(num_threads=1)
    images = torch.stack([render("CAT"), render(None), render("DOG")])
    prompts = ['a sign that says "cat"', 'a sign that says "cat"', 'a sign that says "cat"']
    scores = reward(images, prompts)
    assert reward.name == "ocr" and scores.shape == (3,)
    assert scores[0].item() == 1.0 and scores[1].item() == 0.0
    assert scores[0] > scores[2] >= scores[1]  # "DOG" vs "cat": distance 3 of 3
    assert reward.recognize(images[:1]) == ["CAT"]
