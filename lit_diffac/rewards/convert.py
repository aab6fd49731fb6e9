"""Convert official reward-model checkpoints into ``transformers`` layouts, once, offline.

* HPSv2 / HPSv2.1 (OpenCLIP ViT-H-14 state dict) → ``transformers`` ``CLIPModel`` folder
  (:func:`convert_open_clip_state_dict`, :func:`convert_hpsv2_checkpoint`);
* ImageReward v1.0 (BLIP ViT-L + BERT with cross-attention + MLP) → :class:`ImageRewardModel` folder
  (:func:`convert_image_reward_state_dict`);
* the LAION aesthetic MLP needs no conversion (:class:`~lit_diffac.rewards.clip.LaionAesthetic` reads the
  ``.pth`` directly).

Every conversion accounts for every source key (each is mapped, or dropped for a stated reason, or the
conversion fails naming it) and fills every parameter of the target model (checked against the target's
own state dict: names and shapes), so a checkpoint of a different architecture fails loudly.

Command line (``lit-diffac convert-reward``)::

    lit-diffac convert-reward hpsv2 HPS_v2.1_compressed.pt hps-v2.1 --tokenizer clip-vit-h-14-tokenizer
    lit-diffac convert-reward image-reward ImageReward.pt image-reward --tokenizer bert-base-uncased
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from lit_diffac.rewards.clip import ORIGINAL_MLP_LINEAR_INDICES, parse_dtype

__all__ = [
    "ConversionError",
    "load_checkpoint",
    "convert_open_clip_state_dict",
    "convert_hpsv2_checkpoint",
    "convert_image_reward_state_dict",
    "save_converted",
    "convert_reward_main",
]


class ConversionError(ValueError):
    """A checkpoint does not match the expected architecture (a key left over, missing or mis-shaped)."""


class _Source:
    """A source state dict whose keys must each be consumed (mapped) or dropped (with a reason)."""

    def __init__(self, state_dict: Mapping[str, Tensor], what: str) -> None:
        self.state = dict(state_dict)
        self.what = what
        self.used: set[str] = set()
        self.dropped: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def peek(self, key: str) -> Tensor:
        if key not in self.state:
            raise ConversionError(f"{self.what}: key {key!r} is missing from the checkpoint")
        return self.state[key]

    def take(self, key: str) -> Tensor:
        value = self.peek(key)
        self.used.add(key)
        return value

    def drop(self, key: str, reason: str) -> None:
        self.peek(key)
        self.dropped[key] = reason

    def count(self, pattern: str) -> int:
        """Number of distinct integers ``i`` such that some key matches ``pattern`` with ``{i}``."""
        regex = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)"))
        found = {int(m.group(1)) for k in self.state if (m := regex.match(k))}
        if found and found != set(range(len(found))):
            raise ConversionError(f"{self.what}: layers {sorted(found)} of {pattern!r} are not numbered 0..n-1")
        return len(found)

    def leftover(self) -> list[str]:
        return sorted(set(self.state) - self.used - set(self.dropped))


def _finish(source: _Source, target: nn.Module, state: dict[str, Tensor]) -> None:
    """Fail unless every source key was consumed and ``state`` fills ``target`` exactly (names, shapes)."""
    left = source.leftover()
    if left:
        raise ConversionError(f"{source.what}: {len(left)} checkpoint key(s) have no place in the target model "
                              f"(a different architecture?): {left[:8]}{' ...' if len(left) > 8 else ''}")
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise ConversionError(f"{source.what}: the converted weights do not fill the target exactly; missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")


def _meta_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model without allocating or initialising its weights (only names and shapes are needed)."""
    with torch.device("meta"):
        return factory()


def _cast(state: dict[str, Tensor], dtype: str | torch.dtype | None) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(parse_dtype(dtype))
        out[k] = v.contiguous().clone()  # no shared storage (q/k/v splits) for safetensors
    return out


# --------------------------------------------------------------------------------------------- loading

def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint's state dict: ``.safetensors``, or a PyTorch file loaded with ``weights_only=True``
    (``trust_pickle=True`` allows arbitrary pickles, only for files from a source you trust).

    A ``{"state_dict": ...}`` (HPSv2) or ``{"model": ...}`` wrapper is unwrapped and a ``module.`` prefix
    (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
        except Exception as err:  # noqa: BLE001 - weights_only refusals come in several types
            if trust_pickle:
                raise
            raise ConversionError(f"cannot read '{path}' as tensors only ({type(err).__name__}: {err}); if the file "
                                  "comes from a source you trust, pass --trust-pickle") from err
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"'{path}' does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# --------------------------------------------------------------------------------------------- OpenCLIP → CLIPModel

def _open_clip_tower(source: _Source, src: str, dst: str, layers: int, out: dict[str, Tensor]) -> None:
    """Map OpenCLIP residual blocks ``{src}{i}.*`` onto ``transformers`` CLIP layers ``{dst}{i}.*``."""
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{d}{b}.weight"] = source.take(f"{s}{a}.weight")
            out[f"{d}{b}.bias"] = source.take(f"{s}{a}.bias")
        # nn.MultiheadAttention packs [q; k; v] along the output dimension.
        weight, bias = source.take(f"{s}attn.in_proj_weight"), source.take(f"{s}attn.in_proj_bias")
        if weight.shape[0] != 3 * weight.shape[1]:
            raise ConversionError(f"{s}attn.in_proj_weight has shape {tuple(weight.shape)}, expected [3d, d]")
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3, dim=0), bias.chunk(3, dim=0)):
            out[f"{d}self_attn.{name}.weight"] = w
            out[f"{d}self_attn.{name}.bias"] = b


def convert_open_clip_state_dict(state_dict: Mapping[str, Tensor], *, vision_heads: int, text_heads: int,
                                 hidden_act: str = "gelu", layer_norm_eps: float = 1e-5,
                                 dtype: str | None = None) -> tuple[Any, dict[str, Tensor]]:
    """OpenCLIP ``CLIP`` state dict (ViT image tower, standard text tower) → ``(CLIPConfig, state dict)``
    for ``transformers.CLIPModel``.

    Sizes (widths, layers, patch, image size, context length, vocabulary, projection) are read from the
    shapes; the numbers of heads cannot be and are arguments (ViT-H-14: 16 and 16).  Key mapping:
    ``visual.conv1`` → ``patch_embedding``, ``visual.class_embedding`` / ``positional_embedding`` →
    embeddings, ``ln_pre`` → ``pre_layrnorm``, ``ln_post`` → ``post_layernorm``, resblocks'
    ``attn.in_proj_{weight,bias}`` split into ``q/k/v_proj``, ``ln_1/ln_2`` → ``layer_norm1/2``,
    ``mlp.c_fc/c_proj`` → ``mlp.fc1/fc2``, ``visual.proj`` and ``text_projection`` (``x @ P``) transposed
    into the ``Linear`` weights of ``visual_projection`` / ``text_projection``, ``ln_final`` →
    ``final_layer_norm``.  ``eos_token_id`` is set to 2 so that ``transformers`` pools the text at the
    argmax token id, exactly as OpenCLIP does.

    Raises:
        ConversionError: a key left over (e.g. layer scale, attentional pooler: another architecture),
            missing or mis-shaped.
    """
    from transformers import CLIPConfig, CLIPModel

    source = _Source(state_dict, "OpenCLIP checkpoint")
    for key in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
        if key in source:
            source.drop(key, "recomputed by transformers (causal mask / sizes)")
    out: dict[str, Tensor] = {}

    # text tower
    token = source.take("token_embedding.weight")
    positions = source.take("positional_embedding")
    text_proj = source.take("text_projection")
    text_layers = source.count("transformer.resblocks.{i}.ln_1.weight")
    vocab, text_width = token.shape
    out["text_model.embeddings.token_embedding.weight"] = token
    out["text_model.embeddings.position_embedding.weight"] = positions
    _open_clip_tower(source, "transformer.resblocks.", "text_model.encoder.layers.", text_layers, out)
    out["text_model.final_layer_norm.weight"] = source.take("ln_final.weight")
    out["text_model.final_layer_norm.bias"] = source.take("ln_final.bias")
    out["text_projection.weight"] = text_proj.t()
    out["logit_scale"] = source.take("logit_scale").reshape(())

    # image tower
    conv = source.take("visual.conv1.weight")
    vis_positions = source.take("visual.positional_embedding")
    vis_proj = source.take("visual.proj")
    vis_layers = source.count("visual.transformer.resblocks.{i}.ln_1.weight")
    vis_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(vis_positions.shape[0] - 1)
    if grid * grid != vis_positions.shape[0] - 1:
        raise ConversionError(f"visual.positional_embedding has {vis_positions.shape[0]} rows, not 1 + a square")
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.class_embedding"] = source.take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = vis_positions
    out["vision_model.pre_layrnorm.weight"] = source.take("visual.ln_pre.weight")
    out["vision_model.pre_layrnorm.bias"] = source.take("visual.ln_pre.bias")
    _open_clip_tower(source, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vis_layers, out)
    out["vision_model.post_layernorm.weight"] = source.take("visual.ln_post.weight")
    out["vision_model.post_layernorm.bias"] = source.take("visual.ln_post.bias")
    out["visual_projection.weight"] = vis_proj.t()

    projection = text_proj.shape[1]
    if vis_proj.shape[1] != projection:
        raise ConversionError(f"image and text projections differ: {tuple(vis_proj.shape)} vs "
                              f"{tuple(text_proj.shape)}")
    for width, heads, tower in ((text_width, text_heads, "text"), (vis_width, vision_heads, "vision")):
        if width % heads:
            raise ConversionError(f"{tower} width {width} is not divisible by {heads} heads")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text_width, num_hidden_layers=text_layers,
                         intermediate_size=out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_attention_heads=text_heads, max_position_embeddings=positions.shape[0],
                         hidden_act=hidden_act, layer_norm_eps=layer_norm_eps, projection_dim=projection,
                         bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=vis_width, num_hidden_layers=vis_layers, patch_size=patch,
                           intermediate_size=out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                           num_attention_heads=vision_heads, image_size=grid * patch, hidden_act=hidden_act,
                           layer_norm_eps=layer_norm_eps, projection_dim=projection),
        projection_dim=projection,
        logit_scale_init_value=float(out["logit_scale"].float()),
    )
    _finish(source, _meta_model(lambda: CLIPModel(config)), out)
    return config, _cast(out, dtype)


def convert_hpsv2_checkpoint(checkpoint: Mapping[str, Any], *, vision_heads: int = 16, text_heads: int = 16,
                             dtype: str | None = None) -> tuple[Any, dict[str, Tensor]]:
    """An HPSv2 / HPSv2.1 checkpoint (``{"state_dict": OpenCLIP ViT-H-14}`` or the bare state dict) →
    ``(CLIPConfig, state dict)``; see :func:`convert_open_clip_state_dict`."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return convert_open_clip_state_dict(state, vision_heads=vision_heads, text_heads=text_heads, dtype=dtype)


# --------------------------------------------------------------------------------------------- ImageReward

_BLIP_BLOCK = (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
               ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


def convert_image_reward_state_dict(state_dict: Mapping[str, Tensor], *, vision_heads: int = 16,
                                    text_heads: int = 12, dtype: str | None = None,
                                    max_length: int = 35) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ImageReward v1.0 state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``)
    → ``(config, state dict)`` of :class:`~lit_diffac.rewards.image_reward.ImageRewardModel`.

    Mapping: BLIP ViT ``cls_token`` / ``pos_embed`` / ``patch_embed.proj`` → ``class_embedding`` /
    ``position_embedding`` / ``patch_embedding``; blocks' ``norm1/norm2`` → ``layer_norm1/2``, ``attn.qkv``
    (same ``[q; k; v]`` packing) → ``self_attn.qkv``, ``attn.proj`` → ``self_attn.projection``; the final
    ``norm`` → ``post_layernorm``; the BERT encoder (BLIP's ``med.py``) keeps its names in
    ``BlipTextModel``; ``mlp.layers.{0,2,4,6,7}`` (Dropouts between) → ``mlp.layers.{0..4}``.
    Dropped: ``embeddings.position_ids`` (checked to be ``0..n-1``), ``blip.vision_proj`` and
    ``blip.text_proj`` (BLIP's contrastive projections, unused by ImageReward's score).
    """
    from lit_diffac.rewards.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, ImageRewardModel

    source = _Source(state_dict, "ImageReward checkpoint")
    out: dict[str, Tensor] = {}
    v, t = "blip.visual_encoder.", "blip.text_encoder."

    # image encoder
    cls_token = source.take(f"{v}cls_token")
    pos = source.take(f"{v}pos_embed")
    conv = source.take(f"{v}patch_embed.proj.weight")
    out["vision_model.embeddings.class_embedding"] = cls_token
    out["vision_model.embeddings.position_embedding"] = pos
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.patch_embedding.bias"] = source.take(f"{v}patch_embed.proj.bias")
    vis_layers = source.count(f"{v}blocks.{{i}}.norm1.weight")
    for i in range(vis_layers):
        for a, b in _BLIP_BLOCK:
            for p in ("weight", "bias"):
                out[f"vision_model.encoder.layers.{i}.{b}.{p}"] = source.take(f"{v}blocks.{i}.{a}.{p}")
    out["vision_model.post_layernorm.weight"] = source.take(f"{v}norm.weight")
    out["vision_model.post_layernorm.bias"] = source.take(f"{v}norm.bias")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ConversionError(f"{v}pos_embed has {pos.shape[1]} positions, not 1 + a square")

    # text encoder (names identical in transformers' BlipTextModel)
    if f"{t}embeddings.position_ids" in source:
        ids = source.peek(f"{t}embeddings.position_ids")
        if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
            raise ConversionError(f"{t}embeddings.position_ids is not 0..n-1")
        source.drop(f"{t}embeddings.position_ids", "a constant buffer (0..n-1), rebuilt by transformers")
    for key in sorted(k for k in source.state if k.startswith(t) and k not in source.dropped):
        out["text_encoder." + key[len(t):]] = source.take(key)
    words = source.peek(f"{t}embeddings.word_embeddings.weight")
    text_layers = source.count(f"{t}encoder.layer.{{i}}.attention.self.query.weight")
    vocab, hidden = words.shape

    # BLIP's contrastive projections are not used by the reward
    for key in [k for k in source.state if k.startswith(("blip.vision_proj.", "blip.text_proj."))]:
        source.drop(key, "BLIP contrastive projection, unused by ImageReward.score")

    # MLP head: Linear layers at Sequential indices 0, 2, 4, 6, 7
    mlp_keys = sorted({int(k.split(".")[2]) for k in source.state if k.startswith("mlp.layers.")})
    if tuple(mlp_keys) != ORIGINAL_MLP_LINEAR_INDICES:
        raise ConversionError(f"ImageReward MLP has Linear layers at {mlp_keys}, expected "
                              f"{list(ORIGINAL_MLP_LINEAR_INDICES)}")
    dims = [int(source.peek("mlp.layers.0.weight").shape[1])]
    for new, old in enumerate(mlp_keys):
        out[f"mlp.layers.{new}.weight"] = source.take(f"mlp.layers.{old}.weight")
        out[f"mlp.layers.{new}.bias"] = source.take(f"mlp.layers.{old}.bias")
        dims.append(int(out[f"mlp.layers.{new}.weight"].shape[0]))

    def size(key: str, dim: int = 0) -> int:
        return int(out[key].shape[dim])

    config = {
        "architecture": "ImageReward",
        "vision_config": dict(hidden_size=width,
                              intermediate_size=size("vision_model.encoder.layers.0.mlp.fc1.weight"),
                              num_hidden_layers=vis_layers, num_attention_heads=vision_heads, image_size=grid * patch,
                              patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6),
        "text_config": dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=text_layers,
                            num_attention_heads=text_heads,
                            intermediate_size=size("text_encoder.encoder.layer.0.intermediate.dense.weight"),
                            max_position_embeddings=size("text_encoder.embeddings.position_embeddings.weight"),
                            encoder_hidden_size=size(
                                "text_encoder.encoder.layer.0.crossattention.self.key.weight", 1),
                            hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0,
                            bos_token_id=vocab - 2, eos_token_id=2, sep_token_id=102 if vocab > 102 else 3),
        "mlp_dims": dims,
        "mean": IMAGE_REWARD_MEAN,
        "std": IMAGE_REWARD_STD,
        "max_length": max_length,
    }
    if width % vision_heads or hidden % text_heads:
        raise ConversionError(f"widths {width} / {hidden} are not divisible by {vision_heads} / {text_heads} heads")
    _finish(source, _meta_model(lambda: ImageRewardModel(config)), out)
    return config, _cast(out, dtype)


# --------------------------------------------------------------------------------------------- saving

def save_converted(config: Any, state: dict[str, Tensor], out: str | Path, tokenizer: Any = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors``, the tokenizer files and ``conversion.json`` to ``out``.

    ``config`` is a ``transformers`` config (saved with ``save_pretrained``) or a plain dict.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(str(out))
    else:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if extra is not None:
        (out / "conversion.json").write_text(json.dumps(extra, indent=2, default=str))
    return out


def _clip_tokenizer(folder: str, vocab_size: int) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"the tokenizer in '{folder}' has {len(tokenizer)} tokens but the model's vocabulary "
                              f"has {vocab_size} (expected a CLIP BPE tokenizer)")
    tokenizer.model_max_length = 77
    return tokenizer


def _blip_tokenizer(folder: str, vocab_size: int, max_length: int = 35) -> Any:
    """BLIP's tokenizer built from ``folder``'s ``vocab.txt`` (``BertTokenizer`` + ``[DEC]`` + ``[ENC]``, see
    :func:`~lit_diffac.rewards.image_reward.blip_tokenizer`), checked against the model and to pad as
    ``ImageReward.score`` does, so that a tokenizer that cannot score fails here and not at training time."""
    from lit_diffac.rewards.image_reward import blip_tokenizer

    if not Path(folder).is_dir():
        raise ConversionError(f"tokenizer folder '{folder}' does not exist (expected the vocab.txt of "
                              "bert-base-uncased)")
    try:
        tokenizer = blip_tokenizer(folder)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"the tokenizer in '{folder}' has {len(tokenizer)} tokens with [DEC] and [ENC] but the "
                              f"model's vocabulary has {vocab_size} (expected bert-base-uncased)")
    try:
        ids = tokenizer(["a photo of a cat"], padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    except ValueError as err:  # e.g. "Asking to pad but the tokenizer does not have a padding token"
        raise ConversionError(f"the tokenizer built from '{folder}' cannot tokenize as ImageReward does: "
                              f"{err}") from None
    if len(ids[0]) != max_length or ids[0][-1] != tokenizer.pad_token_id:
        raise ConversionError(f"the tokenizer built from '{folder}' does not pad to {max_length} tokens with [PAD]")
    return tokenizer


# --------------------------------------------------------------------------------------------- command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-diffac convert-reward",
        description="Convert an official reward checkpoint into a folder that the lit_diffac reward loads "
                    "(config.json + model.safetensors + tokenizer).  Runs offline; nothing is downloaded.")
    parser.add_argument("model", choices=["hpsv2", "image-reward"],
                        help="hpsv2: HPS_v2(.1)_compressed.pt from https://huggingface.co/xswu/HPSv2; "
                             "image-reward: ImageReward.pt from https://huggingface.co/THUDM/ImageReward")
    parser.add_argument("source", help="the official checkpoint file")
    parser.add_argument("out", help="output folder (pass it as the reward's `pretrained`)")
    parser.add_argument("--tokenizer", required=True,
                        help="local tokenizer folder: laion/CLIP-ViT-H-14-laion2B-s32B-b79K (or any CLIP BPE "
                             "tokenizer) for hpsv2, bert-base-uncased for image-reward")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="dtype of the saved weights (auto: as in the checkpoint)")
    parser.add_argument("--vision-heads", type=int, default=16, help="attention heads of the image encoder")
    parser.add_argument("--text-heads", type=int, default=None,
                        help="attention heads of the text encoder (default: 16 for hpsv2, 12 for image-reward)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a checkpoint that is not tensors-only (only for files from a trusted source)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser


def convert_reward_main(argv: list[str]) -> int:
    """Convert an official reward checkpoint (HPSv2, ImageReward) into a safetensors folder, offline."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.stderr.write(f"error: output folder '{out}' is not empty (pass --overwrite)\n")
        return 2
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        state = load_checkpoint(args.source, trust_pickle=args.trust_pickle)
        if args.model == "hpsv2":
            config, converted = convert_hpsv2_checkpoint(state, vision_heads=args.vision_heads,
                                                         text_heads=args.text_heads or 16, dtype=dtype)
            tokenizer = _clip_tokenizer(args.tokenizer, config.text_config.vocab_size)
        else:
            config, converted = convert_image_reward_state_dict(state, vision_heads=args.vision_heads,
                                                                text_heads=args.text_heads or 12, dtype=dtype)
            tokenizer = _blip_tokenizer(args.tokenizer, config["text_config"]["vocab_size"], config["max_length"])
    except (ValueError, OSError) as err:  # ConversionError, a missing file or tokenizer
        sys.stderr.write(f"error: {err}\n")
        return 2
    source = Path(args.source)
    save_converted(config, converted, out, tokenizer,
                   extra={"model": args.model, "source": source.name, "source_bytes": source.stat().st_size,
                          "source_keys": len(state), "parameters": sum(v.numel() for v in converted.values())})
    n = sum(v.numel() for v in converted.values())
    sys.stdout.write(f"converted {args.model}: {len(state)} checkpoint keys -> {len(converted)} tensors "
                     f"({n / 1e6:.1f} M parameters) in '{out}'\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(convert_reward_main(sys.argv[1:]))
