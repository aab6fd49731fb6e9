"""HPSv2 / HPSv2.1 (Human Preference Score v2), on a ``transformers`` ``CLIPModel``.

The official checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are OpenCLIP ViT-H-14
state dicts; convert one once with::

    lit-diffac convert-reward hpsv2 HPS_v2.1_compressed.pt OUT_DIR --tokenizer CLIP_TOKENIZER_DIR

(:func:`lit_diffac.rewards.convert.convert_open_clip_state_dict` does the key remapping) and pass
``OUT_DIR`` as ``pretrained``.
"""

from __future__ import annotations

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

__all__ = ["HPSv2", "HPS_GET"]

HPS_GET = ("Download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from https://huggingface.co/xswu/HPSv2 "
           "and the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
           "(https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K), then convert once with "
           "`lit-diffac convert-reward hpsv2 HPS_v2.1_compressed.pt OUT_DIR --tokenizer TOKENIZER_DIR` "
           "and pass OUT_DIR as pretrained.")


class HPSv2(Reward):
    """Human Preference Score v2 / v2.1: the cosine similarity of an OpenCLIP ViT-H-14 fine-tuned on HPD v2.

    Original: ``tgxs002/HPSv2`` (``hpsv2/img_score.py``: ``create_model_and_transforms('ViT-H-14', ...)``,
    ``model.load_state_dict(checkpoint['state_dict'])``), with OpenCLIP's eval transform
    (``hpsv2/src/open_clip/transform.py``).

    Preprocessing: ``ToTensor`` of the uint8 image *then* ``Resize(224, BICUBIC)`` on the float tensor
    (``F.interpolate``, antialiased as torchvision >= 0.17 does by default; ``antialias=False`` gives
    torchvision 0.15/0.16), ``CenterCrop(224)`` (rounded offsets), OpenAI mean/std.  Prompts: the CLIP BPE
    tokenizer, lower-cased, 77 tokens with start/end tokens (OpenCLIP's ``tokenize``).

    Output: ``image_features @ text_features`` of the L2-normalised embeddings (no logit scale), i.e. the
    cosine, about 0.2–0.35 for real images.

    Args:
        pretrained: folder written by ``lit-diffac convert-reward hpsv2`` (``CLIPModel`` + tokenizer).
        dtype: model dtype (the original runs under fp16 autocast).
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
                                              resample="tensor", crop_rounding="round", antialias=antialias)

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        self.to(images.device)
        return clip_cosine(self.model, self.tokenizer, self.preprocess, images, prompts, self.dtype,
                           max_length=self.model.config.text_config.max_position_embeddings)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={str(self.dtype).removeprefix('torch.')}"
