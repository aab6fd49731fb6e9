"""How much of x̂0 does DDIM's ``clip_sample`` clamp on the toy UNets, and what that does to the policy's control.

    python -m benchmarks.ddim_clipping [--samples 32] [--seed 0] [--accuracy] [--out NAME]

For each toy UNet (``toy-unet``, ``toy-pairs-unet``; their schedulers clip x̂0 to [-1, 1]) it rolls out
``--samples`` training prompts with the RL sampler (DDIM, η = 1, 10 steps) and reports, per denoising step:

* ``clipped``: the fraction of x̂0's elements outside the clip range before clamping;
* ``dmu_deps_unclamped`` / ``dmu_deps_clamped``: the derivative of the step's mean μ with respect to the policy's
  ε̂ on an element whose x̂0 is inside / outside the range (ε-prediction):
  ``∂μ/∂ε̂ = −√ᾱ_{t'}·√(1−ᾱ_t)/√ᾱ_t + √(1−ᾱ_{t'}−σ_t²)`` unclamped, the second term alone clamped;
* ``sigma``: the step's noise σ_t.

With ``--accuracy`` it also evaluates each base model's held-out accuracy (the recipes' evaluation: 500 / 800
samples, seed 12345) with and without clipping (``DDIMSampler(clip_sample=...)``), about 5 min on 2 CPU cores.
Writes ``benchmarks/results/NAME.json`` (default ``ddim_clipping``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # toy UNet → (training prompts, held-out prompts, samples per held-out prompt)
    "toy-unet": ("toy:train", "toy:heldout", 25),
    "toy-pairs-unet": ("toy-pairs:train", "toy-pairs:heldout", 10),
}


def mean_sensitivity(sampler) -> dict[str, list[float]]:
    """Per step ``k``: ``∂μ/∂ε̂`` on an element whose x̂0 is unclamped / clamped, and σ_k (an ε-model's DDIM step)."""
    alpha = sampler._table("alpha_t", "cpu").double()
    alpha_prev = sampler._table("alpha_prev", "cpu").double()
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    sigma2 = (sampler.eta ** 2) * variance.clamp(min=0)
    direction = (1 - alpha_prev - sigma2).clamp(min=0).sqrt()
    through_x0 = -alpha_prev.sqrt() * (1 - alpha).sqrt() / alpha.sqrt()
    return {"dmu_deps_unclamped": (through_x0 + direction).tolist(), "dmu_deps_clamped": direction.tolist(),
            "sigma": sigma2.sqrt().tolist()}


def clipped_fractions(backbone, sampler, prompts: list[str], seed: int) -> list[float]:
    """The fraction of x̂0's elements outside ``[-clip_sample_range, clip_sample_range]`` at each step of one
    rollout of ``prompts`` (before clamping)."""
    from lit_diffac.rollout import collect_rollout
    from lit_diffac.samplers import ddim

    fractions: list[float] = []
    original = ddim.ddim_step_with_logprob

    def recording(model_output, sample, alpha_prod_t, alpha_prod_t_prev, **kwargs):
        # the step's own x̂0 (any prediction type), from the same step without clipping; scoring a given
        # action draws no noise, so the rollout's random stream is untouched
        x0 = original(model_output, sample, alpha_prod_t, alpha_prod_t_prev,
                      **{**kwargs, "clip_sample": False, "prev_sample": sample, "noise": None,
                         "generator": None}).pred_original_sample
        fractions.append(float((x0.abs() > sampler.clip_sample_range).float().mean()))
        return original(model_output, sample, alpha_prod_t, alpha_prod_t_prev, **kwargs)

    ddim.ddim_step_with_logprob = recording
    try:
        collect_rollout(backbone, sampler, prompts, generator=torch.Generator().manual_seed(seed))
    finally:
        ddim.ddim_step_with_logprob = original
    return fractions


def base_accuracy(backbone, heldout: str, samples_per_prompt: int, clip: bool) -> dict[str, float]:
    """The recipes' held-out evaluation of the base model with (``clip``) or without clipping."""
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.rewards import DigitAlignment, IndependentDigitJudge, PairAlignment
    from lit_diffac.samplers import DDIMSampler

    sampler = DDIMSampler(num_steps=10, eta=1.0, clip_sample=clip)
    sampler.setup(backbone.scheduler)
    pairs = heldout.startswith("toy-pairs")
    evaluation = HeldOutEvaluation(prompts=heldout, samples_per_prompt=samples_per_prompt, diversity=False,
                                   rewards=[] if pairs else [IndependentDigitJudge()])
    metrics = evaluation.measure(backbone, sampler, [PairAlignment() if pairs else DigitAlignment()])
    return {k.removeprefix("eval/"): round(v, 4) for k, v in metrics.items() if k.endswith("accuracy")}


def measure(name: str, samples: int, seed: int, accuracy: bool) -> dict:
    from lit_diffac.backbones import UNetBackbone
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.samplers import DDIMSampler

    train, heldout, per_prompt = MODELS[name]
    backbone = UNetBackbone(pretrained=name, feature_taps=["mid_block"])
    sampler = DDIMSampler(num_steps=10, eta=1.0)  # the recipes' RL sampler: the scheduler's clip_sample
    sampler.setup(backbone.scheduler)
    result = {"scheduler_clip_sample": sampler.clip_sample, "clip_sample_range": sampler.clip_sample_range,
              "clipped": clipped_fractions(backbone, sampler, load_prompts(train)[:samples], seed),
              **mean_sensitivity(sampler)}
    if accuracy:
        result["base_accuracy"] = {"with_clipping": base_accuracy(backbone, heldout, per_prompt, True),
                                   "without_clipping": base_accuracy(backbone, heldout, per_prompt, False)}
    return result


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` ({result['date']})", ""]
    for name, r in result["models"].items():
        lines += [f"**{name}** (scheduler `clip_sample: {str(r['scheduler_clip_sample']).lower()}`)", "",
                  "| step | x̂0 clipped | ∂μ/∂ε̂ unclamped | ∂μ/∂ε̂ clamped | σ |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {c:.3f} | {u:.3f} | {d:.3f} | {s:.3f} |" for k, (c, u, d, s) in enumerate(
            zip(r["clipped"], r["dmu_deps_unclamped"], r["dmu_deps_clamped"], r["sigma"]))]
        if "base_accuracy" in r:
            lines += ["", f"base model held-out accuracy with clipping {r['base_accuracy']['with_clipping']}, "
                          f"without {r['base_accuracy']['without_clipping']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=32, help="rollouts of training prompts (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the rollouts")
    parser.add_argument("--accuracy", action="store_true", help="also the base models' held-out accuracy with and "
                        "without clipping (about 5 min)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="ddim_clipping", help="NAME → benchmarks/results/NAME.{json,md}")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.ddim_clipping " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "ddim_clipping", "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "samples": args.samples, "seed": args.seed,
              "models": {name: measure(name, args.samples, args.seed, args.accuracy) for name in args.models}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {RESULTS / args.out}.json (.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
