"""Would ``torch.compile`` make the toy loop faster? The toy DiT's forward + backward on one PPO minibatch, eager
against compiled (inductor), and what compiling costs.

    python -m benchmarks.compile_probe [--batch 64] [--repeats 20] [--threads 1]

The minibatch is the main job's (64 (sample, step) pairs of ``recipes/toy/actor_critic_dit.yaml``: the toy DiT's
latents and the toy text encoder's embeddings of real prompts). Eager is timed before and after the compiled model
so that a drifting machine shows; the compile starts from an empty inductor cache (``--warm-cache``: the
machine's own). Writes ``benchmarks/results/compile_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="(sample, step) pairs per minibatch")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse inductor's on-disk cache (default: a fresh one, the compile a first run pays)")
    args = parser.parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_probe_")

    import torch

    from lit_diffac.backbones import DiTBackbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = DiTBackbone("toy-dit", feature_taps=[0, 1, 2, 3])
    denoiser = backbone.denoiser.float().requires_grad_(True)
    embeds = backbone.encode_prompts([f"the digit {i % 10}" for i in range(args.batch)])
    latents = torch.randn(args.batch, *backbone.latent_shape)
    timesteps = torch.rand(args.batch) * 1000

    def step(model) -> None:
        out = model(hidden_states=latents, encoder_hidden_states=embeds.hidden, pooled_projections=embeds.pooled,
                    timestep=timesteps).sample
        out.square().mean().backward()

    def seconds(model) -> float:
        for _ in range(3):  # warm-up
            step(model)
        start = time.perf_counter()
        for _ in range(args.repeats):
            step(model)
        return (time.perf_counter() - start) / args.repeats

    eager_before = seconds(denoiser)
    start = time.perf_counter()
    compiled = torch.compile(denoiser, dynamic=False)
    step(compiled)
    compile_s = time.perf_counter() - start
    compiled_s = seconds(compiled)
    eager_after = seconds(denoiser)
    eager = (eager_before + eager_after) / 2
    result = {"command": "python -m benchmarks.compile_probe " + " ".join(argv if argv is not None else []),
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{args.threads} thread(s))",
              "batch": args.batch, "eager_ms": [1e3 * eager_before, 1e3 * eager_after], "compiled_ms": 1e3 * compiled_s,
              "speedup": eager / compiled_s, "compile_s": compile_s,
              "passes_to_repay_compile": compile_s / max(eager - compiled_s, 1e-9)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_probe.json").write_text(json.dumps(result, indent=2))
    text = (f"`{result['command']}` — {result['machine']}, {time.strftime('%Y-%m-%d')}\n\n"
            "| toy DiT forward + backward, " f"{args.batch} pairs | eager (before / after) | compiled | speedup | "
            "compile time | passes to repay it |\n|---|---|---|---|---|---|\n"
            f"| ms per pass | {result['eager_ms'][0]:.1f} / {result['eager_ms'][1]:.1f} | {result['compiled_ms']:.1f} | "
            f"{result['speedup']:.2f}× | {compile_s:.0f} s | {result['passes_to_repay_compile']:.0f} |\n")
    (args.out / "compile_probe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
