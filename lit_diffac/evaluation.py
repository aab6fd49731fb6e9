"""Held-out evaluation: fixed prompts, fixed seeds, CFG off (by default), every reward's mean.

The same function serves the RL modules (before, during and after training), toy base-model pretraining and
``lit-diffac toy-eval``, so their figures are comparable.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch

from lit_diffac.backbones.base import DiffusionBackbone
from lit_diffac.rollout import collect_rollout
from lit_diffac.samplers import DDIMSampler, FlowSDESampler
from lit_diffac.samplers.base import Sampler

#: Seed of the held-out evaluation noise (fixed across runs so figures compare).
EVAL_SEED = 12345


def default_sampler(backbone: DiffusionBackbone, num_steps: int = 10) -> Sampler:
    """The RL sampler of a backbone's family: DDIM with η = 1, or the flow SDE with noise level 0.7."""
    sampler = DDIMSampler(num_steps=num_steps, eta=1.0) if backbone.sampler_family == "ddim" \
        else FlowSDESampler(num_steps=num_steps, noise_level=0.7)
    sampler.setup(backbone.scheduler)
    return sampler


@torch.no_grad()
def generate(backbone: DiffusionBackbone, sampler: Sampler, prompts: Sequence[str], seed: int = EVAL_SEED,
             batch_size: int = 256, cfg_scale: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] for ``prompts``, reproducible from ``seed`` (chunks of ``batch_size``)."""
    device = torch.device(device) if device is not None else next(backbone.denoiser.parameters()).device
    was_training = backbone.training
    backbone.eval()
    images = []
    try:
        for start in range(0, len(prompts), batch_size):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
            chunk = list(prompts[start:start + batch_size])
            images.append(collect_rollout(backbone, sampler, chunk, generator=generator, cfg_scale=cfg_scale,
                                          device=device).images)
    finally:
        backbone.train(was_training)
    return torch.cat(images)


@torch.no_grad()
def evaluate(backbone: DiffusionBackbone, sampler: Sampler, prompts: Sequence[str], rewards: Sequence,
             samples_per_prompt: int = 25, seed: int = EVAL_SEED, cfg_scale: float = 1.0,
             device: torch.device | str | None = None) -> dict[str, float]:
    """``{"eval/<reward>": mean, "eval/<reward>_accuracy": ...}`` over ``prompts × samples_per_prompt``.

    A reward with an ``accuracy(images, prompts)`` method (e.g. the toy digit alignment) also reports it.
    """
    expanded = expand_prompts(prompts, samples_per_prompt)
    images = generate(backbone, sampler, expanded, seed=seed, cfg_scale=cfg_scale, device=device)
    return score_images(images, expanded, rewards)


def expand_prompts(prompts: Sequence[str], samples_per_prompt: int) -> list[str]:
    """Each prompt repeated ``samples_per_prompt`` times in a row (the held-out evaluation's order)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1 (got {samples_per_prompt})")
    return [p for p in prompts for _ in range(samples_per_prompt)]


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: Sequence[str], rewards: Sequence,
                 prefix: str = "eval/") -> dict[str, float]:
    """``{prefix + reward.name: mean score}`` of ``images [N, 3, H, W]`` for ``prompts``, plus
    ``{prefix + reward.name + "_accuracy": ...}`` for rewards with an ``accuracy(images, prompts)`` method."""
    prompts = list(prompts)
    out = {}
    for reward in rewards:
        out[f"{prefix}{reward.name}"] = reward(images, prompts).mean().item()
        if hasattr(reward, "accuracy"):
            out[f"{prefix}{reward.name}_accuracy"] = reward.accuracy(images, prompts).mean().item()
    return out


def evaluate_toy_alignment(backbone: DiffusionBackbone, samples_per_prompt: int = 25, num_steps: int = 10,
                           seed: int = EVAL_SEED, sampler: Sampler | None = None) -> dict[str, float]:
    """Held-out toy alignment: ``{"alignment_accuracy", "digit_probability", "num_samples"}``."""
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.rewards.toy import DigitAlignment

    prompts = load_prompts("toy:heldout")
    metrics = evaluate(backbone, sampler or default_sampler(backbone, num_steps), prompts, [DigitAlignment()],
                       samples_per_prompt=samples_per_prompt, seed=seed)
    return {"alignment_accuracy": metrics["eval/digit_alignment_accuracy"],
            "digit_probability": metrics["eval/digit_alignment"],
            "num_samples": len(prompts) * samples_per_prompt}


def toy_eval_main(argv: list[str]) -> int:
    """Report the toy world's figures: the judge's held-out accuracy and each base model's alignment."""
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.rewards.toy import DEFAULT_CLASSIFIER
    from lit_diffac.toy.classifier import DigitClassifier, accuracy
    from lit_diffac.toy.digits import load_digits

    parser = argparse.ArgumentParser(prog="lit-diffac toy-eval", description=toy_eval_main.__doc__)
    parser.add_argument("--samples-per-prompt", type=int, default=25)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--unet", default="toy-unet", help="UNet pipeline folder (default: the embedded one)")
    parser.add_argument("--dit", default="toy-dit", help="DiT pipeline folder (default: the embedded one)")
    args = parser.parse_args(argv)
    heldout = load_digits("heldout")
    report = {"classifier_heldout_accuracy": accuracy(DigitClassifier.from_pretrained(DEFAULT_CLASSIFIER),
                                                      heldout.images, heldout.labels),
              "classifier_heldout_images": len(heldout)}
    for name, cls, path in (("unet", UNetBackbone, args.unet), ("dit", DiTBackbone, args.dit)):
        report[f"{name}_base"] = evaluate_toy_alignment(cls(path), samples_per_prompt=args.samples_per_prompt,
                                                        seed=args.seed)
    report["cfg_scale"], report["sampler_steps"], report["seed"] = 1.0, 10, args.seed
    print(json.dumps(report, indent=2))
    return 0


def run_summary(module: str, iterations: int, samples_seen: int, wall_time_s: float, eval_history: list[dict],
                recent: list[dict[str, float]], seed: int) -> dict:
    """The ``summary.json`` of a run: base and final held-out metrics, diagnostics averaged over ``recent``.

    ``eval_history`` holds the evaluations (``label`` ``"base"`` first, the last one final); ``recent`` the
    per-iteration metrics of the last iterations (``train/…`` averaged into ``final_train``; ``perf/…`` left out).
    """
    base = next((e for e in eval_history if e["label"] == "base"), None)
    final = eval_history[-1] if eval_history else {}
    averaged = {k: sum(m[k] for m in recent if k in m) / sum(k in m for m in recent)
                for k in {k for m in recent for k in m}}
    return {
        "module": module,
        "iterations": iterations,
        "samples_seen": samples_seen,
        "wall_time_s": wall_time_s,
        "base": {k: v for k, v in (base or {}).items() if k.startswith("eval/")},
        "final": {k: v for k, v in final.items() if k.startswith("eval/")},
        "final_explained_variance": averaged.get("train/explained_variance"),
        "final_train": {"averaged_over_iterations": len(recent),
                        **{k: v for k, v in sorted(averaged.items()) if not k.startswith("perf/")}},
        "eval_history": eval_history,
        "seed": seed,
    }
