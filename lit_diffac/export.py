"""``lit-diffac export``: a trained policy from a Lightning checkpoint, as files plain diffusers code loads.

    lit-diffac export --ckpt runs/actor_critic_dit/version_0/checkpoints/last.ckpt --out exported/

The recipe is the run's own ``config.yaml`` (next to ``checkpoints/``) unless ``--config`` names one; the
checkpoint (a file, or an ``http(s)://`` URL with ``--config``) is read with ``weights_only=True`` and checked
against its tensor checksums (:func:`lit_diffac.checkpoints.load_checkpoint`).  Written (all weights as
safetensors)::

    OUT/lora/pytorch_lora_weights.safetensors   a LoRA policy, in diffusers' pipeline LoRA format
                                                (``pipe.load_lora_weights("OUT/lora")``)
    OUT/pipeline/                               a fully fine-tuned policy, or a LoRA merged into its base
                                                (``--merge``): the base pipeline folder with the trained
                                                ``unet/`` or ``transformer/`` (``from_pretrained("OUT/pipeline")``)
    OUT/value_head.safetensors                  the critic head (lit_diffac.value_heads.load_value_head)
    OUT/export.json                             what was written, from which checkpoint, recipe and base model
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lit_diffac.backbones.base import DiffusionBackbone, resolve_pretrained

__all__ = ["ADAPTER", "LORA_WEIGHTS", "denoiser_subfolder", "export_main", "export_module", "has_lora",
           "merged_denoiser", "save_lora", "save_pipeline_folder"]

#: Name of the policy's peft adapter (see :func:`lit_diffac.backbones.lora.apply_lora`).
ADAPTER = "policy"
#: Top-level keys of a recipe (a run's saved config also has ``fit`` options such as ``ckpt_path``).
RECIPE_SECTIONS = ("seed_everything", "trainer", "model", "data", "vars")
#: diffusers' file name for pipeline LoRA weights.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def denoiser_subfolder(backbone: DiffusionBackbone) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline subfolder of the backbone's denoiser."""
    return "unet" if backbone.sampler_family == "ddim" else "transformer"


def has_lora(denoiser: nn.Module) -> bool:
    """Whether the denoiser carries the policy's LoRA adapter."""
    return ADAPTER in (getattr(denoiser, "peft_config", None) or {})


def save_lora(backbone: DiffusionBackbone, folder: str | Path) -> Path:
    """Write the policy's LoRA in diffusers' pipeline format (``unet.``/``transformer.``-prefixed peft keys and
    the adapter's ``LoraConfig`` — rank, alpha, targets — in the safetensors metadata); returns the file."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    denoiser = backbone.denoiser
    if not has_lora(denoiser):
        raise ValueError("this policy has no LoRA adapter (lora_rank = 0): export the full weights instead")
    layers = {k: v.detach().contiguous().cpu() for k, v in
              get_peft_model_state_dict(denoiser, adapter_name=ADAPTER).items()}
    metadata = denoiser.peft_config[ADAPTER].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    folder = Path(folder)
    if denoiser_subfolder(backbone) == "unet":
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    else:
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                                   transformer_lora_adapter_metadata=metadata)
    return folder / LORA_WEIGHTS


def merged_denoiser(denoiser: nn.Module) -> nn.Module:
    """A copy of ``denoiser`` with its LoRA merged into the base weights and the adapter layers removed (a plain
    diffusers model; the original is untouched).  Without a LoRA, a plain copy."""
    merged = copy.deepcopy(denoiser)
    for module in merged.modules():  # the feature taps' hooks belong to the training backbone
        module._forward_hooks.clear()
    if has_lora(merged):
        merged.fuse_lora(adapter_names=[ADAPTER])
        merged.unload_lora()
    return merged


def save_pipeline_folder(denoiser: nn.Module, subfolder: str, base: str | Path, out: str | Path) -> Path:
    """Copy the base pipeline folder ``base`` to ``out`` with ``denoiser`` saved (``save_pretrained``, safetensors)
    in place of its ``subfolder``, so ``from_pretrained(out)`` loads the trained policy."""
    base, out = Path(base), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=lambda d, names: [subfolder] if Path(d) == base and subfolder in names else [])
    denoiser.save_pretrained(out / subfolder, safe_serialization=True)
    return out


def base_pipeline_folder(backbone: DiffusionBackbone, base: str | None = None) -> Path:
    """The local pipeline folder the backbone was loaded from (or ``base``); a clear error for a hub id."""
    source = base or getattr(backbone, "pretrained", None)
    folder = Path(resolve_pretrained(source)) if source else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"export: the base pipeline {source!r} is not a local folder; pass --base DIR "
                                "(a local copy of it) to copy its other components next to the trained weights")
    return folder


def export_module(module, out: str | Path, merge: bool = False, base: str | None = None,
                  provenance: dict | None = None) -> dict:
    """Write ``module``'s policy (LoRA and/or full pipeline) and critic to ``out``; returns the manifest."""
    backbone: DiffusionBackbone = module.backbone
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subfolder = denoiser_subfolder(backbone)
    lora = has_lora(backbone.denoiser)
    if merge and not lora:
        raise ValueError("--merge needs a LoRA policy; this one is fully fine-tuned (its full weights are exported)")
    written: dict[str, str] = {}
    if lora:
        written["lora"] = str(save_lora(backbone, out / "lora"))
    if merge or not lora:
        base_folder = base_pipeline_folder(backbone, base)
        denoiser = merged_denoiser(backbone.denoiser)
        written["pipeline"] = str(save_pipeline_folder(denoiser, subfolder, base_folder, out / "pipeline"))
        written["base_pipeline"] = str(base_folder)
    value_head = getattr(module, "value_head", None)
    if value_head is not None:
        from lit_diffac.value_heads.io import save_value_head

        written["value_head"] = str(save_value_head(
            value_head, out / "value_head.safetensors", rewards=list(getattr(module, "reward_names", [])),
            feature_dims=backbone.feature_dims, text_dim=backbone.pooled_dim))
    manifest = {"written": written, "denoiser": subfolder, "lora": lora, "merged": merge,
                "base": str(getattr(backbone, "pretrained", None)), **(provenance or {})}
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_config(ckpt: str) -> str | None:
    """The run's saved ``config.yaml`` for ``runs/NAME/version_N/checkpoints/X.ckpt``, if it exists."""
    candidate = Path(ckpt).resolve().parent.parent / "config.yaml"
    return str(candidate) if candidate.is_file() else None


def recipe_from_run_config(config: str, folder: str | Path) -> str:
    """A copy of a run's saved ``config.yaml`` (a ``fit`` config) in ``folder`` with only the recipe sections
    (``fit``-only keys such as ``ckpt_path`` dropped), so it builds the module as a recipe does; returns its path."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    data = {k: v for k, v in data.items() if k in RECIPE_SECTIONS}
    path = Path(folder) / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def export_main(argv: list[str]) -> int:
    """write a checkpoint's policy (LoRA, merged or full weights, diffusers format) and critic as safetensors"""
    from lit_diffac.sampling import load_module

    layout = __doc__[__doc__.index("    OUT/lora"):].rstrip().replace("``", "")
    parser = argparse.ArgumentParser(prog="lit-diffac export", description=export_main.__doc__,
                                     epilog=f"written:\n{layout}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint (e.g. runs/.../checkpoints/"
                        "last.ckpt, or an http(s) URL), loaded weights-only")
    parser.add_argument("--config", default=None,
                        help="the recipe that trained it (default: config.yaml of the checkpoint's run folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA policies: also write the pipeline with the LoRA merged into the base weights")
    parser.add_argument("--base", default=None,
                        help="local base pipeline folder to copy (default: the recipe's backbone pretrained path)")
    args, overrides = parser.parse_known_args(argv)
    from lit_diffac.checkpoints import is_url

    url = is_url(args.ckpt)
    if url and args.config is None:
        parser.error(f"checkpoint {args.ckpt} is a URL, which has no run folder with a config.yaml: pass "
                     "--config RECIPE.yaml (the recipe that trained the checkpoint)")
    if not url and not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt!r} not found")
    config = args.config or default_config(args.ckpt)
    if config is None:
        parser.error(f"no recipe: {Path(args.ckpt).resolve().parent.parent / 'config.yaml'} does not exist; "
                     "pass --config RECIPE.yaml (the recipe that trained the checkpoint)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_run_config(config, tmp) if args.config is None else config
        module = load_module(recipe, args.ckpt, overrides)
    with torch.no_grad():
        manifest = export_module(module, args.out, merge=args.merge, base=args.base, provenance={
            "checkpoint": args.ckpt if url else str(Path(args.ckpt).resolve()),
            "recipe": str(Path(config).resolve()),
            "overrides": overrides})
    for kind, path in manifest["written"].items():
        if kind != "base_pipeline":
            print(f"{kind}: {Path(path).resolve()}")
    return 0
