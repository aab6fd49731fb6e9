"""Operators a rollout dispatches per denoising step, against the stock diffusers pipeline on the same denoiser.

    python -m benchmarks.rollout_ops [--steps 10] [--batch 2] [--backbones sd15 sd35m] [--quick] [--out NAME]

Where a GPU's denoiser steps are bound by kernel launches (the H200's small-batch timings in
``results/overhead_scale_gpu.md`` look so), what the rollout adds per step (log-prob maths, the value head) costs
in proportion to the number of operators it dispatches, not to their arithmetic. This benchmark counts them with
a ``TorchDispatchMode`` (every ATen call below autograd, views included) on the CPU, for the SD-scale models of
``benchmarks.sd_scaled`` at their full depth (SD3.5-M's 24 blocks, SD1.5's two layers per level) but tiny widths
(operator counts do not depend on width), set up as the SD recipes set them up (LoRA, value head, replay):

* ``rollout``: ``LatentActorCritic.roll_out`` with the critic (log-probs, values, kept features);
* ``rollout_without_critic``: the same with the critic-free GRPO module (log-probs only);
* ``pipeline``: ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline.__call__`` (``output_type="latent"``).

It also reports the ``aten._local_scalar_dense`` calls (a tensor read back as a Python number: a device → host
sync when the tensor lives on a GPU; here they all read host tensors, so the count only shows where to look).
Writes ``benchmarks/results/NAME.json`` (default ``rollout_ops``) and prints a table. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("rollout", "rollout_without_critic", "pipeline")


class OperatorCount(TorchDispatchMode):
    """Counts every ATen operator dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, steps: int, batch: int, quick: bool) -> dict:
    """Operator counts of the three phases for one backbone (``sd15`` / ``sd35m``)."""
    from benchmarks.sd_scaled import PROMPTS, build_modules, build_sd15, build_sd35m, stock_pipeline_latents

    settings = {"quick": True, "blocks": 2 if quick else 24, "unet_layers": 1 if quick else 2, "dtype": "float32",
                "gradient_checkpointing": False, "steps": steps, "batch": batch, "seed": 0}
    backbone, pipe, _ = (build_sd15 if name == "sd15" else build_sd35m)(settings)
    critic, plain = build_modules(name, backbone, settings)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    embeds = backbone.encode_prompts(prompts)

    def generator():
        return torch.Generator().manual_seed(0)

    phases = {
        "rollout": lambda: critic.roll_out(prompts, generator()),
        "rollout_without_critic": lambda: plain.roll_out(prompts, generator()),
        "pipeline": lambda: stock_pipeline_latents(name, pipe, embeds, steps, generator()),
    }
    out = {}
    for phase in PHASES:
        phases[phase]()  # warm-up: prompt caches, lazily moved tables
        with torch.no_grad(), OperatorCount() as counter:
            phases[phase]()
        total = sum(counter.counts.values())
        out[phase] = {"operators": total, "per_step": total / steps,
                      "local_scalar_dense": counter.counts.get("aten._local_scalar_dense", 0)}
    base = out["pipeline"]["operators"]
    for phase in PHASES[:2]:
        out[phase]["over_pipeline"] = out[phase]["operators"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout_ops", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["sd15", "sd35m"], choices=["sd15", "sd35m"])
    parser.add_argument("--quick", action="store_true", help="shallow models (for the tests; counts mean little)")
    parser.add_argument("--out", default=None, help="NAME (→ benchmarks/results/NAME.json) or a path to a .json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {name: count(name, args.steps, args.batch, args.quick) for name in args.backbones}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    report = {"benchmark": "rollout_ops", "command": "python -m benchmarks.rollout_ops " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "torch": torch.__version__,
              "machine": platform.platform(), "settings": {"steps": args.steps, "batch": args.batch,
                                                          "quick": args.quick},
              "wall_s": time.perf_counter() - start, "backbones": results}
    out = Path(args.out or ("rollout_ops_quick" if args.quick else "rollout_ops"))
    path = out if out.suffix == ".json" else RESULTS / f"{out}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print("| backbone | rollout ops / step | without critic | pipeline | rollout / pipeline | without critic / pipeline |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rollout']['per_step']:.0f} | {r['rollout_without_critic']['per_step']:.0f} | "
              f"{r['pipeline']['per_step']:.0f} | {r['rollout']['over_pipeline']:.3f}× | "
              f"{r['rollout_without_critic']['over_pipeline']:.3f}× |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
