"""CLIP-based rewards (CLIP score, PickScore, aesthetic, HPSv2) and their shared preprocessing.

Tiny random models in the real ``transformers`` formats are saved to tmp folders and loaded back
through the same code path as real weights.  The HPSv2 conversion is checked on a state dict with the
official OpenCLIP key names and shapes, against a plain-torch OpenCLIP forward written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lit_diffac.rewards.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPScore,
    ClipImagePreprocess,
    LaionAesthetic,
    PickScore,
    WeightsNotFoundError,
    quantize,
    remap_original_mlp,
)
from lit_diffac.rewards.convert import (
    ConversionError,
    convert_hpsv2_checkpoint,
    convert_open_clip_state_dict,
    convert_reward_main,
    save_converted,
)
from lit_diffac.rewards.hps import HPSv2

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
PROMPTS = ["a red cat", "a blue dog on a very long road"]


# --------------------------------------------------------------------------------------------- fixtures

def write_clip_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (the real vocab format: byte symbols, ``</w>`` word ends,
    start / end tokens last), saved to ``folder``."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    src = folder / "_src"
    src.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(folder)
    return folder


def tiny_clip_config(vocab: int, projection: int = 16, act: str = "quick_gelu"):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, hidden_act=act),
        projection_dim=projection)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny ``CLIPModel`` folder with tokenizer and ``preprocessor_config.json`` (like a hub download)."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(folder)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(len(tokenizer)))
    model.save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder))
    return folder


def images(n: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_clip_outputs(folder: Path, imgs: torch.Tensor, prompts: list[str]):
    """Independent path: transformers' own image processor on PIL images + ``CLIPModel.forward``."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    pil = [Image.fromarray(a) for a in quantize(imgs).permute(0, 2, 3, 1).numpy()]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(str(folder))(prompts, padding="max_length", max_length=77,
                                                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)


# --------------------------------------------------------------------------------------------- preprocessing

def test_crop_and_normalisation_match_hand_computed_values():
    # 6x9 image, shorter side already 6: no resize; crop 6x6 at column (9-6)//2 = 1 (floor) or round(1.5) = 2.
    x = torch.arange(3 * 6 * 9, dtype=torch.float32).reshape(1, 3, 6, 9) / (3 * 6 * 9)
    q = (x * 255).round()  # the uint8 image
    for rounding, left in (("floor", 1), ("round", 2)):
        for resample in ("pil", "tensor"):
            out = ClipImagePreprocess(size=6, resample=resample, crop_rounding=rounding)(x)
            expected = (q[..., left:left + 6] / 255.0 - MEAN) / STD
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # one pixel by hand: column 1 of the floor crop is image column 2, value 2/162 -> uint8 round(3.15) = 3
    out = ClipImagePreprocess(size=6, crop_rounding="floor")(x)
    assert out[0, 0, 0, 1].item() == pytest.approx((3 / 255 - 0.48145466) / 0.26862954, abs=1e-6)


def test_pil_resize_matches_transformers_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    imgs = images(3, 11, 15)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    pil = [Image.fromarray(a) for a in quantize(imgs).permute(0, 2, 3, 1).numpy()]
    expected = processor(images=pil, return_tensors="pt")["pixel_values"]
    out = ClipImagePreprocess(size=8, resample="pil", crop_rounding="floor")(imgs)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # and the same as resizing each uint8 image with PIL bicubic by hand: 11x15 -> 8x10 (int(8*15/11)), crop 8x8
    manual = np.asarray(pil[0].resize((10, 8), Image.BICUBIC))[:, 1:9].astype(np.float32) / 255
    manual = (torch.from_numpy(manual).permute(2, 0, 1)[None] - MEAN) / STD
    torch.testing.assert_close(out[:1], manual, rtol=0, atol=1e-6)


def test_tensor_resize_is_openclip_eval_transform():
    # ToTensor(uint8) then bicubic resize of the shorter side (20 -> 8, 30 -> 12), crop at round(2.0) = 2
    imgs = images(2, 20, 30)
    q = quantize(imgs).float() / 255
    for antialias in (True, False):
        out = ClipImagePreprocess(size=8, resample="tensor", crop_rounding="round", antialias=antialias)(imgs)
        resized = F.interpolate(q, size=(8, 12), mode="bicubic", align_corners=False, antialias=antialias)
        torch.testing.assert_close(out, (resized[..., 2:10] - MEAN) / STD, rtol=0, atol=1e-6)
    # bicubic keeps a constant image constant: every output pixel is (c - mean) / std
    const = torch.full((1, 3, 20, 30), 0.6)
    out = ClipImagePreprocess(size=8, resample="tensor")(const)
    c = round(0.6 * 255) / 255
    torch.testing.assert_close(out, ((torch.full((1, 3, 8, 8), c) - MEAN) / STD), rtol=0, atol=1e-5)
    # PIL (uint8) and antialiased tensor resizing agree to about a grey level
    pil = ClipImagePreprocess(size=8, resample="pil", crop_rounding="round")(imgs) * STD
    ten = ClipImagePreprocess(size=8, resample="tensor", crop_rounding="round")(imgs) * STD
    assert (pil - ten).abs().max() < 2.5 / 255


def test_preprocess_reads_the_processor_config(clip_dir):
    pre = ClipImagePreprocess.from_processor_config(clip_dir, size=224)
    assert (pre.size, pre.crop_size) == (32, 32)
    assert ClipImagePreprocess.from_processor_config(clip_dir / "nowhere", size=224).size == 224


# --------------------------------------------------------------------------------------------- CLIP score / PickScore

def test_clip_score_matches_transformers_forward(clip_dir):
    imgs = images()
    ref = reference_clip_outputs(clip_dir, imgs, PROMPTS)
    cos = (ref.image_embeds * ref.text_embeds).sum(-1)
    raw = CLIPScore(str(clip_dir), convention="cosine")(imgs, PROMPTS)
    torch.testing.assert_close(raw, cos, rtol=0, atol=1e-5)
    tm = CLIPScore(str(clip_dir), batch_size=1)(imgs, PROMPTS)
    torch.testing.assert_close(tm, 100 * cos.clamp(min=0), rtol=0, atol=1e-3)
    assert CLIPScore(str(clip_dir)).name == "clip_score"


def test_pickscore_applies_the_logit_scale(clip_dir):
    imgs = images(seed=1)
    ref = reference_clip_outputs(clip_dir, imgs, PROMPTS)
    reward = PickScore(str(clip_dir), processor=str(clip_dir))
    scores = reward(imgs, PROMPTS)
    torch.testing.assert_close(scores, ref.logits_per_image.diagonal(), rtol=0, atol=1e-4)
    assert reward.name == "pickscore" and scores.dtype == torch.float32


def test_scores_do_not_depend_on_chunking_or_dtype_argument(clip_dir):
    imgs = images(3, 32, 32, seed=2)
    prompts = PROMPTS + ["x"]
    a = PickScore(str(clip_dir))(imgs, prompts)
    b = PickScore(str(clip_dir), batch_size=2, dtype="fp32")(imgs, prompts)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = PickScore(str(clip_dir), dtype="bfloat16")(imgs, prompts)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()


# --------------------------------------------------------------------------------------------- aesthetic

def test_aesthetic_predictor_on_normalised_clip_embeddings(clip_dir, tmp_path):
    from torch import nn

    torch.manual_seed(3)
    # the original MLP layout (improved-aesthetic-predictor/simple_inference.py), tiny widths
    original = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.2), nn.Linear(32, 8), nn.Dropout(0.2), nn.Linear(8, 8),
                             nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)).eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in original.state_dict().items()}, path)
    assert sorted({k.split(".")[1] for k in torch.load(path)}) == ["0", "2", "4", "6", "7"]

    reward = LaionAesthetic(predictor=str(path), clip_model=str(clip_dir))
    imgs = images(2, 32, 32, seed=4)  # square: torchvision's and transformers' crops agree
    ref = reference_clip_outputs(clip_dir, imgs, PROMPTS)
    with torch.no_grad():
        expected = original(ref.image_embeds).squeeze(-1)  # image_embeds are L2-normalised
    torch.testing.assert_close(reward(imgs, PROMPTS), expected, rtol=0, atol=1e-5)
    assert reward.name == "aesthetic"


def test_original_mlp_remap_rejects_other_layouts():
    state, dims = remap_original_mlp({"layers.0.weight": torch.zeros(4, 3), "layers.0.bias": torch.zeros(4),
                                      "layers.2.weight": torch.zeros(1, 4), "layers.2.bias": torch.zeros(1)})
    assert dims == [3, 4, 1] and sorted(state) == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                                                   "layers.1.weight"]
    with pytest.raises(ValueError, match="unexpected keys"):
        remap_original_mlp({"fc.weight": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="takes 5 inputs"):
        remap_original_mlp({"layers.0.weight": torch.zeros(4, 3), "layers.0.bias": torch.zeros(4),
                            "layers.2.weight": torch.zeros(1, 5), "layers.2.bias": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- missing weights

def test_missing_weights_say_which_file_and_where_to_get_it(tmp_path, clip_dir):
    with pytest.raises(WeightsNotFoundError) as err:
        PickScore(str(tmp_path / "PickScore_v1"))
    assert str(tmp_path / "PickScore_v1") in str(err.value) and "yuvalkirstain/PickScore_v1" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="openai/clip-vit-large-patch14"):
        CLIPScore("openai/clip-vit-large-patch14")  # a hub id is not a folder: never downloaded
    with pytest.raises(WeightsNotFoundError) as err:
        LaionAesthetic(predictor=str(tmp_path / "sac.pth"), clip_model=str(clip_dir))
    assert "sac.pth" in str(err.value) and "improved-aesthetic-predictor" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        HPSv2(str(empty))
    with pytest.raises(WeightsNotFoundError, match="xswu/HPSv2"):
        HPSv2(str(tmp_path / "hps"))
    assert issubclass(WeightsNotFoundError, FileNotFoundError)


# --------------------------------------------------------------------------------------------- HPSv2 (OpenCLIP)

W, VW, P, PATCH, IMG, CTX = 32, 48, 16, 8, 32, 77  # text width, vision width, projection, patch, image, context


def open_clip_state_dict(vocab: int, text_layers: int = 2, vision_layers: int = 2, seed: int = 0):
    """A random state dict with the official OpenCLIP ``CLIP`` key names and shapes (``model.py`` /
    ``transformer.py`` of tgxs002/HPSv2's vendored open_clip), at tiny size."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def block(prefix: str, d: int) -> dict:
        return {f"{prefix}ln_1.weight": 1 + r(d), f"{prefix}ln_1.bias": r(d),
                f"{prefix}attn.in_proj_weight": r(3 * d, d), f"{prefix}attn.in_proj_bias": r(3 * d),
                f"{prefix}attn.out_proj.weight": r(d, d), f"{prefix}attn.out_proj.bias": r(d),
                f"{prefix}ln_2.weight": 1 + r(d), f"{prefix}ln_2.bias": r(d),
                f"{prefix}mlp.c_fc.weight": r(4 * d, d), f"{prefix}mlp.c_fc.bias": r(4 * d),
                f"{prefix}mlp.c_proj.weight": r(d, 4 * d), f"{prefix}mlp.c_proj.bias": r(d)}

    sd = {"positional_embedding": r(CTX, W), "text_projection": r(W, P), "logit_scale": torch.tensor(4.6052),
          "token_embedding.weight": r(vocab, W), "ln_final.weight": 1 + r(W), "ln_final.bias": r(W),
          "visual.class_embedding": r(VW), "visual.positional_embedding": r((IMG // PATCH) ** 2 + 1, VW),
          "visual.proj": r(VW, P), "visual.conv1.weight": r(VW, 3, PATCH, PATCH),
          "visual.ln_pre.weight": 1 + r(VW), "visual.ln_pre.bias": r(VW),
          "visual.ln_post.weight": 1 + r(VW), "visual.ln_post.bias": r(VW)}
    for i in range(text_layers):
        sd.update(block(f"transformer.resblocks.{i}.", W))
    for i in range(vision_layers):
        sd.update(block(f"visual.transformer.resblocks.{i}.", VW))
    return sd


def _ln(x, sd, key, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _resblock(x, sd, prefix, heads, mask=None):
    """OpenCLIP ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` loaded from ``in_proj_*``."""
    d = x.shape[-1]
    attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    attn.load_state_dict({k: sd[f"{prefix}attn.{k}"] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                                "out_proj.bias")})
    h = _ln(x, sd, f"{prefix}ln_1")
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = _ln(x, sd, f"{prefix}ln_2")
    h = F.gelu(F.linear(h, sd[f"{prefix}mlp.c_fc.weight"], sd[f"{prefix}mlp.c_fc.bias"]))
    return x + F.linear(h, sd[f"{prefix}mlp.c_proj.weight"], sd[f"{prefix}mlp.c_proj.bias"])


def open_clip_encode_image(sd, pixels, heads, layers=2):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(layers):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def open_clip_encode_text(sd, ids, heads, layers=2):
    """OpenCLIP ``encode_text``: ids padded with 0 to the full context, causal mask, pooled at argmax."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(layers):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", heads, mask)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory, clip_tokenizer_dir) -> tuple[Path, dict]:
    """The tiny official-layout checkpoint ``{"state_dict": ...}`` converted by the CLI into a folder."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(clip_tokenizer_dir)))
    sd = open_clip_state_dict(vocab)
    root = tmp_path_factory.mktemp("hps")
    torch.save({"epoch": 1, "name": "tiny", "state_dict": sd}, root / "HPS_v2.1_compressed.pt")
    status = convert_reward_main(["hpsv2", str(root / "HPS_v2.1_compressed.pt"), str(root / "out"),
                                  "--tokenizer", str(clip_tokenizer_dir), "--vision-heads", "2", "--text-heads", "4"])
    assert status == 0
    return root / "out", sd


def test_open_clip_conversion_consumes_every_key_and_fills_every_parameter():
    from transformers import CLIPModel

    sd = open_clip_state_dict(vocab=50)
    config, state = convert_open_clip_state_dict(sd, vision_heads=2, text_heads=4)
    model = CLIPModel(config)
    result = model.load_state_dict(state, strict=True)  # every target parameter filled, nothing unexpected
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in sd.values())  # nothing lost
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, config.projection_dim) == (IMG, PATCH, P)
    assert (config.text_config.max_position_embeddings, config.text_config.num_hidden_layers) == (CTX, 2)
    # the in_proj split and the projection transposes
    q, k, v = sd["transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    layer = model.text_model.encoder.layers[1].self_attn
    assert torch.equal(layer.q_proj.weight, q) and torch.equal(layer.k_proj.weight, k)
    assert torch.equal(layer.v_proj.weight, v)
    assert torch.equal(layer.v_proj.bias, sd["transformer.resblocks.1.attn.in_proj_bias"][2 * W:])
    assert torch.equal(model.visual_projection.weight, sd["visual.proj"].T)
    assert torch.equal(model.text_projection.weight, sd["text_projection"].T)


def test_open_clip_conversion_fails_loudly_on_another_architecture():
    sd = open_clip_state_dict(vocab=50)
    with pytest.raises(ConversionError, match="ls_1.gamma"):  # layer scale: not a plain CLIP
        convert_open_clip_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VW)},
                                     vision_heads=2, text_heads=4)
    del sd["visual.ln_post.bias"]
    with pytest.raises(ConversionError, match="visual.ln_post.bias"):
        convert_open_clip_state_dict(sd, vision_heads=2, text_heads=4)
    with pytest.raises(ConversionError, match="divisible"):
        convert_hpsv2_checkpoint({"state_dict": open_clip_state_dict(vocab=50)}, vision_heads=5, text_heads=4)


def test_converted_clip_matches_a_plain_torch_open_clip(hps_dir):
    from transformers import AutoTokenizer, CLIPModel

    folder, sd = hps_dir
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=CTX, return_tensors="pt")["input_ids"]
    eot = len(tokenizer) - 1
    first = (ids == eot).int().argmax(-1)
    ids = torch.where(ids == eot, 0, ids)  # OpenCLIP pads with 0 after the end token
    ids[torch.arange(2), first] = eot
    with torch.no_grad():
        ref_img = open_clip_encode_image(sd, pixels, heads=2)
        ref_txt = open_clip_encode_text(sd, ids, heads=4)
        hf_img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        hf_txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(hf_img, ref_img, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_txt, ref_txt, rtol=1e-4, atol=1e-4)


def test_hpsv2_reward_is_the_open_clip_cosine(hps_dir):
    from transformers import AutoTokenizer

    folder, sd = hps_dir
    reward = HPSv2(str(folder))
    imgs = images(2, 40, 56, seed=6)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    # HPSv2's ResizeMaxSize(32): ToTensor, longer side 56 -> 32, 40 -> round(22.86) = 23 (bicubic on the float
    # tensor, as torchvision), then 9 black rows: 4 above, 5 below; nothing cropped
    resized = F.interpolate(quantize(imgs).float() / 255, size=(23, 32), mode="bicubic", align_corners=False,
                            antialias=True)
    pixels = (F.pad(resized, (0, 0, 4, 5), value=0.0) - MEAN) / STD
    with torch.no_grad():
        img = F.normalize(open_clip_encode_image(sd, pixels, heads=2), dim=-1)
        txt = F.normalize(open_clip_encode_text(sd, ids, heads=4), dim=-1)
    torch.testing.assert_close(reward(imgs, PROMPTS), (img * txt).sum(-1), rtol=1e-4, atol=1e-4)
    assert reward.name == "hpsv2"
    assert json.loads((folder / "conversion.json").read_text())["source"] == "HPS_v2.1_compressed.pt"


def test_hpsv2_cleans_prompts_like_open_clip(hps_dir):
    """OpenCLIP's tokenizer unescapes HTML, repairs text (ftfy), collapses whitespace and lower-cases before
    tokenising; the ``transformers`` tokenizer alone does not unescape."""
    from transformers import AutoTokenizer

    folder, _ = hps_dir
    reward = HPSv2(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    plain = tokenizer(["a & b"])["input_ids"]
    assert tokenizer(["a &amp; b"])["input_ids"] != plain  # what HPSv2 gave before the cleaning
    for prompt in ("a &amp; b", "  a \t &amp;\n  b  ", "A &AMP; B", "a &amp;amp; b"):
        assert reward.tokenize([prompt])["input_ids"].tolist() == plain
    imgs = images(2, 32, 48, seed=7)
    cleaned = reward(imgs, ["a &amp; b", "cafÃ©  au   lait"])
    torch.testing.assert_close(cleaned, reward(imgs, ["a & b", "café au lait"]), rtol=0, atol=0)


def test_convert_command_is_registered_and_reports_errors(tmp_path, capsys, clip_tokenizer_dir):
    from lit_diffac.cli import EXTRA_COMMANDS, main

    assert "convert-reward" in EXTRA_COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-reward", "hpsv2", str(tmp_path / "missing.pt"), str(tmp_path / "out"),
              "--tokenizer", str(clip_tokenizer_dir)])
    assert exit_info.value.code == 2
    assert "missing.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, bad)
    argv = ["hpsv2", str(bad), str(tmp_path / "out2"), "--tokenizer", str(clip_tokenizer_dir)]
    assert convert_reward_main(argv) == 2
    assert "missing from the checkpoint" in capsys.readouterr().err


def test_save_converted_round_trips(tmp_path, clip_tokenizer_dir):
    from transformers import AutoTokenizer, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(str(clip_tokenizer_dir))
    config, state = convert_open_clip_state_dict(open_clip_state_dict(len(tokenizer)), vision_heads=2, text_heads=4,
                                                 dtype="bfloat16")
    save_converted(config, state, tmp_path / "out", tokenizer)
    model = CLIPModel.from_pretrained(str(tmp_path / "out"))
    assert model.text_projection.weight.dtype == torch.bfloat16


def test_weights_that_do_not_fit_the_config_fail_instead_of_reinitialising(clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "wrong"
    shutil.copytree(clip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 8
    config["text_config"]["projection_dim"] = config["vision_config"]["projection_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit CLIPModel"):
        CLIPScore(str(folder))
