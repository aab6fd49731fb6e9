"""CLIP-based rewards: CLIP score, PickScore and the LAION aesthetic predictor, plus the shared pieces
of every CLIP-style scorer (image preprocessing, local weight checks, tokenizers, dtypes).

All weights are read from local files or folders; nothing is downloaded.  A missing file raises
:class:`WeightsNotFoundError`, whose message names the path and where to get the weights.

Preprocessing (:class:`ClipImagePreprocess`) reproduces the originals exactly:

* ``resample="pil"``: images are quantised to uint8 (``round(x * 255)``, as DDPO / Flow-GRPO hand
  generated images to the scorers), each resized with **PIL bicubic** so that the shorter side is
  ``size``, centre-cropped, scaled by ``1/255`` and normalised.  This is ``transformers``'
  ``CLIPImageProcessor`` (``crop_rounding="floor"``) and torchvision's ``Resize(PIL) + CenterCrop`` of
  OpenAI CLIP, ImageReward and the aesthetic predictor (``crop_rounding="round"``).
* ``resample="tensor"``: the uint8 image is converted to float first and resized with
  ``F.interpolate(mode="bicubic", antialias=...)``, as torchvision resizes tensors (OpenCLIP's eval
  transforms convert with ``ToTensor`` *before* resizing).
* ``resize_mode="longest"`` (with ``resample="tensor"``): HPSv2's letterbox, ``ResizeMaxSize`` of the
  ``open_clip`` vendored in ``tgxs002/HPSv2`` (``hpsv2/src/open_clip/transform.py``, selected by
  ``create_model_and_transforms(..., light_augmentation=True)``): the *longer* side is resized to ``size``
  (the other to ``round(side * size / longest)``, Python's round), then the image is padded with 0 (black,
  before normalisation) to ``size × size``, ``pad // 2`` before and the rest after (left/top get the
  smaller half).  Nothing is cropped.

The two crop roundings differ only when ``resized - crop`` is odd (never for square images).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lit_diffac.dtypes import parse_dtype
from lit_diffac.rewards.base import Reward

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "WeightsNotFoundError",
    "check_weights",
    "parse_dtype",
    "load_tokenizer",
    "ClipImagePreprocess",
    "RewardMLP",
    "CLIPScore",
    "PickScore",
    "LaionAesthetic",
]

#: Normalisation constants of OpenAI CLIP (also used by OpenCLIP's ViT-H-14, BLIP and ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------- weights

class WeightsNotFoundError(FileNotFoundError):
    """A reward's local weight file or folder is missing (nothing is ever downloaded)."""


def check_weights(path: str | Path | None, *, what: str, get: str, kind: Literal["folder", "file"] = "folder",
                  files: Sequence[str] = ()) -> Path:
    """Return ``path`` as a :class:`Path` after checking that the local weights are there.

    Args:
        path: the file or folder given to the reward.
        what: what the weights are (e.g. ``"PickScore weights"``), for the message.
        get: where to get them (official URL / hub id and how to place them), for the message.
        kind: ``"folder"`` or ``"file"``.
        files: for a folder, files it must contain (any of ``"a|b"`` satisfies an entry).

    Raises:
        WeightsNotFoundError: naming the missing path and, from ``get``, where to get the weights.
    """
    if path is None or str(path) == "":
        raise WeightsNotFoundError(f"{what}: no path given. {get}")
    p = Path(path).expanduser()
    if kind == "folder":
        if not p.is_dir():
            hint = ""
            if not p.exists() and "/" in str(path) and not str(path).startswith((".", "/", "~")):
                hint = (f" ({str(path)!r} looks like a hub id: lit_diffac never downloads, fetch it yourself "
                        f"first, e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR)")
            state = "is a file, not a folder" if p.is_file() else "does not exist"
            raise WeightsNotFoundError(f"{what} not found: folder '{p}' {state}{hint}. {get}")
        for entry in files:
            options = entry.split("|")
            if not any((p / name).is_file() for name in options):
                raise WeightsNotFoundError(f"{what} not found: '{p / options[0]}' is missing from the folder "
                                           f"'{p}'. {get}")
    else:
        if not p.is_file():
            state = "is a folder, not a file" if p.is_dir() else "does not exist"
            raise WeightsNotFoundError(f"{what} not found: file '{p}' {state}. {get}")
    return p


def load_tokenizer(folder: str | Path, *, what: str, get: str) -> Any:
    """Load a ``transformers`` tokenizer saved in ``folder`` (offline), with a helpful error if absent."""
    from transformers import AutoTokenizer

    p = check_weights(folder, what=what, get=get, kind="folder",
                      files=("tokenizer.json|vocab.json|vocab.txt|tokenizer_config.json",))
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


# --------------------------------------------------------------------------------------------- preprocessing

def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` with the aspect ratio kept (torchvision's and
    ``transformers``' rule: the longer side is ``int(size * long / short)``)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_offsets(height: int, width: int, crop: int, rounding: Literal["floor", "round"]) -> tuple[int, int]:
    """Top-left corner of a centred ``crop × crop`` window (``floor``: transformers; ``round``: torchvision)."""
    if crop > height or crop > width:
        raise ValueError(f"cannot centre-crop {crop}x{crop} from a {height}x{width} image")
    if rounding == "floor":
        return (height - crop) // 2, (width - crop) // 2
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def letterbox_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the *longer* side to ``size`` with the aspect ratio kept, as HPSv2's
    ``ResizeMaxSize``: ``scale = size / max(h, w)``, each side ``round(side * scale)`` (Python's round,
    halves to even)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def quantize(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] → uint8, ``round(x * 255)`` clamped (how generated images are saved)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


class ClipImagePreprocess(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] → normalised ``[B, 3, crop, crop]`` float32 model inputs.

    Args:
        size: the shorter side after resizing.
        crop_size: side of the centre crop (default: ``size``).
        mean, std: per-channel normalisation.
        resample: ``"pil"`` (uint8 PIL bicubic, as ``CLIPImageProcessor`` and torchvision on PIL images)
            or ``"tensor"`` (float ``F.interpolate`` bicubic, as torchvision on tensors; OpenCLIP/HPSv2).
        crop_rounding: ``"floor"`` (transformers) or ``"round"`` (torchvision) for the crop offset.
        antialias: for ``resample="tensor"``: antialiased bicubic (torchvision >= 0.17 default).
        resize_mode: ``"shortest"`` (resize the shorter side to ``size``, centre-crop) or ``"longest"``
            (HPSv2's letterbox: resize the longer side to ``size``, pad with ``fill`` to a square; needs
            ``resample="tensor"``; ``crop_size`` must be ``size``).
        fill: the padding value of ``resize_mode="longest"``, in [0, 1] pixel units (before normalising).

    The output is on the images' device.  ``resample="pil"`` runs on the CPU (one PIL call per image).
    """

    def __init__(self, size: int = 224, crop_size: int | None = None, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, resample: Literal["pil", "tensor"] = "pil",
                 crop_rounding: Literal["floor", "round"] = "floor", antialias: bool = True,
                 resize_mode: Literal["shortest", "longest"] = "shortest", fill: float = 0.0) -> None:
        super().__init__()
        if resample not in ("pil", "tensor"):
            raise ValueError(f"resample must be 'pil' or 'tensor', got {resample!r}")
        if crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {crop_rounding!r}")
        if resize_mode not in ("shortest", "longest"):
            raise ValueError(f"resize_mode must be 'shortest' or 'longest', got {resize_mode!r}")
        if resize_mode == "longest" and (resample != "tensor" or int(crop_size or size) != int(size)):
            raise ValueError("resize_mode='longest' (letterbox) needs resample='tensor' and crop_size == size")
        self.size = int(size)
        self.crop_size = int(crop_size or size)
        self.resample = resample
        self.crop_rounding = crop_rounding
        self.antialias = antialias
        self.resize_mode = resize_mode
        self.fill = float(fill)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor_config(cls, folder: str | Path, **defaults: Any) -> "ClipImagePreprocess":
        """Read ``size`` / ``crop_size`` / ``mean`` / ``std`` from a ``preprocessor_config.json`` in
        ``folder`` when there is one (the checkpoint's own processor settings), else use ``defaults``."""
        kwargs = dict(defaults)
        path = Path(folder) / "preprocessor_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            size = cfg.get("size")
            if isinstance(size, dict):
                size = size.get("shortest_edge", size.get("height"))
            crop = cfg.get("crop_size")
            if isinstance(crop, dict):
                crop = crop.get("height")
            for key, value in (("size", size), ("crop_size", crop), ("mean", cfg.get("image_mean")),
                               ("std", cfg.get("image_std"))):
                if value is not None:
                    kwargs[key] = value
        return cls(**kwargs)

    def _resize_crop_pil(self, pixels: Tensor) -> Tensor:
        out = []
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3] uint8
        for image in array:
            h, w = image.shape[:2]
            nh, nw = resized_shape(h, w, self.size)
            pil = Image.fromarray(np.ascontiguousarray(image))
            if (nh, nw) != (h, w):
                pil = pil.resize((nw, nh), resample=Image.BICUBIC)
            resized = np.asarray(pil)
            top, left = crop_offsets(nh, nw, self.crop_size, self.crop_rounding)
            out.append(torch.from_numpy(resized[top:top + self.crop_size, left:left + self.crop_size].copy()))
        return torch.stack(out).permute(0, 3, 1, 2).float().div_(255.0)

    def _resize_crop_tensor(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        nh, nw = resized_shape(h, w, self.size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=self.antialias)
        top, left = crop_offsets(nh, nw, self.crop_size, self.crop_rounding)
        return x[..., top:top + self.crop_size, left:left + self.crop_size]

    def _letterbox_tensor(self, x: Tensor) -> Tensor:
        """HPSv2's ``ResizeMaxSize`` on the float tensor: longer side → ``size`` (bicubic), then pad to a
        square, ``[left, top, right, bottom] = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]``."""
        h, w = x.shape[-2:]
        nh, nw = letterbox_shape(h, w, self.size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=self.antialias)
        # The original skips the padding too when the longer side is already `size` (scale == 1), which
        # leaves a non-square image that its ViT cannot take; here such an image is padded as well.
        pad_h, pad_w = self.size - nh, self.size - nw
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=self.fill)
        return x

    def forward(self, images: Tensor) -> Tensor:
        pixels = quantize(images)
        if self.resample == "pil":
            x = self._resize_crop_pil(pixels).to(images.device)
        elif self.resize_mode == "longest":
            x = self._letterbox_tensor(pixels.float() / 255.0)
        else:
            x = self._resize_crop_tensor(pixels.float() / 255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def extra_repr(self) -> str:
        if self.resize_mode == "longest":
            return f"size={self.size}, resample={self.resample!r}, resize_mode='longest', fill={self.fill}"
        return (f"size={self.size}, crop_size={self.crop_size}, resample={self.resample!r}, "
                f"crop_rounding={self.crop_rounding!r}")


# --------------------------------------------------------------------------------------------- heads

class RewardMLP(nn.Module):
    """The linear stack of the aesthetic predictor and ImageReward: ``dims[0] → … → dims[-1]``.

    The originals interleave ``Dropout`` (identity at inference) and no activations between the
    ``Linear`` layers; here the Linear layers are numbered ``layers.0 … layers.{n-1}`` (the converters
    map the originals' ``layers.{0,2,4,6,7}`` onto them).
    """

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(self.dims[:-1], self.dims[1:])])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


#: Indices of the Linear layers in the originals' ``nn.Sequential`` (Dropouts at 1, 3, 5).
ORIGINAL_MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)


def remap_original_mlp(state_dict: dict[str, Tensor], prefix: str = "layers.") -> tuple[dict[str, Tensor], list[int]]:
    """Map an original MLP state dict (``{prefix}{i}.weight`` with Dropouts between) onto
    :class:`RewardMLP` keys; returns the new state dict and the dims.  Raises on unexpected keys."""
    unexpected = [k for k in state_dict if not re.fullmatch(re.escape(prefix) + r"\d+\.(weight|bias)", k)]
    indices = sorted({int(k[len(prefix):].partition(".")[0]) for k in state_dict if k not in unexpected})
    if unexpected or not indices:
        raise ValueError(f"not an MLP state dict with keys '{prefix}<i>.weight/bias': unexpected keys "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    out: dict[str, Tensor] = {}
    dims = [int(state_dict[f"{prefix}{indices[0]}.weight"].shape[1])]
    for new, old in enumerate(indices):
        weight = state_dict[f"{prefix}{old}.weight"]
        if weight.shape[1] != dims[-1]:
            raise ValueError(f"MLP layer {prefix}{old} takes {weight.shape[1]} inputs but the previous layer "
                             f"gives {dims[-1]}")
        out[f"layers.{new}.weight"] = weight
        out[f"layers.{new}.bias"] = state_dict[f"{prefix}{old}.bias"]
        dims.append(int(weight.shape[0]))
    return out, dims


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """Load a ``.safetensors`` file, or a PyTorch pickle with ``weights_only=True`` (tensors only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------- CLIP helpers

def _load_clip(folder: Path, dtype: torch.dtype, cls_name: str = "CLIPModel") -> nn.Module:
    """Load a ``transformers`` CLIP model from a local folder; fail (instead of re-initialising, as
    ``from_pretrained`` does) when a parameter is missing from the checkpoint or has another shape."""
    import transformers

    cls = getattr(transformers, cls_name)
    kwargs: dict[str, Any] = {}
    if cls_name == "CLIPVisionModelWithProjection":
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if hasattr(config, "vision_config"):  # a full CLIPModel folder: keep its projection width
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            kwargs["config"] = vision
    verbosity = transformers.logging.get_verbosity()
    if kwargs:  # the text tower's weights are expected leftovers: do not print them as a warning table
        transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype, output_loading_info=True,
                                          **kwargs)
    except RuntimeError as err:  # transformers refuses mismatched shapes
        raise ValueError(f"the weights in '{folder}' do not fit {cls_name}: {err}; is this the right model "
                         "folder?") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if bad:
        raise ValueError(f"the weights in '{folder}' do not fit {cls_name} (missing or mis-shaped: {bad[:5]}); "
                         "is this the right model folder?")
    return model.eval().requires_grad_(False)


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


def clip_image_embeds(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Projected CLIP image embeddings (not normalised) of a ``CLIPModel`` or ``CLIPVisionModelWithProjection``."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def clip_text_embeds(model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                     max_length: int = 77) -> Tensor:
    """Projected CLIP text embeddings (not normalised): padded to the longest prompt, truncated to
    ``max_length`` tokens (start and end tokens kept)."""
    tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = model.text_model(input_ids=tokens["input_ids"].to(device),
                           attention_mask=tokens["attention_mask"].to(device))
    return model.text_projection(out.pooler_output)


def clip_cosine(model: nn.Module, tokenizer: Any, preprocess: nn.Module, images: Tensor, prompts: list[str],
                dtype: torch.dtype, max_length: int = 77) -> Tensor:
    """``[B]`` fp32 cosine similarity of the CLIP image embedding of ``images`` (preprocessed) and the text
    embedding of ``prompts`` — the core of CLIP score, PickScore and HPSv2."""
    pixels = preprocess(images).to(dtype)
    image = _normalize(clip_image_embeds(model, pixels).float())
    text = _normalize(clip_text_embeds(model, tokenizer, prompts, images.device, max_length=max_length).float())
    return (image * text).sum(-1)


def _clip_get(hub_id: str, extra: str = "") -> str:
    return (f"Download the 'transformers' folder of '{hub_id}' (https://huggingface.co/{hub_id}: config.json, "
            f"model.safetensors, the tokenizer files) and pass that folder{extra}.")


# --------------------------------------------------------------------------------------------- CLIP score

class CLIPScore(Reward):
    """CLIP score: cosine similarity of CLIP's image and prompt embeddings.

    Original: Hessel et al., *CLIPScore* (2021); implementation followed: ``torchmetrics``
    (``torchmetrics/functional/multimodal/clip_score.py``), default model ``openai/clip-vit-large-patch14``.

    Preprocessing: the model's ``CLIPImageProcessor``: uint8 image, PIL bicubic resize of the shorter
    side to 224, centre crop 224 (floor offsets), ``/255``, OpenAI mean/std (read from the folder's
    ``preprocessor_config.json`` when present).  Prompts: the CLIP tokenizer, truncated to 77 tokens
    keeping the end token (torchmetrics cuts the ids instead, dropping the end token of too-long prompts).

    Output: ``convention="torchmetrics"``: ``100 * max(cos, 0)`` (torchmetrics clamps the *mean* at 0;
    here each sample is clamped, which equals it whenever the cosine is positive, as it is for real
    CLIP models); ``convention="cosine"``: the raw cosine in [-1, 1].

    Args:
        pretrained: local folder of a ``transformers`` ``CLIPModel`` with its tokenizer (e.g. a download
            of ``openai/clip-vit-large-patch14``).
        convention: ``"torchmetrics"`` or ``"cosine"`` (see above).
        dtype: model dtype (``"float32"``, ``"float16"``, ``"bfloat16"``).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "clip_score"
    hub_id = "openai/clip-vit-large-patch14"

    def __init__(self, pretrained: str, convention: Literal["torchmetrics", "cosine"] = "torchmetrics",
                 dtype: str = "float32", name: str | None = None, batch_size: int | None = None,
                 device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        if convention not in ("torchmetrics", "cosine"):
            raise ValueError(f"convention must be 'torchmetrics' or 'cosine', got {convention!r}")
        self.convention = convention
        self.dtype = parse_dtype(dtype)
        get = _clip_get(self.hub_id, " as pretrained")
        folder = check_weights(pretrained, what="CLIP score weights", get=get,
                               files=("config.json", "model.safetensors|pytorch_model.bin"))
        self.tokenizer = load_tokenizer(folder, what="CLIP score tokenizer", get=get)
        self.model = _load_clip(folder, self.dtype)
        self.preprocess = ClipImagePreprocess.from_processor_config(
            folder, size=self.model.config.vision_config.image_size, crop_rounding="floor")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        cos = clip_cosine(self.model, self.tokenizer, self.preprocess, images, prompts, self.dtype)
        return 100.0 * cos.clamp(min=0) if self.convention == "torchmetrics" else cos

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convention={self.convention!r}"


# --------------------------------------------------------------------------------------------- PickScore

class PickScore(Reward):
    """PickScore v1: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

    Original: ``yuvalkirstain/PickScore`` (README inference example; also Flow-GRPO
    ``flow_grpo/pickscore_scorer.py``), weights ``yuvalkirstain/PickScore_v1``, processor
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.

    Preprocessing: ``CLIPImageProcessor`` of the laion processor (uint8, PIL bicubic shorter side 224,
    centre crop 224, OpenAI mean/std); prompts padded, truncated to 77 tokens.

    Output: ``logit_scale.exp() * cos(image, prompt)`` as the original (about 18–24 for real images,
    ``logit_scale.exp() = 100``); Flow-GRPO divides it by 26 (wrap the reward to do so).

    Args:
        pretrained: local folder of ``yuvalkirstain/PickScore_v1`` (``transformers`` ``CLIPModel``).
        processor: folder with the tokenizer (and ``preprocessor_config.json``) of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; default: ``pretrained`` itself.
        dtype: model dtype.
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "pickscore"
    hub_id = "yuvalkirstain/PickScore_v1"
    processor_hub_id = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, pretrained: str, processor: str | None = None, dtype: str = "float32",
                 name: str | None = None, batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.dtype = parse_dtype(dtype)
        folder = check_weights(pretrained, what="PickScore weights", get=_clip_get(self.hub_id, " as pretrained"),
                               files=("config.json", "model.safetensors|pytorch_model.bin"))
        proc = Path(processor) if processor is not None else folder
        self.tokenizer = load_tokenizer(
            proc, what="PickScore tokenizer",
            get=(f"PickScore uses the tokenizer of '{self.processor_hub_id}' "
                 f"(https://huggingface.co/{self.processor_hub_id}): download its tokenizer files and "
                 "preprocessor_config.json and pass that folder as processor (or copy them into pretrained)."))
        self.model = _load_clip(folder, self.dtype)
        self.preprocess = ClipImagePreprocess.from_processor_config(
            proc, size=self.model.config.vision_config.image_size, crop_rounding="floor")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        cos = clip_cosine(self.model, self.tokenizer, self.preprocess, images, prompts, self.dtype)
        return self.model.logit_scale.float().exp() * cos


# --------------------------------------------------------------------------------------------- aesthetic

class LaionAesthetic(Reward):
    """LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"): a linear MLP on the L2-normalised
    CLIP ViT-L/14 image embedding; the score is on the AVA 1–10 scale (about 5–6 for typical images).

    Original: ``christophschuhmann/improved-aesthetic-predictor`` (``simple_inference.py``; MLP
    ``768→1024→128→64→16→1`` with Dropouts and no activations), used as a reward by DDPO
    (``kvablack/ddpo-pytorch``, ``ddpo_pytorch/aesthetic_scorer.py``) and Flow-GRPO.

    Preprocessing: OpenAI CLIP's ``preprocess`` (uint8, PIL bicubic shorter side 224, centre crop 224
    with torchvision's rounded offsets, OpenAI mean/std).  Embedding: ``CLIPModel.get_image_features``
    (projected, 768-d), divided by its L2 norm.  Output: the MLP's scalar, unscaled.

    Args:
        predictor: the MLP weights file, ``sac+logos+ava1-l14-linearMSE.pth`` (or a ``.safetensors`` with
            the same keys ``layers.{0,2,4,6,7}.weight/bias``).
        clip_model: local folder of ``openai/clip-vit-large-patch14`` (``transformers`` format); only the
            vision tower is loaded.
        dtype: dtype of the CLIP model (the MLP runs in float32).
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "aesthetic"
    predictor_url = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac%2Blogos%2Bava1-l14-linearMSE.pth")
    clip_hub_id = "openai/clip-vit-large-patch14"

    def __init__(self, predictor: str, clip_model: str, dtype: str = "float32", name: str | None = None,
                 batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.dtype = parse_dtype(dtype)
        path = check_weights(predictor, what="LAION aesthetic predictor weights", kind="file",
                             get=f"Download sac+logos+ava1-l14-linearMSE.pth from {self.predictor_url} "
                                 "and pass the file as predictor.")
        folder = check_weights(clip_model, what="CLIP ViT-L/14 weights for the aesthetic predictor",
                               get=_clip_get(self.clip_hub_id, " as clip_model"),
                               files=("config.json", "model.safetensors|pytorch_model.bin"))
        state, dims = remap_original_mlp(load_state_file(path))
        self.mlp = RewardMLP(dims)
        self.mlp.load_state_dict(state, strict=True)
        self.mlp.eval().requires_grad_(False)
        self.clip = _load_clip(folder, self.dtype, "CLIPVisionModelWithProjection")
        if self.clip.config.projection_dim != dims[0]:
            raise ValueError(f"the aesthetic MLP takes {dims[0]}-d embeddings but the CLIP model in '{folder}' "
                             f"projects to {self.clip.config.projection_dim} (expected CLIP ViT-L/14)")
        self.preprocess = ClipImagePreprocess(size=self.clip.config.image_size, crop_rounding="round")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        pixels = self.preprocess(images).to(self.dtype)
        embeds = clip_image_embeds(self.clip, pixels).float()
        norm = embeds.norm(p=2, dim=-1, keepdim=True)
        embeds = embeds / torch.where(norm == 0, torch.ones_like(norm), norm)  # the original's zero guard
        return self.mlp(embeds).squeeze(-1)
