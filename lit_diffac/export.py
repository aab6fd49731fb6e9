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
                                                ``unet/`` or ``transformer/`` and a ``model_index.json``
                                                (``DiffusionPipeline.from_pretrained("OUT/pipeline")``)
    OUT/base_pipeline/                          toy LoRA policies only: the toy base made loadable, for
                                                ``load_lora_weights``
    OUT/value_head.safetensors                  the critic head (lit_diffac.value_heads.load_value_head)
    OUT/export.json                             what was written, and the run's provenance
    OUT/{pipeline,lora}/lit_diffac.json         the run's provenance: recipe (path, sha256, content),
                                                checkpoint, iterations, samples seen, held-out metrics, and
                                                the base model it started from (``base``)

``model_index.json``: an SD1.5 / SD3 / FLUX.1 base keeps its own (a folder without one gets the stock
``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` entry); the pixel-space toys
(one text encoder, no VAE: no stock pipeline fits) get :mod:`lit_diffac.toy.diffusers_pipeline` copied in as
``lit_diffac_pipeline.py`` and named in theirs, so ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads and generates.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers are imported when exporting starts (``lit-diffac export --help`` is quick)
    from torch import nn

    from lit_diffac.backbones.base import DiffusionBackbone

__all__ = ["ADAPTER", "LORA_WEIGHTS", "PROVENANCE", "TOY_PIPELINE_MODULE", "denoiser_subfolder", "export_main",
           "export_module", "has_lora", "lora_pipeline_class", "merged_denoiser", "run_provenance", "save_lora",
           "save_pipeline_folder", "write_model_index"]

#: Name of the policy's peft adapter (see :func:`lit_diffac.backbones.lora.apply_lora`).
ADAPTER = "policy"
#: Top-level keys of a recipe (a run's saved config also has ``fit`` options such as ``ckpt_path``).
RECIPE_SECTIONS = ("seed_everything", "trainer", "model", "data", "vars")
#: diffusers' file name for pipeline LoRA weights.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: File name of the provenance record in an exported folder (as in the toy pipeline folders).
PROVENANCE = "lit_diffac.json"
#: Module name of the toy pipelines' code inside an exported toy folder (``model_index.json`` names it).
TOY_PIPELINE_MODULE = "lit_diffac_pipeline"
#: Stock pipeline layouts: denoiser subfolder → (class, optional components stored as ``[null, null]``).
STOCK_PIPELINES = {
    "unet": ("StableDiffusionPipeline", ("safety_checker", "feature_extractor", "image_encoder")),
    "transformer": ("StableDiffusion3Pipeline", ("text_encoder_3", "tokenizer_3", "feature_extractor",
                                                 "image_encoder")),
}
#: Stock pipelines of denoiser classes that share a subfolder name with another layout (FLUX.1's
#: ``transformer/`` is not SD3's): denoiser class → (pipeline class, optional components).
DENOISER_PIPELINES = {
    "FluxTransformer2DModel": ("FluxPipeline", ("feature_extractor", "image_encoder")),
}
#: SDXL: a ``unet/`` layout with a second text encoder (same denoiser class as SD1.5's).
SDXL_PIPELINE = ("StableDiffusionXLPipeline", ("feature_extractor", "image_encoder"))


def denoiser_subfolder(backbone: DiffusionBackbone) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline subfolder of the backbone's denoiser."""
    return "unet" if backbone.sampler_family == "ddim" else "transformer"


def has_lora(denoiser: nn.Module) -> bool:
    """Whether the denoiser carries the policy's LoRA adapter."""
    return ADAPTER in (getattr(denoiser, "peft_config", None) or {})


def lora_pipeline_class(backbone: DiffusionBackbone):
    """The stock pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` fit the backbone: its
    ``pipeline_class`` (FLUX: ``FluxPipeline``), else ``StableDiffusionPipeline`` (UNet) /
    ``StableDiffusion3Pipeline`` (DiT)."""
    import diffusers

    name = getattr(backbone, "pipeline_class", None) or STOCK_PIPELINES[denoiser_subfolder(backbone)][0]
    return getattr(diffusers, name)


def save_lora(backbone: DiffusionBackbone, folder: str | Path) -> Path:
    """Write the policy's LoRA in diffusers' pipeline format (``unet.``/``transformer.``-prefixed peft keys and
    the adapter's ``LoraConfig`` — rank, alpha, targets — in the safetensors metadata), with the stock pipeline's
    own ``save_lora_weights`` (:func:`lora_pipeline_class`); returns the file."""
    from peft.utils import get_peft_model_state_dict

    denoiser = backbone.denoiser
    if not has_lora(denoiser):
        raise ValueError("this policy has no LoRA adapter (lora_rank = 0): export the full weights instead")
    layers = {k: v.detach().contiguous().cpu() for k, v in
              get_peft_model_state_dict(denoiser, adapter_name=ADAPTER).items()}
    metadata = denoiser.peft_config[ADAPTER].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    folder = Path(folder)
    pipeline = lora_pipeline_class(backbone)
    if denoiser_subfolder(backbone) == "unet":
        pipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    else:
        pipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
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


def _component_class(folder: Path, name: str) -> list[str] | None:
    """``[library, class]`` of the pipeline component in ``folder/name``, read from its own config file (``None``
    for a folder that is not a component)."""
    sub = folder / name
    if (sub / "scheduler_config.json").is_file():
        return ["diffusers", json.loads((sub / "scheduler_config.json").read_text())["_class_name"]]
    if name.startswith("tokenizer"):
        config = sub / "tokenizer_config.json"
        cls = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
        return ["transformers", cls or ("T5TokenizerFast" if name == "tokenizer_3" else "CLIPTokenizer")]
    if not (sub / "config.json").is_file():
        return None
    config = json.loads((sub / "config.json").read_text())
    if "_class_name" in config:
        return ["diffusers", config["_class_name"]]
    architectures = config.get("architectures") or [None]
    return ["transformers", architectures[0]] if architectures[0] else None


def write_model_index(folder: str | Path, subfolder: str) -> Path:
    """Give the pipeline folder ``folder`` (denoiser in ``subfolder``) a ``model_index.json`` if it has none.

    With a ``vae/`` it is a stock layout: ``StableDiffusionPipeline`` (``unet``), ``StableDiffusionXLPipeline``
    (``unet`` and a ``text_encoder_2/``), ``StableDiffusion3Pipeline`` (``transformer``) or, for a
    ``FluxTransformer2DModel`` transformer, ``FluxPipeline``
    (:data:`DENOISER_PIPELINES`), missing optional parts ``null``.  Without one it is a
    pixel-space toy: :mod:`lit_diffac.toy.diffusers_pipeline` is copied in as ``lit_diffac_pipeline.py`` and
    ``_class_name`` names its ``ToyUNetPipeline`` / ``ToyDiTPipeline`` (loaded with ``trust_remote_code=True``).
    Returns the file.
    """
    import diffusers

    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        return index
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    entries: dict[str, Any] = {name: cls for name in present if (cls := _component_class(folder, name))}
    if "vae" in present:
        denoiser_class = (entries.get(subfolder) or [None, None])[1]
        sdxl = subfolder == "unet" and "text_encoder_2" in present
        class_name, optional = SDXL_PIPELINE if sdxl else \
            DENOISER_PIPELINES.get(denoiser_class, STOCK_PIPELINES[subfolder])
        entries.update({name: [None, None] for name in optional if name not in entries})
        if sdxl:
            entries["force_zeros_for_empty_prompt"] = True  # SDXL base's value (and diffusers' default)
        elif subfolder == "unet":
            entries["requires_safety_checker"] = False
    else:
        from lit_diffac.toy import diffusers_pipeline

        shutil.copyfile(diffusers_pipeline.__file__, folder / f"{TOY_PIPELINE_MODULE}.py")
        class_name = [TOY_PIPELINE_MODULE, "ToyUNetPipeline" if subfolder == "unet" else "ToyDiTPipeline"]
    config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **dict(sorted(entries.items()))}
    index.write_text(json.dumps(config, indent=2) + "\n")
    return index


def save_pipeline_folder(denoiser: nn.Module, subfolder: str, base: str | Path, out: str | Path,
                         provenance: dict | None = None) -> Path:
    """Copy the base pipeline folder ``base`` to ``out`` with ``denoiser`` saved (``save_pretrained``, safetensors)
    in place of its ``subfolder`` and a ``model_index.json`` (:func:`write_model_index`), so
    ``DiffusionPipeline.from_pretrained(out)`` loads the trained policy.  ``provenance`` replaces the base's
    ``lit_diffac.json`` (which described the base model, not this one)."""
    base, out = Path(base), Path(out)
    if out.exists():
        shutil.rmtree(out)
    skip = {subfolder, PROVENANCE} if provenance is not None else {subfolder}
    shutil.copytree(base, out, ignore=lambda d, names: [n for n in names if n in skip] if Path(d) == base else [])
    denoiser.save_pretrained(out / subfolder, safe_serialization=True)
    write_model_index(out, subfolder)
    if provenance is not None:
        write_provenance(out, provenance)
    return out


def write_provenance(folder: Path, provenance: dict) -> Path:
    """Write ``provenance`` as ``folder/lit_diffac.json``; returns the file."""
    path = Path(folder) / PROVENANCE
    path.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return path


def base_pipeline_folder(backbone: DiffusionBackbone, base: str | None = None) -> Path:
    """The local pipeline folder the backbone was loaded from (or ``base``); a clear error for a hub id."""
    from lit_diffac.backbones.loading import resolve_pretrained

    source = base or getattr(backbone, "pretrained", None)
    folder = Path(resolve_pretrained(source)) if source else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"export: the base pipeline {source!r} is not a local folder; pass --base DIR "
                                "(a local copy of it) to copy its other components next to the trained weights")
    return folder


def base_provenance(backbone: DiffusionBackbone, base: str | None = None) -> dict:
    """The ``base`` field of an export's provenance: the model the run started from (its name, local folder and
    that folder's own ``lit_diffac.json``, when it has one, e.g. the toy models' pretraining record)."""
    pretrained = getattr(backbone, "pretrained", None)
    try:
        folder: Path | None = base_pipeline_folder(backbone, base)
    except FileNotFoundError:
        if base is not None:  # --base names no folder
            raise
        folder = None  # a hub id: fine for a LoRA-only export
    record = folder / PROVENANCE if folder is not None else None
    return {"pretrained": None if pretrained is None else str(pretrained),
            "folder": None if folder is None else str(folder.resolve()),
            "provenance": json.loads(record.read_text()) if record is not None and record.is_file() else None}


def policy_description(backbone: DiffusionBackbone, merge: bool) -> dict:
    """What the exported policy is: denoiser class and subfolder, LoRA (rank, alpha) or full fine-tune."""
    denoiser = backbone.denoiser
    lora = has_lora(denoiser)
    config = denoiser.peft_config[ADAPTER] if lora else None
    return {"denoiser": denoiser_subfolder(backbone), "denoiser_class": type(denoiser).__name__,
            "backbone": f"{type(backbone).__module__}.{type(backbone).__name__}",
            "lora": {"rank": config.r, "alpha": config.lora_alpha, "merged": merge} if lora else None}


def export_module(module, out: str | Path, merge: bool = False, base: str | None = None,
                  provenance: dict | None = None) -> dict:
    """Write ``module``'s policy (LoRA and/or full pipeline) and critic to ``out``; returns the manifest.

    ``provenance`` (the run: :func:`run_provenance`) goes, with the policy's description and its ``base``, into
    ``lit_diffac.json`` next to the weights and into ``export.json``."""
    backbone: DiffusionBackbone = module.backbone
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subfolder = denoiser_subfolder(backbone)
    lora = has_lora(backbone.denoiser)
    if merge and not lora:
        raise ValueError("--merge needs a LoRA policy; this one is fully fine-tuned (its full weights are exported)")
    record = {**(provenance or {}), "policy": policy_description(backbone, merge),
              "base": base_provenance(backbone, base)}
    written: dict[str, str] = {}
    if lora:
        written["lora"] = str(save_lora(backbone, out / "lora"))
        write_provenance(out / "lora", record)
        base_folder = Path(record["base"]["folder"]) if record["base"]["folder"] else None
        if base_folder is not None and not (base_folder / "model_index.json").is_file() \
                and not (base_folder / "vae").is_dir():  # a toy base: a loadable copy to apply the LoRA to
            target = out / "base_pipeline"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(base_folder, target)
            write_model_index(target, subfolder)
            written["base_pipeline"] = str(target)
    if merge or not lora:
        base_folder = base_pipeline_folder(backbone, base)
        denoiser = merged_denoiser(backbone.denoiser)
        written["pipeline"] = str(save_pipeline_folder(denoiser, subfolder, base_folder, out / "pipeline", record))
    value_head = getattr(module, "value_head", None)
    if value_head is not None:
        from lit_diffac.value_heads.io import save_value_head

        written["value_head"] = str(save_value_head(
            value_head, out / "value_head.safetensors", rewards=list(getattr(module, "reward_names", [])),
            feature_dims=backbone.feature_dims, text_dim=backbone.pooled_dim))
    manifest = {"written": written, "denoiser": subfolder, "lora": lora, "merged": merge, **record}
    (out / "export.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def default_config(ckpt: str) -> str | None:
    """The run's saved ``config.yaml`` for ``runs/NAME/version_N/checkpoints/X.ckpt``, if it exists."""
    candidate = Path(ckpt).resolve().parent.parent / "config.yaml"
    return str(candidate) if candidate.is_file() else None


def recipe_sections(config: str | Path) -> dict:
    """The recipe sections of a recipe or of a run's saved ``config.yaml`` (``fit``-only keys dropped)."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    return {k: v for k, v in data.items() if k in RECIPE_SECTIONS}


def recipe_from_run_config(config: str, folder: str | Path) -> str:
    """A copy of a run's saved ``config.yaml`` (a ``fit`` config) in ``folder`` with only the recipe sections
    (``fit``-only keys such as ``ckpt_path`` dropped), so it builds the module as a recipe does; returns its path."""
    import yaml

    path = Path(folder) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_sections(config), sort_keys=False))
    return str(path)


def _eval_entry(entry: dict) -> dict:
    keep = ("iteration", "label", "samples_seen")
    return {**{k: entry[k] for k in keep if k in entry}, **{k: v for k, v in entry.items() if k.startswith("eval/")}}


def _run_summary(ckpt: str, samples_seen: int, history: list[dict]) -> tuple[list[dict], str] | None:
    """The evaluations of the run's ``summary.json`` when it names this checkpoint and extends its history (the
    final evaluation runs after ``last.ckpt`` is written, on the same weights); else ``None``."""
    path = Path(ckpt).resolve().parent.parent / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    evaluations = summary.get("eval_history") or []
    if (summary.get("checkpoint") != str(Path(ckpt).resolve()) or summary.get("samples_seen") != samples_seen
            or evaluations[:len(history)] != history):
        return None
    return evaluations, str(path)


def run_provenance(checkpoint: dict, ckpt: str, config: str | Path, overrides: list[str] | None = None,
                   module: Any = None) -> dict:
    """What an exported policy is the result of: the RL run's recipe (path, sha256 of the file, its content and
    the command-line overrides), the checkpoint (path, epoch, global step, a fingerprint of its tensor
    checksums), iterations and samples seen, and the held-out evaluations (``held_out``: ``final`` — the
    evaluation of these weights, ``None`` if the run did not evaluate them —, ``base`` and ``history``).

    The evaluations come from the checkpoint's ``lit_diffac`` section; for a run's own checkpoint the run's
    ``summary.json`` adds the final evaluation (run after ``last.ckpt`` is written, on the same weights) when it
    names this checkpoint and matches its samples seen.
    """
    from lit_diffac import __version__
    from lit_diffac.checkpoints import CHECKSUM_KEY, is_url
    from lit_diffac.resume import CHECKPOINT_KEY

    state = checkpoint.get(CHECKPOINT_KEY) or {}
    samples_seen = state.get("samples_seen")
    iterations = state.get("iterations", checkpoint.get("epoch"))
    history = [dict(e) for e in state.get("eval_history") or []]
    source = "checkpoint"
    if not is_url(ckpt):
        found = _run_summary(ckpt, samples_seen, history)
        if found is not None:
            history, source = found
    final = next((e for e in reversed(history) if e.get("samples_seen") == samples_seen), None)
    base = next((e for e in history if e.get("label") == "base"), None)
    checksums = checkpoint.get(CHECKSUM_KEY)
    fingerprint = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest() \
        if isinstance(checksums, dict) else None
    config = Path(config)
    provenance = {
        "exported_by": f"lit-diffac {__version__} export",
        "trained_by": None,
        "recipe": {"path": str(config.resolve()), "sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
                   "overrides": list(overrides or []), "config": recipe_sections(config)},
        "checkpoint": {"path": ckpt if is_url(ckpt) else str(Path(ckpt).resolve()),
                       "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"),
                       "checksums_sha256": fingerprint},
        "iterations": iterations,
        "samples_seen": samples_seen,
        "held_out": {"final": _eval_entry(final) if final else None, "base": _eval_entry(base) if base else None,
                     "history": [_eval_entry(e) for e in history], "source": source},
    }
    if module is not None:
        provenance["trained_by"] = f"{type(module).__module__}.{type(module).__name__}"
        sampler = getattr(module, "sampler", None)
        if sampler is not None:
            params = sampler._hparams() if hasattr(sampler, "_hparams") else {}
            provenance["sampling"] = {"sampler": f"{type(sampler).__module__}.{type(sampler).__name__}", **params,
                                      "cfg_scale": getattr(getattr(module, "backbone", None), "cfg_scale", None)}
    return provenance


def export_main(argv: list[str]) -> int:
    """write a checkpoint's policy (LoRA, merged or full weights, diffusers format) and critic as safetensors"""
    layout = __doc__[__doc__.index("    OUT/lora"):__doc__.index("``model_index.json``:")].rstrip().replace("``", "")
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

    import torch

    from lit_diffac.sampling import load_module_and_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_run_config(config, tmp) if args.config is None else config
        module, checkpoint = load_module_and_checkpoint(recipe, args.ckpt, overrides)
    provenance = run_provenance(checkpoint, args.ckpt, config, overrides, module)
    del checkpoint
    with torch.no_grad():
        manifest = export_module(module, args.out, merge=args.merge, base=args.base, provenance=provenance)
    for kind, path in manifest["written"].items():
        print(f"{kind}: {Path(path).resolve()}")
    return 0
