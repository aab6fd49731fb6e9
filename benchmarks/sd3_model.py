"""SD3.5-Medium at its real shapes, with no weights: component configs and a module with the checkpoint's state dict.

The values that shape tensors in stabilityai/stable-diffusion-3.5-medium's ``transformer/``, ``text_encoder/``,
``text_encoder_2/``, ``text_encoder_3/`` and ``vae/`` config.json, and PickScore_v1's CLIP ViT-H/14; the same
architecture at toy widths (:data:`TINY_SD3`, for tests). :func:`build_sd3_module` builds the real
:class:`~lit_diffac.backbones.DiTBackbone` from them on the meta device (no memory, no download) with a recipe's
backbone options, so that :mod:`benchmarks.checkpoint_size` can count what a checkpoint keeps.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD35_RECIPE = "recipes/sd35/pickscore.yaml"

# SD3.5-Medium's component configs (the values of stabilityai/stable-diffusion-3.5-medium's
# transformer/, text_encoder/, text_encoder_2/, text_encoder_3/ and vae/ config.json; PickScore_v1 is the
# laion CLIP-ViT-H-14 architecture).  Only the values that shape tensors matter here.
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SD35M_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SD35M_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
SD35M_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
PICKSCORE_CLIP = dict(
    projection_dim=1024,
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"))
SD35M = {"label": "SD3.5-Medium", "transformer": SD35M_TRANSFORMER, "clip_l": SD35M_CLIP_L, "clip_g": SD35M_CLIP_G,
         "t5": SD35M_T5, "vae": SD35M_VAE, "reward_clip": PICKSCORE_CLIP}

#: the same architecture at toy widths (tests, ``--quick``): every part present, taps 7 / 15 / 23 still exist.
TINY_SD3 = {
    "label": "tiny SD3 (test configuration)",
    "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=24,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=24,
                        dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"),
    "clip_l": dict(vocab_size=99, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=77, projection_dim=16),
    "clip_g": dict(vocab_size=99, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, projection_dim=16),
    "t5": dict(vocab_size=99, d_model=32, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                use_post_quant_conv=False),
    "reward_clip": dict(projection_dim=8,
                        text_config=dict(vocab_size=99, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)),
}


def _recipe_model_args(recipe: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / recipe).read_text())["model"]["init_args"]


def build_components(shapes: dict, use_t5: bool = True, device: str = "meta"):
    """``(PipelineComponents, reward CLIPModel)`` built from ``shapes`` on ``device`` (``"meta"``: no memory,
    parameters with shapes and dtypes only; ``"cpu"``: real random weights, for the tests)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from lit_diffac.backbones.loading import PipelineComponents

    with torch.device(device):
        transformer = SD3Transformer2DModel(**shapes["transformer"])
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**shapes["clip_l"]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**shapes["clip_g"]))
        t5 = T5EncoderModel(T5Config(**shapes["t5"])) if use_t5 else None
        vae = AutoencoderKL(**shapes["vae"])
        reward = CLIPModel(CLIPConfig(**shapes["reward_clip"]))
    extra = {"text_encoder_2": clip_g, "tokenizer_2": None}
    if t5 is not None:
        extra.update({"text_encoder_3": t5, "tokenizer_3": None})
    components = PipelineComponents(denoiser=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    tokenizer=None, text_encoder=clip_l, vae=vae, extra_text=extra)
    return components, reward


def recipe_options(recipe: str = SD35_RECIPE) -> dict:
    """What of ``recipe`` shapes the checkpoint: backbone options, ``use_t5``, rewards, reward dtype, value head."""
    from lit_diffac.dtypes import parse_dtype

    args = _recipe_model_args(recipe)
    backbone_args = dict(args["backbone"]["init_args"])
    backbone_args.pop("pretrained", None)
    rewards = args["rewards"]
    return {"backbone": backbone_args, "use_t5": backbone_args.get("use_t5", True), "num_rewards": len(rewards),
            "reward_dtype": parse_dtype((rewards[0].get("init_args") or {}).get("dtype", "float32")),
            "value_head": dict(args["value_head"]["init_args"])}


def build_sd3_module(shapes: dict, recipe: str = SD35_RECIPE, device: str = "meta"):
    """An ``nn.Module`` with the state dict ``LatentActorCritic`` has for ``recipe`` (``backbone``: the real
    :class:`~lit_diffac.backbones.DiTBackbone` with the recipe's options, ``rewards``: the reward's CLIP,
    ``value_head``, ``reward_normalizer``), its components built from ``shapes`` on ``device``; the value head
    and normaliser are real (small) tensors on the CPU.  Returns ``(module, recipe_options(recipe))``."""
    import torch
    from torch import nn

    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.normalization import RewardNormalizer
    from lit_diffac.value_heads import ValueHead

    options = recipe_options(recipe)
    components, reward_clip = build_components(shapes, use_t5=options["use_t5"], device=device)
    with torch.device(device):  # apply_lora's adapters on the same device as the weights
        backbone = DiTBackbone.from_components(components, **options["backbone"])
    reward_clip = reward_clip.requires_grad_(False).to(options["reward_dtype"])
    # DiTBackbone._encode: the pooled embedding is both CLIPs' projected outputs side by side.
    pooled_dim = shapes["clip_l"]["projection_dim"] + shapes["clip_g"]["projection_dim"]
    torch.manual_seed(0)
    value_head = ValueHead(backbone.feature_dims, pooled_dim, options["num_rewards"], **options["value_head"])
    module = nn.Module()
    module.backbone = backbone
    reward = nn.Module()
    reward.model = reward_clip
    module.rewards = nn.ModuleList([reward])
    module.value_head = value_head
    module.reward_normalizer = RewardNormalizer(options["num_rewards"])
    module.pooled_dim = pooled_dim
    return module, options
