"""Cost of the critic: update time with vs without it, rollout time vs a plain denoising loop, peak memory.

    python -m benchmarks.overhead [--iterations 10] [--threads 2] [--quick]

Each configuration runs in its own process (so peak memory is its own) on the toy DiT recipe's settings:

* ``critic``: :class:`~lit_diffac.modules.LatentActorCritic` (critic GAE; one backbone pass gives log-prob and value);
* ``no critic``: the same module and settings with the GRPO estimator (no value head, same minibatches).

Reported per configuration: mean update time and rollout time per iteration, and the process's peak RSS
(``torch.cuda.max_memory_allocated`` when on a GPU).  The rollout is also compared with a plain loop of the
same 10 steps that calls the transformer and ``diffusers.FlowMatchEulerDiscreteScheduler.step`` (what a
diffusers pipeline's denoising loop does, without log-probs or values).  Writes
``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(config: str, iterations: int, batch_size: int, accelerator: str = "cpu") -> dict:
    import lightning as L
    import torch

    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.estimators import GroupRelative
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards import DigitAlignment

    L.seed_everything(0)
    backbone = DiTBackbone("toy-dit", feature_taps=[0, 1, 2, 3])
    extra = {"estimator": GroupRelative(), "samples_per_prompt": 2} if config == "no critic" else {}
    evaluation = HeldOutEvaluation(prompts=["the digit 1"], samples_per_prompt=1, diversity=False)  # untimed
    module = LatentActorCritic(backbone=backbone, rewards=[DigitAlignment()], batch_size=batch_size, minibatch_size=64,
                               clip_range=1e-3, evaluation=evaluation, **extra)
    times = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            times.append({k: pl_module.last_metrics[k] for k in ("perf/update_time", "perf/rollout_time")})

    L.Trainer(max_epochs=iterations, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator=accelerator, devices=1, callbacks=[Record()]).fit(module)
    kept = times[1:] or times  # the first iteration includes one-off warm-up
    out = {k: sum(t[k] for t in kept) / len(kept) for k in kept[0]}
    # A plain diffusers denoising loop with the same steps (no log-probs, no values).
    # On the same device as the fit (Lightning moves the module back to the CPU at teardown).
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    backbone.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    prompts = module.sample_prompts(torch.Generator().manual_seed(0))
    embeds = backbone.encode_prompts(prompts)
    plain = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            scheduler.set_timesteps(module.sampler.num_steps, device=device)
            x = torch.randn(len(prompts), *backbone.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
            for t in scheduler.timesteps:
                v = backbone.denoiser(hidden_states=x, encoder_hidden_states=embeds.hidden,
                                      pooled_projections=embeds.pooled, timestep=t.expand(len(prompts))).sample
                x = scheduler.step(v, t, x).prev_sample
            backbone.decode(x)
        sync()
        plain.append(time.perf_counter() - start)
    out["plain_loop_time"] = sorted(plain)[1]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["cuda_max_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def write_plot(results: dict[str, dict], csv_path: Path, png_path: Path) -> None:
    """CSV and bar chart of one or more ``overhead*.json`` results (``{label: json}``): time per part, memory."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("perf/rollout_time", "rollout"), ("perf/update_time", "update")]
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["machine", "configuration", "rollout_s", "update_s", "plain_loop_s", "peak_rss_mb",
                         "cuda_max_memory_mb"])
        for label, result in results.items():
            for config, r in result["rows"].items():
                writer.writerow([label, config, r["perf/rollout_time"], r["perf/update_time"], r["plain_loop_time"],
                                 r["peak_rss_mb"], r.get("cuda_max_memory_mb", "")])
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items()):
        rows = result["rows"]
        names = [*rows, "plain loop"]
        bottom = [0.0] * len(names)
        for key, part in parts:
            heights = [rows[c][key] for c in rows] + [rows["critic"]["plain_loop_time"] if key.endswith("rollout_time")
                                                      else 0.0]
            ax.bar(names, heights, bottom=bottom, label=part)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(label)
        ax.set_ylabel("seconds per iteration (batch 32)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"],
                        help="gpu: time on CUDA and report torch.cuda.max_memory_allocated (results: overhead_gpu.*)")
    parser.add_argument("--quick", action="store_true", help="2 iterations of 4 samples (checks the pipeline)")
    parser.add_argument("--plot-from", nargs="+", type=Path, metavar="JSON",
                        help="no measurement: write overhead.csv / overhead.png from earlier results (label=path ok)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot_from:
        results = {}
        for item in args.plot_from:
            label, _, path = str(item).rpartition("=")
            results[label or Path(path).stem] = json.loads(Path(path).read_text())
        write_plot(results, RESULTS / "overhead.csv", RESULTS / "overhead.png")
        print(f"wrote {RESULTS / 'overhead.csv'} and {RESULTS / 'overhead.png'}")
        return 0
    iterations, batch = (2, 4) if args.quick else (args.iterations, args.batch_size)
    if args.measure:
        print(json.dumps(measure(args.measure, iterations, batch, args.accelerator)))
        return 0
    rows = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for config in ("critic", "no critic"):
        cmd = [sys.executable, "-m", "benchmarks.overhead", "--measure", config, "--iterations", str(iterations),
               "--batch-size", str(batch), "--accelerator", args.accelerator]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
    c, n = rows["critic"], rows["no critic"]
    ratios = {"update_with_over_without_critic": c["perf/update_time"] / n["perf/update_time"],
              "rollout_with_logprob_value_over_plain_loop": c["perf/rollout_time"] / c["plain_loop_time"]}
    command = "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, "
             f"OMP_NUM_THREADS={args.threads}, batch {batch}, {iterations} iterations (first one dropped)", "",
             "| configuration | update time (s) | rollout time (s) | plain loop (s) | peak RSS (MB) | peak CUDA (MB) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cuda = f"{r['cuda_max_memory_mb']:.0f}" if "cuda_max_memory_mb" in r else "—"
        lines.append(f"| {name} | {r['perf/update_time']:.3f} | {r['perf/rollout_time']:.3f} | "
                     f"{r['plain_loop_time']:.3f} | {r['peak_rss_mb']:.0f} | {cuda} |")
    lines += ["", f"update with / without critic: **{ratios['update_with_over_without_critic']:.2f}×**; "
              f"rollout with log-probs + values / plain loop: "
              f"**{ratios['rollout_with_logprob_value_over_plain_loop']:.2f}×**"]
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "overhead_gpu" if args.accelerator == "gpu" else "overhead"
        if args.accelerator == "gpu":
            import torch

            lines[0] += f", {torch.cuda.get_device_name(0)}"
        (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows, **ratios}, indent=2))
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
