"""The toy world's figures: the judge's held-out accuracy and each base model's held-out alignment, for the
single-digit task and the two-digit task (:mod:`lit_diffac.toy.pairs`: the judge on real two-digit canvases,
the base models' accuracy on seen and unseen pairs)."""

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


def evaluate_pair_alignment(backbone: DiffusionBackbone, samples_per_prompt: int = 25, num_steps: int = 10,
                            seed: int = EVAL_SEED, sampler: Sampler | None = None) -> dict[str, float]:
    """Held-out two-digit alignment (``"toy-pairs:heldout"``: 40 seen-pair and 40 unseen-pair prompts, held-out
    templates): ``{"alignment_accuracy", "alignment_accuracy_seen", "alignment_accuracy_unseen",
    "pair_probability", "num_samples"}`` (accuracy: both digits right, by the judge on each half)."""
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.rewards.toy import PairAlignment

    prompts = load_prompts("toy-pairs:heldout")
    metrics = evaluate(backbone, sampler or default_sampler(backbone, num_steps), prompts, [PairAlignment()],
                       samples_per_prompt=samples_per_prompt, seed=seed)
    return {"alignment_accuracy": metrics["eval/pair_alignment_accuracy"],
            "alignment_accuracy_seen": metrics["eval/pair_alignment_accuracy_seen"],
            "alignment_accuracy_unseen": metrics["eval/pair_alignment_accuracy_unseen"],
            "pair_probability": metrics["eval/pair_alignment"],
            "num_samples": len(prompts) * samples_per_prompt}


def judge_pair_accuracy(canvases_per_pair: int = 10, seed: int = 0) -> dict[str, float]:
    """The judge on real two-digit canvases of the held-out digit split: every one of the 100 ordered pairs,
    ``canvases_per_pair`` canvases each (random held-out images, jittered as in training; ``seed``), scored as
    :class:`~lit_diffac.rewards.toy.PairAlignment` scores samples: ``{"pair_judge_accuracy"`` (both halves
    right), ``"pair_judge_images"``, ``"pair_judge_probability"`` (mean dense reward)``}``."""
    import torch

    from lit_diffac.backbones.base import to_unit_rgb
    from lit_diffac.rewards.toy import PairAlignment
    from lit_diffac.toy.digits import load_digits
    from lit_diffac.toy.pairs import canvases_for, make_pair_prompt

    chosen = torch.tensor([(a, b) for a in range(10) for b in range(10) for _ in range(canvases_per_pair)])
    canvases = canvases_for(load_digits("heldout"), chosen, generator=torch.Generator().manual_seed(seed))
    prompts = [make_pair_prompt(a, b, "{a} and {b}") for a, b in chosen.tolist()]
    judge, images = PairAlignment(), to_unit_rgb(canvases)
    with torch.no_grad():
        return {"pair_judge_accuracy": judge.accuracy(images, prompts).mean().item(),
                "pair_judge_images": len(prompts),
                "pair_judge_probability": judge(images, prompts).mean().item()}


def toy_eval_main(argv: list[str]) -> int:
    """Report the toy world's figures: the judge's held-out accuracy and each base model's alignment (single
    digits, then the two-digit task: the judge on real canvases, the base models on seen and unseen pairs)."""
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.rewards.toy import DEFAULT_CLASSIFIER
    from lit_diffac.toy.classifier import DigitClassifier, accuracy
    from lit_diffac.toy.digits import load_digits

    parser = argparse.ArgumentParser(prog="lit-diffac toy-eval", description=toy_eval_main.__doc__)
    parser.add_argument("--samples-per-prompt", type=int, default=25)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--unet", default="toy-unet", help="UNet pipeline folder (default: the embedded one)")
    parser.add_argument("--dit", default="toy-dit", help="DiT pipeline folder (default: the embedded one)")
    parser.add_argument("--pairs-unet", default="toy-pairs-unet", help="two-digit UNet pipeline folder")
    parser.add_argument("--pairs-dit", default="toy-pairs-dit", help="two-digit DiT pipeline folder")
    parser.add_argument("--task", choices=["digits", "pairs", "both"], default="both",
                        help="which task's figures (default: both)")
    args = parser.parse_args(argv)
    heldout = load_digits("heldout")
    report = {"classifier_heldout_accuracy": accuracy(DigitClassifier.from_pretrained(DEFAULT_CLASSIFIER),
                                                      heldout.images, heldout.labels),
              "classifier_heldout_images": len(heldout)}
    if args.task in ("digits", "both"):
        for name, cls, path in (("unet", UNetBackbone, args.unet), ("dit", DiTBackbone, args.dit)):
            report[f"{name}_base"] = evaluate_toy_alignment(cls(path), samples_per_prompt=args.samples_per_prompt,
                                                            seed=args.seed)
    if args.task in ("pairs", "both"):
        report.update(judge_pair_accuracy())
        for name, cls, path in (("unet", UNetBackbone, args.pairs_unet), ("dit", DiTBackbone, args.pairs_dit)):
            report[f"pairs_{name}_base"] = evaluate_pair_alignment(
                cls(path), samples_per_prompt=args.samples_per_prompt, seed=args.seed)
    report["cfg_scale"], report["sampler_steps"], report["seed"] = 1.0, 10, args.seed
    print(json.dumps(report, indent=2))
    return 0
