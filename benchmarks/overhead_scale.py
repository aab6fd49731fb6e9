"""Cost of the critic at Stable-Diffusion scale: update with vs without it, rollout vs the stock pipeline.

    python -m benchmarks.overhead_scale [--accelerator cpu|gpu] [--backbones sd35m sd15] [--repeats N]
        [--steps K] [--batch B] [--blocks N] [--quick] [--out NAME]

The toy benchmark (:mod:`benchmarks.overhead`) times 16×16 toy models, where fixed per-call costs dominate.
This one builds **randomly initialised denoisers with the real models' layer shapes**, only shallower:

* ``sd35m``: ``SD3Transformer2DModel`` shaped like SD3.5-Medium (hidden 1,536 = 24 heads × 64, joint attention
  over 333 text tokens = 77 CLIP + 256 T5 at ``joint_attention_dim`` 4,096, pooled 2,048, qk RMS-norm,
  dual attention in the first 13/24 of the blocks, 16 latent channels, 64×64 latents → 1,024 image tokens,
  flow-matching scheduler with shift 3), ``--blocks`` transformer blocks (CPU default 3; SD3.5-M has 24);
  value-head taps at the recipe's blocks 7 / 15 / 23 of 24, scaled to the depth built.
* ``sd15``: ``UNet2DConditionModel`` shaped like SD1.5 (channels 320 / 640 / 1,280 / 1,280, 8 heads,
  cross-attention width 768 over 77 tokens, 4 latent channels, 64×64 latents, DDIM with SD1.5's β schedule),
  ``--unet-layers`` resnet + attention layers per level (CPU default 1; SD1.5 has 2); taps ``down_blocks.1``,
  ``mid_block``, ``up_blocks.1`` as in recipes/sd15.

Both as the SD recipes configure them: LoRA rank 32 (alpha 32) policy on the attention projections, value
head ``ValueHead(dim=256, num_heads=8, hidden=512, patch_size=4 | 2)`` with the critic replay (8 iterations,
2 value-only passes), AdamW (0.9, 0.95), minibatch 16, the recipes' PPO clip,
cfg 1.0.  The text encoders are tiny random CLIP / T5 models whose outputs have the real shapes (the
prompts are encoded once and cached; both sides of each comparison read the same cached embeddings);
there is no VAE (``output_type="latent"`` in the pipeline; the rollout's ``decode`` is then an identity).

Measured, side by side in one process per backbone, after one untimed warm-up of each phase, ``--repeats``
times in alternating order (ABBA, against drift), ``time.perf_counter`` with ``torch.cuda.synchronize``:

* ``update_with_critic``: ``LatentActorCritic.update`` with the critic (``CriticGAE``, value head).
* ``update_without_critic``: the same module class, backbone, rollout, minibatches and optimiser but the
  critic-free ``GroupRelative`` estimator (GRPO): no value head, so no value forward / backward / critic
  optimiser step.  The backbone forward / backward is identical in both (detached value gradients), so the
  ratio isolates what the critic adds to an update.
* ``rollout_with_logprob_value``: ``LatentActorCritic.roll_out`` (``collect_rollout``: stochastic sampler,
  per-step log-probs and values from the same backbone pass).
* ``pipeline``: ``StableDiffusion3Pipeline`` / ``StableDiffusionPipeline.__call__`` with the same denoiser
  (same LoRA-wrapped module), prompt embeddings, seed and number of denoiser calls (counted by a hook and
  checked), ``guidance_scale=1``, ``output_type="latent"``; SD1.5 with a DDIM scheduler (η=1, trailing).

Peak memory of each phase: on CPU the peak RSS during the phase (Linux: ``VmHWM`` reset through
``/proc/self/clear_refs`` before the phase; elsewhere the process's ``ru_maxrss``),
on GPU ``torch.cuda.max_memory_allocated`` (statistics reset before the phase); with the increase over
the phase's start.  Writes ``benchmarks/results/NAME.{json,md,png}`` (NAME: ``overhead_scale``, on GPU
``overhead_scale_gpu``; ``--quick``: ``overhead_scale_quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.sd_scaled import (CRITIC_REPLAY, LORA_RANK, MINIBATCH, PATCH_SIZE, PROMPTS, VALUE_HEAD, build_modules,
                                  build_sd15, build_sd35m, stock_pipeline_latents)

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

RATIO_KEYS = ("update_with_over_without_critic", "rollout_with_logprob_value_over_plain_loop")
TARGETS = {"update_with_over_without_critic": 1.10, "rollout_with_logprob_value_over_plain_loop": 1.05}
PHASES = ("update_with_critic", "update_without_critic", "rollout_with_logprob_value", "pipeline")
BACKBONES = ("sd35m", "sd15")

COMPARISONS = {
    "update_with_over_without_critic":
        "median LatentActorCritic.update time with the critic (CriticGAE + ValueHead, detached value gradients) / "
        "the same module class, backbone, rollout, minibatches and optimiser with the critic-free GroupRelative "
        "(GRPO) estimator: no value head, so no value forward/backward and no critic optimiser step; the "
        "backbone forward/backward is identical in both",
    "rollout_with_logprob_value_over_plain_loop":
        "median LatentActorCritic.roll_out time (collect_rollout: stochastic sampler with per-step log-probs "
        "and value-head values from the same backbone pass) / the stock diffusers pipeline __call__ "
        "(StableDiffusion3Pipeline / StableDiffusionPipeline with DDIM eta=1), same denoiser module (LoRA "
        "included), prompt embeddings, seed and number of denoiser calls, guidance_scale=1, output_type='latent'",
}


# ---------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory of a phase: CUDA ``max_memory_allocated`` or the process's peak RSS (MB)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.resettable = False
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.resettable = self._status("VmHWM") is not None
            except OSError:
                pass
        self.kind = ("cuda_max_memory_allocated" if self.cuda else
                     "rss_phase_peak (VmHWM reset per phase)" if self.resettable else "rss_process_peak (ru_maxrss)")
        self.start_mb = 0.0

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def current_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        rss = self._status("VmRSS")
        return rss if rss is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> float:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        elif self.resettable:  # resets only the peak counter (nothing is freed or faulted in)
            Path("/proc/self/clear_refs").write_text("5")
        self.start_mb = self.current_mb()

    def stop(self) -> dict[str, float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = self._status("VmHWM") if self.resettable else self._maxrss()
        return {"peak_mb": peak, "increase_mb": max(0.0, peak - self.start_mb)}


def summary(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_rel": (max(values) - min(values)) / med if med > 0 else float("nan"), "repeats": values}


def measure(name: str, settings: dict) -> dict:
    """Build one backbone and its pipeline, then time and size the four phases (torch's thread count is
    ``settings["threads"]`` meanwhile)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        return _measure(name, settings)
    finally:
        torch.set_num_threads(threads)


def _measure(name: str, settings: dict) -> dict:
    import torch

    device = torch.device("cuda" if settings["accelerator"] == "gpu" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seed, batch, steps = settings["seed"], settings["batch"], settings["steps"]
    built = time.perf_counter()
    backbone, pipe, shape = (build_sd35m if name == "sd35m" else build_sd15)(settings, seed)
    critic, plain = build_modules(name, backbone, settings)
    for module in (critic, plain):
        module.to(device)
        module.sampler.to(device)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - built

    group = 2 if batch % 2 == 0 else 1
    prompts = [PROMPTS[(i // group) % len(PROMPTS)] for i in range(batch)]
    embeds = backbone.encode_prompts(prompts).to(device)  # cached: both sides read these

    def autocast():  # the backbone's own mixed precision (bf16 weights on GPU), for the pipeline too
        if backbone.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=backbone.autocast_dtype)

    def generator():
        return torch.Generator(device=device).manual_seed(seed)

    calls = [0]
    backbone.denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    # The rollout both updates train on (the critic's values in it; GRPO reads only its shape).
    rollout = critic.roll_out(prompts, generator())
    rollout.rewards = torch.randn(batch, 1, generator=torch.Generator().manual_seed(seed)).to(device)
    optimizers = {"update_with_critic": critic.build_optimizers(), "update_without_critic": plain.build_optimizers()}
    trainable = [p for p in critic.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]

    def restore():  # every update starts from the same weights (untimed)
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0)

    def run_pipeline():
        with autocast():
            return stock_pipeline_latents(name, pipe, embeds, steps, generator())

    phases = {
        "update_with_critic": lambda: critic.update(rollout, *optimizers["update_with_critic"]),
        "update_without_critic": lambda: plain.update(rollout, *optimizers["update_without_critic"]),
        "rollout_with_logprob_value": lambda: critic.roll_out(prompts, generator()),
        "pipeline": run_pipeline,
    }
    probe = PeakMemory(device)
    times = {p: [] for p in PHASES}
    memory = {p: [] for p in PHASES}
    warmup, denoiser_calls, outputs = {}, {}, {}

    def run(phase: str, record: bool) -> None:
        if phase.startswith("update"):
            restore()
        probe.start()
        calls[0] = 0
        sync()
        start = time.perf_counter()
        out = phases[phase]()
        sync()
        elapsed = time.perf_counter() - start
        used = probe.stop()
        denoiser_calls[phase] = calls[0]
        if record:
            times[phase].append(elapsed)
            memory[phase].append(used)
        else:
            warmup[phase] = elapsed
            outputs[phase] = out

    for phase in PHASES:  # warm-up (one-off allocations, Adam state, kernel selection)
        run(phase, record=False)
    problems = [f"{a} ({denoiser_calls[a]}) vs {b} ({denoiser_calls[b]})" for a, b in
                (("rollout_with_logprob_value", "pipeline"), ("update_with_critic", "update_without_critic"))
                if denoiser_calls[a] != denoiser_calls[b]]
    if problems:
        raise RuntimeError("unequal numbers of denoiser calls: " + "; ".join(problems))
    final = tuple(outputs["rollout_with_logprob_value"].latents[:, -1].shape)
    if tuple(outputs["pipeline"].shape) != final:
        raise RuntimeError(f"rollout latents {final} vs pipeline latents {tuple(outputs['pipeline'].shape)}")
    del outputs
    for r in range(settings["repeats"]):
        order = list(PHASES) if r % 2 == 0 else [PHASES[1], PHASES[0], PHASES[3], PHASES[2]]
        for phase in order:
            run(phase, record=True)

    med = {p: statistics.median(times[p]) for p in PHASES}
    ratios = {"update_with_over_without_critic": med["update_with_critic"] / med["update_without_critic"],
              "rollout_with_logprob_value_over_plain_loop": med["rollout_with_logprob_value"] / med["pipeline"]}
    paired = {
        "update_with_over_without_critic": statistics.median(
            a / b for a, b in zip(times["update_with_critic"], times["update_without_critic"])),
        "rollout_with_logprob_value_over_plain_loop": statistics.median(
            a / b for a, b in zip(times["rollout_with_logprob_value"], times["pipeline"])),
    }

    def count(params):
        return sum(p.numel() for p in params)

    return {
        **ratios,
        "meets_target": {k: ratios[k] <= TARGETS[k] for k in RATIO_KEYS},
        "paired_ratio_median": paired,
        "timings_s": {p: {**summary(times[p]), "warmup": warmup[p]} for p in PHASES},
        "peak_memory_mb": {p: {"kind": probe.kind, "peak": max(m["peak_mb"] for m in memory[p]),
                               "increase": max(m["increase_mb"] for m in memory[p])} for p in PHASES},
        "denoiser_calls": denoiser_calls,
        "shape": {**shape, "latents": list(backbone.latent_shape), "final_latents": list(final),
                  "feature_dims": backbone.feature_dims, "pooled_dim": backbone.pooled_dim,
                  "text_hidden": list(embeds.hidden.shape[1:])},
        "parameters": {"denoiser": count(backbone.denoiser.parameters()),
                       "policy_trainable": count(backbone.policy_parameters()),
                       "value_head": count(critic.value_head.parameters())},
        "update_pairs": batch * steps, "update_minibatches": math.ceil(batch * steps / MINIBATCH),
        "build_s": build_s,
    }


# ---------------------------------------------------------------------------------------------- reporting
def machine(settings: dict) -> dict:
    import diffusers
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": settings["threads"],
            "accelerator": settings["accelerator"]}
    if settings["accelerator"] == "gpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"`{result['command']}` — {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, "
             f"{result['machine']['threads']} threads, torch {result['machine']['torch']}"
             + (f", {result['machine']['gpu']}" if "gpu" in result["machine"] else "") + f", {result['date']}", "",
             f"batch {s['batch']}, {s['steps']} denoising steps, {s['repeats']} repeats (median; spread = "
             f"(max − min) / median), dtype {s['dtype']}, gradient checkpointing {s['gradient_checkpointing']}"
             + (" — QUICK (tiny widths: checks the pipeline, numbers mean nothing)" if s["quick"] else ""), "",
             "| backbone | phase | median (s) | spread | peak memory (MB) | increase (MB) |",
             "|---|---|---|---|---|---|"]
    for name in s["backbones"]:
        r = result[name]
        for phase in PHASES:
            t, m = r["timings_s"][phase], r["peak_memory_mb"][phase]
            lines.append(f"| {name} | {phase} | {t['median']:.3f} | {t['spread_rel']:.0%} | {m['peak']:.0f} | "
                         f"{m['increase']:.0f} |")
    lines += ["", "| backbone | update with / without critic (≤ 1.10) | rollout / stock pipeline (≤ 1.05) |",
              "|---|---|---|"]
    for name in s["backbones"]:
        r = result[name]
        lines.append(f"| {name} | **{r[RATIO_KEYS[0]]:.3f}×** | **{r[RATIO_KEYS[1]]:.3f}×** |")
    lines += ["", f"Memory: {result[s['backbones'][0]]['peak_memory_mb'][PHASES[0]]['kind']}."]
    return "\n".join(lines) + "\n"


def write_plot(result: dict, png: Path) -> None:
    """Per backbone: median time of each phase (min–max bars) and its peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["settings"]["backbones"]
    labels = ["update\n+critic", "update\nno critic", "rollout\nlogp+V", "stock\npipeline"]
    colors = ["tab:blue", "tab:cyan", "tab:orange", "tab:gray"]
    fig, axes = plt.subplots(2, len(names), figsize=(4.8 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        r = result[name]
        t = [r["timings_s"][p] for p in PHASES]
        med = [x["median"] for x in t]
        err = [[m - x["min"] for m, x in zip(med, t)], [x["max"] - m for m, x in zip(med, t)]]
        ax = axes[0][col]
        ax.bar(labels, med, yerr=err, capsize=4, color=colors)
        ax.set_title(f"{name}: update {r[RATIO_KEYS[0]]:.2f}×, rollout {r[RATIO_KEYS[1]]:.2f}×", fontsize=10)
        ax.set_ylabel("seconds (median, min–max)")
        ax = axes[1][col]
        bars = ax.bar(labels, [r["peak_memory_mb"][p]["peak"] for p in PHASES], color=colors)
        ax.bar_label(bars, labels=[f"+{r['peak_memory_mb'][p]['increase']:.0f}" for p in PHASES], fontsize=8)
        ax.set_ylabel(("peak CUDA MB" if result["settings"]["accelerator"] == "gpu" else "peak RSS MB")
                      + " (+ over phase start)")
    s = result["settings"]
    fig.suptitle(f"critic overhead at SD scale ({s['accelerator']}, batch {s['batch']}, {s['steps']} steps"
                 + (", QUICK" if s["quick"] else "") + ")", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def output_path(out: str) -> Path:
    """``NAME`` → ``benchmarks/results/NAME.json``; a path (with a separator or ``.json``) is kept."""
    path = Path(out)
    if path.suffix == ".json" or len(path.parts) > 1:
        return path.with_suffix(".json")
    return RESULTS / f"{out}.json"


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--repeats", type=int, help="timed repeats per phase after one warm-up (cpu 3, gpu 5)")
    parser.add_argument("--steps", type=int, help="denoising steps per rollout (cpu 2, gpu 10; quick 2)")
    parser.add_argument("--batch", type=int, help="trajectories per rollout (cpu 1, gpu 8 as the recipes; quick 2)")
    parser.add_argument("--blocks", type=int, help="SD3.5-M-shaped transformer blocks (cpu 3, gpu 24; quick 2)")
    parser.add_argument("--unet-layers", type=int, help="resnet+attention layers per SD1.5 UNet level (cpu 1, gpu 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: min(2, CPUs); quick: 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="frozen weights (weights_dtype; default: float32 on cpu, bfloat16 on gpu as the recipes)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="default: off on cpu, on on gpu (as the recipes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny widths, 2 blocks, 2 steps, 2 repeats (seconds)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                        help="one process per backbone (own peak memory); default: on, off with --quick")
    parser.add_argument("--out", help="NAME (→ benchmarks/results/NAME.json/.md/.png) or a path to a .json")
    parser.add_argument("--measure", choices=BACKBONES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.accelerator == "gpu"
    defaults = ({"repeats": 2, "steps": 2, "batch": 2, "blocks": 2, "unet_layers": 1} if args.quick else
                {"repeats": 5, "steps": 10, "batch": 8, "blocks": 24, "unet_layers": 2} if gpu else
                {"repeats": 3, "steps": 2, "batch": 1, "blocks": 3, "unet_layers": 1})
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items()}
    settings.update(
        accelerator=args.accelerator, backbones=list(dict.fromkeys(args.backbones)), quick=args.quick, seed=args.seed,
        threads=args.threads or (1 if args.quick else min(2, os.cpu_count() or 1)),
        dtype=args.dtype or ("bfloat16" if gpu else "float32"),
        gradient_checkpointing=args.gradient_checkpointing if args.gradient_checkpointing is not None else gpu)
    bad = [f"--{k.replace('_', '-')} must be >= 1" for k in ("repeats", "steps", "batch", "blocks", "unet_layers",
                                                              "threads") if settings[k] < 1]
    if bad:
        parser.error("; ".join(bad))
    isolate = args.isolate if args.isolate is not None else not args.quick
    out = args.out or ("overhead_scale_quick" if args.quick else "overhead_scale_gpu" if gpu else "overhead_scale")
    return args, settings, isolate, out


def child_argv(name: str, settings: dict) -> list[str]:
    argv = ["--measure", name, "--accelerator", settings["accelerator"], "--seed", str(settings["seed"]),
            "--dtype", settings["dtype"], "--threads", str(settings["threads"])]
    for key in ("repeats", "steps", "batch", "blocks", "unet_layers"):
        argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    argv.append("--gradient-checkpointing" if settings["gradient_checkpointing"] else "--no-gradient-checkpointing")
    return argv + (["--quick"] if settings["quick"] else [])


def main(argv: list[str] | None = None) -> int:
    args, settings, isolate, out = parse(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, settings)))
        return 0
    started = time.perf_counter()
    results = {}
    for name in settings["backbones"]:
        if isolate:
            env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]),
                   "MKL_NUM_THREADS": str(settings["threads"])}
            cmd = [sys.executable, "-m", "benchmarks.overhead_scale", *child_argv(name, settings)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"{name} measurement failed:\n{proc.stderr[-4000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            results[name] = measure(name, settings)
        r = results[name]
        print(f"{name}: update with/without critic {r[RATIO_KEYS[0]]:.3f}x, rollout/stock pipeline "
              f"{r[RATIO_KEYS[1]]:.3f}x", file=sys.stderr)
    command = "python -m benchmarks.overhead_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "overhead_scale", "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine(settings), "settings": settings,
              "isolation": "one process per backbone" if isolate else "one process for all backbones",
              "comparisons": COMPARISONS, "targets": TARGETS,
              "value_head": VALUE_HEAD, "value_head_patch_size": PATCH_SIZE, "critic_replay": CRITIC_REPLAY,
              "lora_rank": LORA_RANK, "minibatch_size": MINIBATCH,
              "wall_s": time.perf_counter() - started, **results}
    path = output_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    write_plot(result, path.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {path} (.md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
