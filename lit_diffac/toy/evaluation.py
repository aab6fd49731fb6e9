"""The toy world's figures: the judge's held-out accuracy and each base model's held-out alignment."""

from __future__ import annotations

import argparse
import json

from lit_diffac.backbones.base import DiffusionBackbone
from lit_diffac.evaluation import EVAL_SEED, default_sampler, evaluate
from lit_diffac.samplers.base import Sampler


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
