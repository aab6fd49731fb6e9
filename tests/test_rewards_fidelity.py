"""Scorer fidelity: HPSv2's letterbox preprocessing and OpenCLIP's prompt cleaning, checked against values
computed by hand (or by formulas written here) rather than against the code under test.

Reference: ``ResizeMaxSize`` and ``image_transform(..., resize_longest_max=True)`` of the OpenCLIP that
``tgxs002/HPSv2`` vendors (``hpsv2/src/open_clip/transform.py``) and ``basic_clean`` / ``whitespace_clean``
of its ``tokenizer.py`` (with ``ftfy.fix_text``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_diffac.rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImagePreprocess, letterbox_shape
from lit_diffac.rewards.hps import fix_text_approx, open_clip_clean

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
PAD = (0.0 - MEAN) / STD  # a padded pixel: 0 (black) before normalisation


def letterbox(size: int, antialias: bool = True) -> ClipImagePreprocess:
    return ClipImagePreprocess(size=size, resample="tensor", resize_mode="longest", antialias=antialias)


# --------------------------------------------------------------------------------------------- reference resize

def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> torch.Tensor:
    """``[n_out, n_in]`` weights of a 1-D bicubic resize as ``torch.nn.functional.interpolate`` (and so
    torchvision on tensors) computes it, ``align_corners=False``.  Antialiased: PIL's filter (a = -0.5),
    support widened by the downscale factor, weights normalised, taps cut at the borders.  Not
    antialiased: Keys' cubic (a = -0.75) at ``(i + 0.5) * scale - 0.5``, border pixels repeated."""
    scale = n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = [_cubic((j - center + 0.5) / max(scale, 1.0), -0.5) for j in range(lo, hi)]
            for j, wj in zip(range(lo, hi), w):
                m[i, j] = wj / sum(w)
        else:
            x = (i + 0.5) * scale - 0.5
            x0 = math.floor(x)
            t = x - x0
            for k, wk in zip(range(-1, 3), (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75),
                                            _cubic(2 - t, -0.75))):
                m[i, min(max(x0 + k, 0), n_in - 1)] += wk
    return m


def reference_letterbox(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """ResizeMaxSize by hand: matrices for the resize, zeros around, then normalisation."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    resized = bicubic_matrix(h, nh, antialias) @ x.double() @ bicubic_matrix(w, nw, antialias).T
    out = torch.zeros(*x.shape[:-2], size, size, dtype=torch.float64)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[..., top:top + nh, left:left + nw] = resized
    return ((out.float() - MEAN) / STD)


def test_the_reference_matrices_are_the_hand_computed_bicubic_weights():
    # 2 -> 4 rows (scale 1/2).  Antialiased (a = -0.5): output row 0 is centred at 0.25, taps at input 0 and 1
    # with cubic(0.25) = 111/128 and cubic(1.25) = -9/128, normalised by their sum 102/128; row 1 (centre
    # 0.75): cubic(0.25) = 111/128 and cubic(0.75) = 29/128, sum 140/128.
    aa = torch.tensor([[37 / 34, -3 / 34], [111 / 140, 29 / 140], [29 / 140, 111 / 140], [-3 / 34, 37 / 34]],
                      dtype=torch.float64)
    torch.testing.assert_close(bicubic_matrix(2, 4, antialias=True), aa, rtol=0, atol=1e-12)
    # Not antialiased (a = -0.75): row 0 samples x = -0.25, taps -2..1 clamped to 0,0,0,1 with weights
    # -0.03515625, 0.26171875, 0.87890625 | -0.10546875; row 1 samples x = 0.25, taps 0,0,1,1.
    keys = torch.tensor([[1.10546875, -0.10546875], [0.7734375, 0.2265625], [0.2265625, 0.7734375],
                         [-0.10546875, 1.10546875]], dtype=torch.float64)
    torch.testing.assert_close(bicubic_matrix(2, 4, antialias=False), keys, rtol=0, atol=1e-12)
    # and both are what F.interpolate does (torchvision's tensor resize), up- and downscaling
    for n_in, n_out in ((2, 4), (3, 7), (9, 4), (13, 8)):
        x = torch.rand(1, 1, 1, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(n_in))
        for antialias in (True, False):
            got = F.interpolate(x, size=(1, n_out), mode="bicubic", align_corners=False, antialias=antialias)
            torch.testing.assert_close(got[0, 0, 0], bicubic_matrix(n_in, n_out, antialias) @ x[0, 0, 0])


# --------------------------------------------------------------------------------------------- letterbox

def test_letterbox_of_a_wide_2x4_image_by_hand():
    # rows constant: 2x4 -> longer side 4 -> 8 (scale 2): 4x8, padded by 2 rows above and 2 below; along the
    # width a constant row stays constant, so each output row is a hand-weighted mix of the two input rows.
    p0 = torch.tensor([51.0, 102.0, 153.0]) / 255  # uint8 values k / 255: quantisation is exact
    p1 = torch.tensor([204.0, 0.0, 255.0]) / 255
    x = torch.stack([p0, p1], dim=-1)[:, :, None].expand(3, 2, 4)[None]  # [1, 3, 2, 4]
    for antialias, rows in ((True, [(37 / 34, -3 / 34), (111 / 140, 29 / 140), (29 / 140, 111 / 140),
                                    (-3 / 34, 37 / 34)]),
                            (False, [(1.10546875, -0.10546875), (0.7734375, 0.2265625), (0.2265625, 0.7734375),
                                     (-0.10546875, 1.10546875)])):
        expected = torch.zeros(1, 3, 8, 8)  # black before normalisation
        for r, (a, b) in enumerate(rows):
            expected[0, :, 2 + r, :] = (a * p0 + b * p1)[:, None]
        expected = (expected - MEAN) / STD
        out = letterbox(8, antialias)(x)
        assert out.shape == (1, 3, 8, 8)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, :, :2], PAD.expand(1, 3, 2, 8), rtol=0, atol=1e-6)  # nothing cropped


def test_letterbox_of_a_tall_6x3_image_pads_the_odd_margin_right():
    # 6x3 -> 7: scale 7/6, height 7, width round(3.5) = 4; 3 columns of padding: 1 left, 2 right
    c = torch.tensor([10.0, 128.0, 250.0]) / 255
    x = c.view(1, 3, 1, 1).expand(1, 3, 6, 3)
    out = letterbox(7)(x)
    expected = torch.zeros(1, 3, 7, 7)
    expected[..., :, 1:5] = c.view(1, 3, 1, 1)  # a constant image stays constant under bicubic
    torch.testing.assert_close(out, (expected - MEAN) / STD, rtol=0, atol=1e-5)


def test_letterbox_shapes_use_pythons_round():
    assert letterbox_shape(3, 4, 6) == (4, 6)  # 4.5 rounds to even: 4 rows, then 1 row above and 1 below
    assert letterbox_shape(4, 3, 6) == (6, 4)
    assert letterbox_shape(512, 768, 224) == (149, 224)  # 149.33
    assert letterbox_shape(768, 512, 224) == (224, 149)
    assert letterbox_shape(100, 100, 224) == (224, 224)
    out = letterbox(6)(torch.full((1, 3, 3, 4), 1.0))
    assert out.shape == (1, 3, 6, 6)
    white = (1.0 - MEAN) / STD
    torch.testing.assert_close(out[..., 1:5, :], white.expand(1, 3, 4, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., [0, 5], :], PAD.expand(1, 3, 2, 6), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 9), (9, 4), (40, 56), (30, 17)])
@pytest.mark.parametrize("antialias", [True, False])
def test_letterbox_matches_the_hand_reference_on_random_images(shape, antialias):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = (x * 255).round() / 255  # ToTensor of the uint8 image
    out = letterbox(16, antialias)(x)
    torch.testing.assert_close(out, reference_letterbox(q, 16, antialias), rtol=0, atol=2e-5)


def test_square_images_are_resized_without_padding_and_same_size_ones_untouched():
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    shortest = ClipImagePreprocess(size=16, resample="tensor", crop_rounding="round")(x)
    torch.testing.assert_close(letterbox(16)(x), shortest, rtol=0, atol=1e-6)  # square: crop == letterbox
    q = (x * 255).round() / 255
    torch.testing.assert_close(letterbox(24)(x), (q - MEAN) / STD, rtol=0, atol=1e-6)
    # the original leaves a non-square image whose longer side is already `size` unpadded (its ViT then
    # fails); here it is padded like any other
    wide = letterbox(24)(torch.rand(1, 3, 10, 24))
    assert wide.shape == (1, 3, 24, 24)
    torch.testing.assert_close(wide[..., :7, :], PAD.expand(1, 3, 7, 24), rtol=0, atol=1e-6)


def test_letterbox_rejects_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="resample='tensor'"):
        ClipImagePreprocess(size=8, resample="pil", resize_mode="longest")
    with pytest.raises(ValueError, match="crop_size == size"):
        ClipImagePreprocess(size=8, crop_size=6, resample="tensor", resize_mode="longest")
    with pytest.raises(ValueError, match="resize_mode"):
        ClipImagePreprocess(size=8, resize_mode="squash")


# --------------------------------------------------------------------------------------------- text cleaning

@pytest.mark.parametrize("raw, clean", [
    ("a &amp; b", "a & b"),
    ("  A\t\n  Red   CAT \r\n", "a red cat"),  # whitespace_clean, strip, lower
    ("&amp;amp;amp;", "&"),  # ftfy unescapes until stable, then html.unescape twice
    ("<b>&amp;amp;amp;</b>", "<b>&amp;</b>"),  # a literal '<' turns ftfy's unescaping off: two levels only
    ("fish &lt;3 chips", "fish <3 chips"),
    ("&EACUTE;t&eacute;", "été"),  # ftfy also knows upper-cased entities
    ("caf&eacute", "café"),  # html.unescape decodes some entities without ';'
    ("cafÃ©", "café"),  # UTF-8 read as Windows-1252
    # encoded wrongly twice (ftfy's own example)
    ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "the mona lisa doesn't have eyebrows."),
    ("â€œquotedâ€\x9d", '"quoted"'),
    ("“curly” ‘quotes’ don’t", '"curly" \'quotes\' don\'t'),
    ("ＬＯＵＤ\u3000ＮＯＩＳＥＳ", "loud noises"),  # fullwidth forms, ideographic space
    ("ﬁne ﬂower", "fine flower"),  # ligatures
    ("\x1b[31mred\x1b[0m text", "red text"),  # terminal escapes
    ("\x93hi\x94", '"hi"'),  # C1 controls read as Windows-1252
    ("zero\u200bwidth\ufeff", "zero\u200bwidth"),  # U+FEFF removed; U+200B kept (neither ftfy nor \s)
    ("e\u0301te\u0301", "été"),  # NFC
    ("café naïve Ωmega", "café naïve ωmega"),  # correct text is left alone
])
def test_open_clip_clean(raw, clean):
    assert open_clip_clean(raw) == clean


def test_fix_text_approx_keeps_lines_and_case():
    assert fix_text_approx("Line&amp;1\nLine 2 &lt;\n") == "Line&1\nLine 2 <\n"
    assert fix_text_approx("a < b\n&amp;") == "a < b\n&amp;"  # '<' on a line turns unescaping off from there on
    assert fix_text_approx("") == "" and open_clip_clean("   ") == ""
