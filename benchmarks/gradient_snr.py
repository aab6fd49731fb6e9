"""Which denoising steps carry the policy gradient's signal, and which only its noise?

    python -m benchmarks.gradient_snr [--models toy-pairs-unet toy-pairs-dit toy-unet] [--batches 12]
                                      [--prompts 8] [--group 4] [--seed 0] [--out NAME]

For each toy model it draws ``--batches`` independent training batches the way GRPO does (``--prompts`` training
prompts × ``--group`` samples each, the recipes' sampler: DDIM η = 1 on a UNet, the flow SDE with a = 0.7 on a DiT,
10 steps), scores them with the task's dense reward, standardises the rewards within each prompt's group (GRPO's
``group_relative_advantages``), and computes, for
every denoising step ``k`` and batch ``b``, the ascent direction of that step's surrogate alone,
``g_{b,k} = ∇_θ mean_i A_i · log π_θ(x_{k+1,i} | x_{k,i})`` (the full policy's parameters).  Over the batches:

* ``norm``: the mean of ``‖g_{b,k}‖`` (how much step ``k`` weighs in one batch's gradient);
* ``noise2 = Σ_b ‖g_{b,k} − ḡ_k‖² / (B − 1)``: the per-batch variance, summed over parameters;
* ``signal2 = ‖ḡ_k‖² − noise2 / B``: an unbiased estimate of ``‖E g_k‖²`` (negative when below the noise);
* ``snr = signal2 / noise2``: per batch, so one batch's gradient points along its expectation when ``snr ≫ 1``;

and the same for sums over step windows (all, first 3 / 5, last 5 / 2).  With 12 batches, ``|snr|`` below about
0.1 is not distinguishable from 0.  About 4 min on 2 CPU cores for the three default models.  Writes
``benchmarks/results/NAME.json`` and ``.md`` (default ``gradient_snr``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # toy model → (backbone family, training prompts, dense reward)
    "toy-unet": ("unet", "toy:train", "DigitAlignment"),
    "toy-dit": ("dit", "toy:train", "DigitAlignment"),
    "toy-pairs-unet": ("unet", "toy-pairs:train", "PairAlignment"),
    "toy-pairs-dit": ("dit", "toy-pairs:train", "PairAlignment"),
}
WINDOWS = {"all": (0, None), "first 3": (0, 3), "first 5": (0, 5), "last 5": (-5, None), "last 2": (-2, None)}


def signal_noise(gradients: torch.Tensor) -> dict[str, float]:
    """Signal and noise of ``B`` per-batch gradient estimates ``gradients [B, P]`` (``B >= 2``).

    ``noise2 = Σ_b ‖g_b − ḡ‖² / (B − 1)`` (the per-batch variance, summed over the ``P`` coordinates) and
    ``signal2 = ‖ḡ‖² − noise2 / B`` (unbiased for ``‖E g‖²``, since ``E‖ḡ‖² = ‖E g‖² + noise2 / B``);
    ``snr = signal2 / noise2``.
    """
    batches = gradients.shape[0]
    if batches < 2:
        raise ValueError(f"signal and noise need at least 2 batches, got {batches}")
    g = gradients.double()
    mean = g.mean(0)
    noise2 = ((g - mean) ** 2).sum() / (batches - 1)
    signal2 = (mean ** 2).sum() - noise2 / batches
    return {"signal2": signal2.item(), "noise2": noise2.item(), "snr": (signal2 / noise2).item()}


def step_gradients(model: str, batches: int, prompts_per_batch: int, group: int, seed: int
                   ) -> tuple[torch.Tensor, list[float]]:
    """``[batches, K, P]`` per-step ascent directions of GRPO's surrogate, and each batch's mean reward."""
    from lit_diffac import rewards as reward_classes
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.estimators import group_relative_advantages
    from lit_diffac.evaluation import default_sampler
    from lit_diffac.rollout import collect_rollout, denoise

    family, prompt_source, reward_name = MODELS[model]
    backbone = (UNetBackbone if family == "unet" else DiTBackbone)(pretrained=model)
    sampler = default_sampler(backbone)  # the recipes' RL sampler: DDIM η = 1 / flow SDE a = 0.7, 10 steps
    reward = getattr(reward_classes, reward_name)()
    prompts = load_prompts(prompt_source)
    params = [p for p in backbone.policy_parameters()]
    out = torch.zeros(batches, sampler.num_steps, sum(p.numel() for p in params))
    means = []
    for b in range(batches):
        pick = torch.randint(len(prompts), (prompts_per_batch,), generator=torch.Generator().manual_seed(seed + b))
        batch = [prompts[i] for i in pick.tolist() for _ in range(group)]
        with torch.no_grad():
            rollout = collect_rollout(backbone, sampler, batch,
                                      generator=torch.Generator().manual_seed(seed + 10_000 + b))
            r = reward(rollout.images, batch).float()
        means.append(r.mean().item())
        advantages = group_relative_advantages(r.reshape(-1, 1), batch)[:, 0]  # the GRPO module's own
        for k in range(sampler.num_steps):
            t = sampler.timestep_for(k).expand(len(batch))
            prediction, _ = denoise(backbone, rollout.latents[:, k], t, rollout.embeds)
            log_prob = sampler.step(prediction, k, rollout.latents[:, k], prev_sample=rollout.latents[:, k + 1]).log_prob
            grads = torch.autograd.grad((advantages * log_prob).mean(), params, allow_unused=True)
            out[b, k] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for p, g in zip(params, grads)])
    return out, means


def measure(model: str, batches: int, prompts_per_batch: int, group: int, seed: int) -> dict:
    start = time.perf_counter()
    gradients, means = step_gradients(model, batches, prompts_per_batch, group, seed)
    steps = [{"step": k, "norm": gradients[:, k].norm(dim=1).mean().item(), **signal_noise(gradients[:, k])}
             for k in range(gradients.shape[1])]
    windows = {name: {**signal_noise(gradients[:, slice(*bounds)].sum(1)),
                      "norm": gradients[:, slice(*bounds)].sum(1).norm(dim=1).mean().item()}
               for name, bounds in WINDOWS.items()}
    norms = [s["norm"] for s in steps]
    return {"reward_mean": sum(means) / len(means), "parameters": gradients.shape[2], "steps": steps,
            "windows": windows, "largest_step_share": max(n ** 2 for n in norms) / sum(n ** 2 for n in norms),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` — {result['machine']}", ""]
    for model, m in result["models"].items():
        lines += [f"### {model}", "",
                  f"{result['batches']} batches × {result['prompts']} prompts × {result['group']} samples, mean reward "
                  f"{m['reward_mean']:.3f}, {m['parameters']:,} policy parameters; the largest step holds "
                  f"{m['largest_step_share']:.0%} of the summed squared per-step norms.", "",
                  "| step | norm | signal² | noise² | snr |", "|---|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['norm']:.4g} | {s['signal2']:.3g} | {s['noise2']:.3g} | {s['snr']:+.3f} |"
                  for s in m["steps"]]
        lines += [f"| sum: {name} | {w['norm']:.4g} | {w['signal2']:.3g} | {w['noise2']:.3g} | {w['snr']:+.3f} |"
                  for name, w in m["windows"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["toy-pairs-unet", "toy-pairs-dit", "toy-unet"])
    parser.add_argument("--batches", type=int, default=12, help="independent batches (>= 2)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch (the recipes: 8)")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's group; >= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="gradient_snr", help="NAME → benchmarks/results/NAME.json/.md")
    args = parser.parse_args(argv)
    if args.batches < 2 or args.group < 2:
        parser.error("--batches and --group must be >= 2")
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python -m benchmarks.gradient_snr", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {args.threads} thread(s), torch {torch.__version__}, "
                         f"{time.strftime('%Y-%m-%d')}", "batches": args.batches, "prompts": args.prompts,
              "group": args.group, "seed": args.seed, "models": {}}
    for model in args.models:
        result["models"][model] = measure(model, args.batches, args.prompts, args.group, args.seed)
        m = result["models"][model]
        print(f"{model}: reward {m['reward_mean']:.3f}, per-step norms "
              + " ".join(f"{s['norm']:.3g}" for s in m["steps"]) + f" ({m['seconds']} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(f"wrote {RESULTS / args.out}.json (.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
