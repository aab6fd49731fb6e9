"""ImageReward (Xu et al., 2023) on ``transformers`` BLIP classes.

The model is BLIP's ViT-L/16 image encoder (:class:`transformers.BlipVisionModel`), BLIP's BERT text
encoder with cross-attention to the image tokens (:class:`transformers.BlipTextModel`) and a linear MLP
head on the ``[CLS]`` feature, bundled in :class:`ImageRewardModel`.  Convert the official
``ImageReward.pt`` once with::

    lit-diffac convert-reward image-reward ImageReward.pt OUT_DIR --tokenizer BERT_BASE_UNCASED_DIR

and pass ``OUT_DIR`` as ``pretrained``.  The tokenizer is BLIP's (``init_tokenizer`` of
``ImageReward/models/BLIP/blip.py``): ``BertTokenizer`` of ``bert-base-uncased``'s ``vocab.txt`` with
``[DEC]`` added as the bos token and ``[ENC]`` as an extra special token (:func:`blip_tokenizer`); the
conversion saves it next to the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_diffac.rewards.base import Reward
from lit_diffac.rewards.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipImagePreprocess,
    RewardMLP,
    check_weights,
    parse_dtype,
)

__all__ = ["ImageReward", "ImageRewardModel", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "IMAGE_REWARD_GET",
           "blip_tokenizer", "load_blip_tokenizer"]

#: The published output normalisation of ImageReward v1.0 (``ImageReward/ImageReward.py``).
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072

IMAGE_REWARD_GET = ("Download ImageReward.pt from https://huggingface.co/THUDM/ImageReward and the tokenizer of "
                    "bert-base-uncased (https://huggingface.co/google-bert/bert-base-uncased), then convert once "
                    "with `lit-diffac convert-reward image-reward ImageReward.pt OUT_DIR --tokenizer BERT_DIR` "
                    "and pass OUT_DIR as pretrained.")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: The special tokens of ``bert-base-uncased`` that BLIP's ``BertTokenizer`` uses ([PAD] pads, id 0).
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def blip_tokenizer(folder: str | Path) -> Any:
    """BLIP's tokenizer (``init_tokenizer`` in ``ImageReward/models/BLIP/blip.py``), built explicitly from the
    ``vocab.txt`` of ``bert-base-uncased`` in ``folder``: ``BertTokenizer`` (WordPiece, lower-cased, accents
    stripped, ``[PAD]``/``[UNK]``/``[CLS]``/``[SEP]``/``[MASK]``), then ``[DEC]`` added as the bos token and
    ``[ENC]`` as an additional special token (ids ``len(vocab)`` and ``len(vocab) + 1``).

    Other files of the folder are not used (``do_lower_case`` is read from ``tokenizer_config.json`` when
    present), so a download of just ``vocab.txt`` and ``tokenizer_config.json`` / ``tokenizer.json`` works
    even though those carry no ``tokenizer_class`` (``AutoTokenizer`` would then build a tokenizer without
    a padding token).

    Raises:
        ValueError: no ``vocab.txt`` in ``folder``, or a BERT special token missing from it.
    """
    from transformers import BertTokenizer

    folder = Path(folder)
    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise ValueError(f"no vocab.txt in the tokenizer folder '{folder}': ImageReward uses BLIP's BERT tokenizer, "
                         "built from the vocab.txt of bert-base-uncased (https://huggingface.co/google-bert/"
                         "bert-base-uncased); download it into that folder")
    words = {line.rstrip("\n") for line in vocab_file.read_text(encoding="utf-8").splitlines()}
    missing = [token for token in BERT_SPECIAL_TOKENS if token not in words]
    if missing:
        raise ValueError(f"'{vocab_file}' lacks the BERT special tokens {missing}: expected the vocab.txt of "
                         "bert-base-uncased")
    do_lower_case = True
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        do_lower_case = bool(json.loads(config_file.read_text()).get("do_lower_case", True))
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=do_lower_case, unk_token="[UNK]", sep_token="[SEP]",
                              pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_blip_tokenizer(folder: str | Path, vocab_size: int | None = None) -> Any:
    """The tokenizer saved by ``lit-diffac convert-reward image-reward`` in ``folder``, loaded as a
    ``BertTokenizer`` (whatever class its ``tokenizer_config.json`` names), checked to pad with ``[PAD]``
    and, given ``vocab_size``, to fit the text encoder's vocabulary."""
    from transformers import BertTokenizer

    p = check_weights(folder, what="ImageReward tokenizer", get=IMAGE_REWARD_GET,
                      files=("tokenizer.json|vocab.txt",))
    tokenizer = BertTokenizer.from_pretrained(str(p), local_files_only=True)
    redo = ("convert the checkpoint again with `lit-diffac convert-reward image-reward ImageReward.pt OUT_DIR "
            "--tokenizer BERT_DIR` (BERT_DIR: the vocab.txt of bert-base-uncased)")
    pad = tokenizer.pad_token_id
    if tokenizer.pad_token != "[PAD]" or pad is None or pad == tokenizer.unk_token_id:
        raise ValueError(f"the ImageReward tokenizer in '{p}' has no [PAD] padding token; {redo}")
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ValueError(f"the ImageReward tokenizer in '{p}' has {len(tokenizer)} tokens but the text encoder's "
                         f"vocabulary has {vocab_size}; {redo}")
    return tokenizer


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BLIP text encoder (cross-attention) + MLP head → ImageReward scores.

    Args:
        config: ``{"vision_config": BlipVisionConfig dict, "text_config": BlipTextConfig dict,
            "mlp_dims": [768, 1024, 128, 64, 16, 1], "mean": ..., "std": ..., "max_length": 35}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.config = dict(config)
        vision = BlipVisionConfig.from_dict(dict(config["vision_config"]))
        text = BlipTextConfig.from_dict({**config["text_config"], "is_decoder": True})  # builds cross-attention
        if text.encoder_hidden_size != vision.hidden_size:
            raise ValueError(f"text encoder cross-attends to {text.encoder_hidden_size}-d features but the image "
                             f"encoder gives {vision.hidden_size}-d")
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = RewardMLP(config.get("mlp_dims", (text.hidden_size, 1024, 128, 64, 16, 1)))
        self.mean = float(config.get("mean", IMAGE_REWARD_MEAN))
        self.std = float(config.get("std", IMAGE_REWARD_STD))
        self.max_length = int(config.get("max_length", 35))
        self.image_size = int(vision.image_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                normalize: bool = True) -> Tensor:
        """``[B]`` rewards: MLP of the text encoder's ``[CLS]`` state (cross-attending to all image tokens)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, is_decoder=False)
        reward = self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)  # the head runs in float32
        return (reward - self.mean) / self.std if normalize else reward

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, default=str))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str | torch.dtype = "float32") -> "ImageRewardModel":
        """Load a folder written by :meth:`save_pretrained` (strictly: every parameter must be there)."""
        from safetensors.torch import load_file

        folder = check_weights(folder, what="ImageReward weights (converted)", get=IMAGE_REWARD_GET,
                               files=(CONFIG_NAME, WEIGHTS_NAME))
        model = cls(json.loads((folder / CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        model.to(parse_dtype(dtype)).mlp.float()
        return model.eval().requires_grad_(False)


class ImageReward(Reward):
    """ImageReward v1.0: a BLIP-based human-preference reward model (Xu et al., NeurIPS 2023).

    Original: ``THUDM/ImageReward`` (``ImageReward/ImageReward.py``: ``ImageReward.score``; BLIP from
    ``ImageReward/models/BLIP``).  Also the reward of Flow-GRPO (``flow_grpo/imagereward_scorer.py``).

    Preprocessing: ``Resize(224, BICUBIC)`` on the PIL image, ``CenterCrop(224)`` (torchvision, rounded
    offsets), ``ToTensor``, OpenAI CLIP mean/std.  Prompts: BLIP's ``bert-base-uncased`` tokenizer
    (:func:`blip_tokenizer`: with the added ``[DEC]`` / ``[ENC]`` tokens), ``padding="max_length"`` with
    ``[PAD]``, truncated to 35 tokens (``[CLS] … [SEP]``).

    Model: image tokens of the ViT-L/16 (after its final LayerNorm) are the cross-attention memory of the
    BERT text encoder; the ``[CLS]`` output goes through the MLP ``768→1024→128→64→16→1``.

    Output: ``(mlp - 0.16717362830052426) / 1.0333394966054072`` (the published normalisation; roughly
    standard-normal over their benchmark), or the raw MLP output with ``normalize=False``.

    Args:
        pretrained: folder written by ``lit-diffac convert-reward image-reward``.
        dtype: model dtype.
        normalize: apply the published mean/std normalisation.
        name, batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "image_reward"

    def __init__(self, pretrained: str, dtype: str = "float32", normalize: bool = True, name: str | None = None,
                 batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        self.dtype = parse_dtype(dtype)
        self.normalize = normalize
        self.model = ImageRewardModel.from_pretrained(pretrained, dtype=self.dtype)
        self.tokenizer = load_blip_tokenizer(pretrained,
                                             vocab_size=int(self.model.config["text_config"]["vocab_size"]))
        self.preprocess = ClipImagePreprocess(size=self.model.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                              resample="pil", crop_rounding="round")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        pixels = self.preprocess(images).to(self.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.model.max_length, return_tensors="pt")
        return self.model(pixels, tokens["input_ids"].to(images.device), tokens["attention_mask"].to(images.device),
                          normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={str(self.dtype).removeprefix('torch.')}, normalize={self.normalize}"
