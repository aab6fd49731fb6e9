"""ImageReward: conversion of the official state-dict layout, numerics against a plain-torch BLIP written
here (ViT of BLIP's ``vit.py``, BERT with cross-attention of BLIP's ``med.py``), and the reward."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_diffac.rewards.clip import ClipImagePreprocess, WeightsNotFoundError
from lit_diffac.rewards.convert import ConversionError, convert_image_reward_state_dict, convert_reward_main
from lit_diffac.rewards.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, ImageReward, ImageRewardModel

VW, TW, PATCH, IMG, MAXPOS = 32, 24, 8, 32, 40  # vision width, text width, patch, image size, positions
VH, TH, LAYERS = 2, 2, 2  # heads, layers
MLP = (TW, 32, 16, 8, 4, 1)
PROMPTS = ["a cat", "a dog and a cat"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "and", "cat", "dog", "##s", "the", "on", "red"]


def write_bert_tokenizer(folder: Path):
    """A tiny uncased BERT WordPiece tokenizer (like ``bert-base-uncased``, without BLIP's extra tokens)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


DOC = Path(__file__).resolve().parent.parent / "docs" / "rewards.md"


def documented_bert_files() -> list[str]:
    """The bert-base-uncased files that docs/rewards.md tells users to download."""
    match = re.search(r"huggingface-cli download google-bert/bert-base-uncased ([^\n\\]+)", DOC.read_text())
    assert match, "docs/rewards.md no longer downloads google-bert/bert-base-uncased"
    return match.group(1).split()


def write_downloaded_bert(folder: Path, files: list[str], words: list[str] = WORDS) -> Path:
    """Tiny tokenizer files in the shape of the hub's google-bert/bert-base-uncased: vocab.txt, a
    tokenizer_config.json that names no tokenizer class ({"do_lower_case": true, "model_max_length": 512}),
    the `tokenizers` serialisation tokenizer.json; no config.json, no special_tokens_map.json."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    if "tokenizer.json" in files:
        BertTokenizer(str(folder / "vocab.txt")).backend_tokenizer.save(str(folder / "tokenizer.json"))
    if "tokenizer_config.json" in files:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    if "vocab.txt" not in files:
        (folder / "vocab.txt").unlink()
    return folder


def hand_ids(*words: int) -> list[int]:
    """[CLS] words [SEP], padded with [PAD] (id 0) to ImageReward's 35 tokens."""
    return [2, *words, 3] + [0] * (35 - len(words) - 2)


def image_reward_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the official ImageReward.pt key names and shapes at tiny size."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def lin(key, out, inp):
        return {f"{key}.weight": r(out, inp), f"{key}.bias": r(out)}

    def ln(key, d):
        return {f"{key}.weight": 1 + r(d), f"{key}.bias": r(d)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {f"{v}cls_token": r(1, 1, VW), f"{v}pos_embed": r(1, (IMG // PATCH) ** 2 + 1, VW),
          f"{v}patch_embed.proj.weight": r(VW, 3, PATCH, PATCH), f"{v}patch_embed.proj.bias": r(VW),
          **ln(f"{v}norm", VW)}
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        sd.update({**ln(b + "norm1", VW), **lin(b + "attn.qkv", 3 * VW, VW), **lin(b + "attn.proj", VW, VW),
                   **ln(b + "norm2", VW), **lin(b + "mlp.fc1", 4 * VW, VW), **lin(b + "mlp.fc2", VW, 4 * VW)})
    sd.update({f"{t}embeddings.position_ids": torch.arange(MAXPOS).expand(1, -1),
               f"{t}embeddings.word_embeddings.weight": r(vocab, TW),
               f"{t}embeddings.position_embeddings.weight": r(MAXPOS, TW), **ln(f"{t}embeddings.LayerNorm", TW)})
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        for kind, ctx in (("attention", TW), ("crossattention", VW)):
            sd.update({**lin(f"{b}{kind}.self.query", TW, TW), **lin(f"{b}{kind}.self.key", TW, ctx),
                       **lin(f"{b}{kind}.self.value", TW, ctx), **lin(f"{b}{kind}.output.dense", TW, TW),
                       **ln(f"{b}{kind}.output.LayerNorm", TW)})
        sd.update({**lin(b + "intermediate.dense", 2 * TW, TW), **lin(b + "output.dense", TW, 2 * TW),
                   **ln(b + "output.LayerNorm", TW)})
    sd.update({**lin("blip.vision_proj", 8, VW), **lin("blip.text_proj", 8, TW)})
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(MLP[:-1], MLP[1:])):
        sd.update(lin(f"mlp.layers.{index}", b, a))
    return sd


# --------------------------------------------------------------------------------------------- reference

def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _lin(x, sd, key):
    return F.linear(x, sd[f"{key}.weight"], sd[f"{key}.bias"])


def blip_vit(sd, pixels):
    """BLIP ``VisionTransformer.forward`` (timm-style blocks, LayerNorm eps 1e-6, final norm)."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[v + "pos_embed"][:, : x.shape[1]]
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        n, length, c = h.shape
        qkv = _lin(h, sd, b + "attn.qkv").reshape(n, length, 3, VH, c // VH).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // VH) ** -0.5).softmax(-1)
        x = x + _lin((attn @ qkv[2]).transpose(1, 2).reshape(n, length, c), sd, b + "attn.proj")
        h = _ln(x, sd, b + "norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def _bert_attention(x, ctx, mask, sd, key):
    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], TH, TW // TH).transpose(1, 2)

    q, k, v = (heads(_lin(inp, sd, f"{key}.self.{n}")) for inp, n in ((x, "query"), (ctx, "key"), (ctx, "value")))
    probs = ((q @ k.transpose(-2, -1)) / (TW // TH) ** 0.5 + mask).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(x.shape)
    return _ln(_lin(out, sd, f"{key}.output.dense") + x, sd, f"{key}.output.LayerNorm", 1e-12)


def blip_image_reward(sd, pixels, ids, mask):
    """``ImageReward.score``: BLIP text encoder (mode multimodal) on the image tokens, [CLS] → MLP → normalise."""
    t = "blip.text_encoder."
    image = blip_vit(sd, pixels)
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BLIP's get_extended_attention_mask
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        x = _bert_attention(x, x, extended, sd, b + "attention")
        x = _bert_attention(x, image, 0.0, sd, b + "crossattention")
        h = F.gelu(_lin(x, sd, b + "intermediate.dense"))
        x = _ln(_lin(h, sd, b + "output.dense") + x, sd, b + "output.LayerNorm", 1e-12)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # Dropouts at 1, 3, 5 are identities at inference
        r = _lin(r, sd, f"mlp.layers.{index}")
    return (r.squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("image_reward")
    tokenizer = write_bert_tokenizer(root / "bert-base-uncased")
    sd = image_reward_state_dict(vocab=len(tokenizer) + 2)  # + [DEC], [ENC]
    torch.save(sd, root / "ImageReward.pt")
    status = convert_reward_main(["image-reward", str(root / "ImageReward.pt"), str(root / "out"),
                                  "--tokenizer", str(root / "bert-base-uncased"), "--vision-heads", str(VH),
                                  "--text-heads", str(TH)])
    assert status == 0
    return root / "out", sd


# --------------------------------------------------------------------------------------------- tests

def test_conversion_consumes_every_key_and_fills_every_parameter():
    sd = image_reward_state_dict(vocab=15)
    config, state = convert_image_reward_state_dict(sd, vision_heads=VH, text_heads=TH)
    model = ImageRewardModel(config)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    dropped = [k for k in sd if k.endswith("position_ids") or k.startswith(("blip.vision_proj", "blip.text_proj"))]
    assert len(dropped) == 5
    assert sum(v.numel() for v in state.values()) == sum(sd[k].numel() for k in sd if k not in dropped)
    assert config["mlp_dims"] == list(MLP)
    assert config["vision_config"]["image_size"] == IMG and config["text_config"]["encoder_hidden_size"] == VW
    # the MLP's Linear layers 0, 2, 4, 6, 7 become 0..4; qkv keeps its [q; k; v] packing
    assert torch.equal(model.mlp.layers[4].weight, sd["mlp.layers.7.weight"])
    assert torch.equal(model.mlp.layers[3].bias, sd["mlp.layers.6.bias"])
    assert torch.equal(model.vision_model.encoder.layers[1].self_attn.qkv.weight,
                       sd["blip.visual_encoder.blocks.1.attn.qkv.weight"])


def test_conversion_fails_loudly_on_unknown_or_missing_keys():
    sd = image_reward_state_dict(vocab=15)
    with pytest.raises(ConversionError, match="blip.itm_head.weight"):
        convert_image_reward_state_dict({**sd, "blip.itm_head.weight": torch.zeros(2, TW)}, vision_heads=VH,
                                        text_heads=TH)
    broken = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}
    with pytest.raises(ConversionError, match="crossattention.self.key.bias"):
        convert_image_reward_state_dict(broken, vision_heads=VH, text_heads=TH)
    relu_mlp = {k.replace("mlp.layers.7", "mlp.layers.8"): v for k, v in sd.items()}
    with pytest.raises(ConversionError, match="MLP"):
        convert_image_reward_state_dict(relu_mlp, vision_heads=VH, text_heads=TH)


def test_converted_model_matches_a_plain_torch_blip(converted):
    folder, sd = converted
    model = ImageRewardModel.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, IMG, IMG, generator=g)
    ids = torch.tensor([[2, 5, 7, 3, 0, 0], [2, 5, 8, 6, 7, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids, mask), blip_image_reward(sd, pixels, ids, mask),
                                   rtol=1e-4, atol=1e-4)
        raw = model(pixels, ids, mask, normalize=False)
    torch.testing.assert_close((raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD, model(pixels, ids, mask))


def test_image_reward_end_to_end(converted):
    from transformers import AutoTokenizer

    folder, sd = converted
    reward = ImageReward(str(folder), batch_size=1)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == len(WORDS) + 2 and tokenizer.bos_token == "[DEC]"
    imgs = torch.rand(2, 3, 36, 48, generator=torch.Generator().manual_seed(2))
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35)
    pixels = ClipImagePreprocess(size=IMG, resample="pil", crop_rounding="round")(imgs)
    with torch.no_grad():
        expected = blip_image_reward(sd, pixels, tokens["input_ids"], tokens["attention_mask"])
    scores = reward(imgs, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert reward.name == "image_reward" and scores.shape == (2,)
    raw = ImageReward(str(folder), normalize=False)(imgs, PROMPTS)
    torch.testing.assert_close(raw, expected * IMAGE_REWARD_STD + IMAGE_REWARD_MEAN, rtol=1e-4, atol=1e-4)


def test_missing_weights_and_wrong_tokenizer(tmp_path, capsys):
    with pytest.raises(WeightsNotFoundError) as err:
        ImageReward(str(tmp_path / "image-reward"))
    assert str(tmp_path / "image-reward") in str(err.value) and "THUDM/ImageReward" in str(err.value)
    write_bert_tokenizer(tmp_path / "bert")
    torch.save(image_reward_state_dict(vocab=99), tmp_path / "ImageReward.pt")
    status = convert_reward_main(["image-reward", str(tmp_path / "ImageReward.pt"), str(tmp_path / "out"),
                                  "--tokenizer", str(tmp_path / "bert"), "--vision-heads", "2", "--text-heads", "2"])
    assert status == 2 and "expected bert-base-uncased" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- tokenizer files

def _convert(tmp_path: Path, bert: Path, out: str = "out") -> int:
    if not (tmp_path / "ImageReward.pt").exists():
        torch.save(image_reward_state_dict(vocab=len(WORDS) + 2), tmp_path / "ImageReward.pt")
    return convert_reward_main(["image-reward", str(tmp_path / "ImageReward.pt"), str(tmp_path / out),
                                "--tokenizer", str(bert), "--vision-heads", str(VH), "--text-heads", str(TH)])


@pytest.mark.parametrize("files", [documented_bert_files(), ["vocab.txt"]], ids=["as-documented", "vocab-only"])
def test_the_documented_bert_download_converts_and_scores(tmp_path, files):
    """The tokenizer files as downloaded name no tokenizer class: ``AutoTokenizer`` builds a tokenizer without
    a padding token from them, so scoring failed ("Asking to pad ...") although the conversion exited 0.
    BLIP's BertTokenizer is now built from vocab.txt explicitly."""
    assert "vocab.txt" in documented_bert_files()
    bert = write_downloaded_bert(tmp_path / "bert-base-uncased", files)
    assert _convert(tmp_path, bert) == 0
    reward = ImageReward(str(tmp_path / "out"))
    # WORDS ids: [PAD] 0, [CLS] 2, [SEP] 3, a 5, and 6, cat 7, dog 8, ##s 9; [DEC] 13, [ENC] 14
    prompts = ["a cat", "A DOG and cats"]
    ids = torch.tensor([hand_ids(5, 7), hand_ids(5, 8, 6, 7, 9)])
    tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].tolist() == ids.tolist()
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [13, 14]
    assert reward.tokenizer.bos_token == "[DEC]"
    imgs = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    pixels = ClipImagePreprocess(size=IMG, resample="pil", crop_rounding="round")(imgs)
    with torch.no_grad():
        expected = blip_image_reward(image_reward_state_dict(vocab=len(WORDS) + 2), pixels, ids, (ids != 0).long())
    torch.testing.assert_close(reward(imgs, prompts), expected, rtol=1e-4, atol=1e-4)


def test_a_folder_converted_before_the_fix_still_scores(converted, tmp_path):
    """Older conversions saved the tokenizer without a tokenizer class or padding token; ImageReward loads
    it as a BertTokenizer, which pads with [PAD]."""
    folder = tmp_path / "old"
    shutil.copytree(converted[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("pad_token", "tokenizer_class", "cls_token", "sep_token"):
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    reward = ImageReward(str(folder))
    assert reward.tokenizer(["a cat"], padding="max_length", max_length=35)["input_ids"] == [hand_ids(5, 7)]
    imgs = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(reward(imgs, ["a cat"]), ImageReward(str(converted[0]))(imgs, ["a cat"]))


def test_tokenizer_folders_that_cannot_score_fail_at_conversion(tmp_path, capsys):
    no_vocab = write_downloaded_bert(tmp_path / "no-vocab", ["tokenizer.json", "tokenizer_config.json"])
    assert _convert(tmp_path, no_vocab, "out1") == 2
    assert "no vocab.txt" in capsys.readouterr().err and not (tmp_path / "out1").exists()
    no_pad = write_downloaded_bert(tmp_path / "no-pad", ["vocab.txt"], words=[w if w != "[PAD]" else "[unused0]"
                                                                            for w in WORDS])
    assert _convert(tmp_path, no_pad, "out2") == 2
    assert "lacks the BERT special tokens ['[PAD]']" in capsys.readouterr().err
    assert _convert(tmp_path, tmp_path / "nowhere", "out3") == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_converted_folder_with_another_tokenizer_fails_at_construction(converted, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(converted[0], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    write_bert_tokenizer(folder)  # 13 tokens: no [DEC] / [ENC]
    with pytest.raises(ValueError, match="convert the checkpoint again"):
        ImageReward(str(folder))
