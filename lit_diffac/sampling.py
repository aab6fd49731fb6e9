"""``lit-diffac sample``: generate images from a recipe's policy, optionally with critic steering or best-of-N.

    lit-diffac sample --ckpt runs/actor_critic_dit/version_0/checkpoints/last.ckpt \\
        --prompts toy:heldout --samples-per-prompt 4 --scale 0.5 --steps last:5 --out samples/

The recipe is the run's saved ``config.yaml`` (next to ``checkpoints/``) unless ``--config`` names one.  Writes
one PNG per sample, a grid (``grid.png``) and ``rewards.json`` (every reward of the recipe and the critic's value
for each image, their means, the settings and the backbone compute spent).  How to choose ``--scale``,
``--steps`` and ``--best-of``: docs/steering.md.

torch, diffusers and Lightning are imported only when sampling starts (``lit-diffac sample --help`` is quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def load_module(config: str, ckpt: str | None = None, overrides: list[str] | None = None):
    """Build the LightningModule a recipe describes (and load a Lightning checkpoint's weights into it).

    ``ckpt`` is a file or an ``http(s)://`` URL, read by :func:`lit_diffac.checkpoints.load_checkpoint`
    (``weights_only=True``; a corrupt, truncated or non-weights-only file raises a one-line error)."""
    return load_module_and_checkpoint(config, ckpt, overrides)[0]


def load_module_and_checkpoint(config: str, ckpt: str | None = None, overrides: list[str] | None = None):
    """``(module in eval mode, checkpoint dict or None)``: :func:`load_module`, keeping the checkpoint's other
    sections (its ``lit_diffac`` training state, for an export's provenance); the checkpoint is read first and
    once, so a bad one fails before the model is built."""
    from lit_diffac.cli import LitDiffacCLI
    from lit_diffac.frozen_weights import FROZEN_KEY, restore_frozen
    from lit_diffac.resume import CHECKPOINT_KEY

    checkpoint = state = None
    if ckpt is not None:
        from lit_diffac.checkpoints import CorruptCheckpointError, load_checkpoint

        # weights-only (URLs too), checked against the checksums saved with it (or, older files, for finiteness)
        checkpoint = load_checkpoint(ckpt, map_location="cpu")
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"checkpoint {ckpt} is not a Lightning checkpoint (it has no state_dict): "
                                         "pass a .ckpt file of a lit-diffac run")
    module = LitDiffacCLI(["--config", config, *(overrides or [])], run=False).model
    if state is not None:
        # trainable-only checkpoints: the frozen weights come from the recipe's pipeline, checked by their hash
        record = (checkpoint.get(CHECKPOINT_KEY) or {}).get(FROZEN_KEY)
        trainable = module.trainable_parameters() if hasattr(module, "trainable_parameters") else []
        restore_frozen(state, record, module, trainable, ckpt, ignore_prefixes=("rewards.",))
        module.load_state_dict(state, strict=False)
    return module.eval(), checkpoint


def save_images(images: torch.Tensor, folder: Path, names: list[str]) -> None:
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for array, name in zip(arrays, names):
        Image.fromarray(array).save(folder / name)
    cols = min(8, len(arrays))
    rows = -(-len(arrays) // cols)
    h, w = arrays.shape[1:3]
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, array in enumerate(arrays):
        grid.paste(Image.fromarray(array), ((i % cols) * w, (i // cols) * h))
    grid.save(folder / "grid.png")


def sample_main(argv: list[str]) -> int:
    """generate images from a recipe's policy (optionally critic-steered or best-of-N) with their rewards"""
    parser = argparse.ArgumentParser(prog="lit-diffac sample", description=__doc__.splitlines()[0],
                                     epilog="Choosing --scale / --steps / --best-of, with measured figures: "
                                            "docs/steering.md")
    parser.add_argument("--config", default=None, help="the recipe that built the policy (default: the "
                        "config.yaml of the checkpoint's run folder, next to checkpoints/)")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of that recipe: a file or an "
                        "http(s) URL, loaded weights-only (default: initial weights; then --config is needed)")
    parser.add_argument("--prompts", default="toy:heldout", help="prompt file, or toy:train / toy:heldout "
                        "(two-digit task: toy-pairs:heldout, ...)")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--scale", type=float, default=0.0, help="critic steering scale: each steered step "
                        "moves the latent along scale x the gradient of the critic's value (0: off)")
    parser.add_argument("--steps", default="all", help="steered steps: all, first:N, last:N")
    parser.add_argument("--best-of", type=int, default=1, help="best-of-N instead of steering (N > 1): "
                        "N candidates per sample, the best by --rank-by kept (N times the compute)")
    parser.add_argument("--rank-by", default="value", help="best-of-N ranking: 'value' or a reward name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    args, overrides = parser.parse_known_args(argv)
    if args.best_of > 1 and args.scale:
        parser.error("choose steering (--scale) or best-of-N (--best-of), not both")
    config = args.config or _run_config(parser, args.ckpt)
    import torch
    from tqdm.auto import tqdm

    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.evaluation import accuracies
    from lit_diffac.guidance import best_of_n, steered_sample

    prompts = load_prompts(args.prompts)
    prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
    if args.config is None:
        from lit_diffac.export import recipe_from_run_config

        with tempfile.TemporaryDirectory() as tmp:  # the run's config.yaml without its fit-only keys
            module = load_module(recipe_from_run_config(config, tmp), args.ckpt, overrides)
    else:
        module = load_module(config, args.ckpt, overrides)
    rewards = {r.name: r for r in [*module.rewards, *module.evaluation.rewards]}
    if args.best_of > 1 and args.rank_by != "value" and args.rank_by not in rewards:
        parser.error(f"--rank-by must be 'value' or one of {sorted(rewards)}")
    images, values, compute = [], [], 0.0
    generator = torch.Generator().manual_seed(args.seed)
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
        chunk = prompts[start:start + args.batch_size]
        if args.best_of > 1:
            rank_by = "value" if args.rank_by == "value" else rewards[args.rank_by]
            out = best_of_n(module.backbone, module.sampler, chunk, args.best_of, rank_by,
                            value_head=module.value_head, generator=generator)
        else:
            out = steered_sample(module.backbone, module.sampler, module.value_head, chunk, scale=args.scale,
                                 steps=args.steps, generator=generator)
        images.append(out.images)
        values.append(out.values)
        compute += out.compute
    images = torch.cat(images)
    out_dir = Path(args.out)
    names = [f"{i:05d}.png" for i in range(len(prompts))]
    save_images(images, out_dir, names)
    scores = {name: reward(images, prompts).tolist() for name, reward in rewards.items()}
    accuracy = {key: v.tolist() for r in rewards.values() for key, v in accuracies(r, images, prompts).items()}
    report = {
        "settings": {k: v for k, v in vars(args).items()}, "overrides": overrides,
        "compute_forward_equivalents": compute,
        "mean": {**{n: sum(v) / len(v) for n, v in scores.items()},
                 **{n: sum(v) / len(v) for n, v in accuracy.items()}},
        "images": [{"file": f, "prompt": p, **{n: scores[n][i] for n in scores}}
                   for i, (f, p) in enumerate(zip(names, prompts))],
    }
    if values[0] is not None:
        flat = torch.cat(values)
        for i, row in enumerate(report["images"]):
            row["value"] = flat[i].tolist()
    (out_dir / "rewards.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["mean"]))
    print(f"wrote {len(prompts)} images to {out_dir.resolve()}")
    return 0


def _run_config(parser: argparse.ArgumentParser, ckpt: str | None) -> str:
    """The ``config.yaml`` of ``ckpt``'s run folder (``runs/NAME/version_N/config.yaml`` for
    ``runs/NAME/version_N/checkpoints/X.ckpt``), as ``lit-diffac export`` finds it; a usage error if none."""
    from lit_diffac.export import default_config

    if ckpt is None:
        parser.error("pass --config RECIPE.yaml (the recipe to sample from), or --ckpt a checkpoint of a run "
                     "folder that has its config.yaml")
    if ckpt.startswith(("http://", "https://")):
        parser.error(f"checkpoint {ckpt} is a URL, which has no run folder with a config.yaml: pass --config "
                     "RECIPE.yaml (the recipe that trained the checkpoint)")
    if not Path(ckpt).is_file():
        parser.error(f"checkpoint {ckpt!r} not found")
    config = default_config(ckpt)
    if config is None:
        parser.error(f"no recipe: {Path(ckpt).resolve().parent.parent / 'config.yaml'} does not exist; pass "
                     "--config RECIPE.yaml (the recipe that trained the checkpoint)")
    print(f"recipe: {config}", file=sys.stderr)
    return config
