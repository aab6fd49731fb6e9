"""GPU smoke test: the actor-critic on tiny random SD1.5-, SDXL-, SD3- and FLUX.1-format pipelines, LoRA + bf16 +
checkpointing.

No weights are needed: the pipeline folders are built in a temporary directory (``lit_diffac.tiny_pipelines``) and
loaded back through the same code path as real SD1.5 / SDXL / SD3.5 / FLUX.1 weights.  For each family it runs two actor-critic
iterations with a LoRA policy, bf16 frozen weights + bf16 autocast and gradient checkpointing, then the same with
classifier-free guidance (negative prompt) and a separate critic adapter, and prints one JSON line per run: seconds
per iteration, ``torch.cuda.max_memory_allocated``, the on-policy ratio deviation and the rewards.  Exits 1 if any
run fails, skips an update or produces non-finite numbers::

    python -m benchmarks.gpu_smoke                 # CUDA (the default device when there is one)
    python -m benchmarks.gpu_smoke --device cpu    # anywhere, slowly
    python -m benchmarks.gpu_smoke --sample-size 32 --steps 10 --batch-size 8   # a heavier timing

The reward is image brightness (no weights); the numbers time the library's machinery on tiny models, not SD.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

RUNS = {
    "lora_bf16_ckpt": {},
    "lora_bf16_ckpt_cfg_critic_lora": {"cfg_scale": 2.0, "negative_prompt": "blurry", "critic_lora_rank": 4},
}


def run_once(family: str, folder: Path, device: str, variant: dict, args: argparse.Namespace) -> dict:
    """Two actor-critic iterations on one tiny pipeline; returns the measurements."""
    import lightning as L

    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.backbones.flux import FluxBackbone
    from lit_diffac.backbones.sdxl import SDXLBackbone
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards import Brightness
    from lit_diffac.samplers import DDIMSampler, FlowSDESampler

    critic_rank = variant.get("critic_lora_rank", 0)
    common = dict(lora_rank=8, weights_dtype=args.weights_dtype, autocast_dtype="bfloat16",
                  gradient_checkpointing=True, vae_decode_batch=2, critic_lora_rank=critic_rank,
                  cfg_scale=variant.get("cfg_scale", 1.0), negative_prompt=variant.get("negative_prompt", ""))
    if family == "sd15":
        backbone = UNetBackbone(str(folder), feature_taps=["down_blocks.1", "mid_block", "up_blocks.1"], **common)
        sampler = DDIMSampler(num_steps=args.steps, eta=1.0)
    elif family == "sdxl":  # SDXL's layout: two text encoders, added time/text conditioning, taps on a 3-level UNet
        backbone = SDXLBackbone(str(folder), feature_taps=["down_blocks.2", "mid_block", "up_blocks.0"], **common)
        sampler = DDIMSampler(num_steps=args.steps, eta=1.0)
    elif family == "flux":  # FLUX.1-dev layout: packed latents, guidance embedding 3.5, FluxPipeline's schedule
        backbone = FluxBackbone(str(folder), feature_taps=[18, 37, 56], max_sequence_length=32,
                                resolution=2 * args.sample_size, **common)
        sampler = FlowSDESampler(num_steps=args.steps, noise_level=0.9)
    else:
        backbone = DiTBackbone(str(folder), feature_taps=[7, 15, 23], max_sequence_length=32, **common)
        sampler = FlowSDESampler(num_steps=args.steps, noise_level=0.7)
    module = LatentActorCritic(
        backbone=backbone, rewards=[Brightness()], sampler=sampler, train_prompts=["a photo of a cat", "a red sign"],
        evaluation=HeldOutEvaluation(prompts=["a photo of a dog"], samples_per_prompt=1, diversity=False),
        batch_size=args.batch_size, minibatch_size=args.batch_size * 2, clip_range=1e-4,
        value_gradient="critic_lora" if critic_rank else "detached",
        seed=0)
    times, metrics = [], []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            times.append(pl_module.last_metrics["perf/iteration_time"])
            metrics.append(pl_module.last_metrics)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    strategy = "auto"
    if args.strategy == "fsdp":  # one GPU: hooks, LoRA and two optimisers under FSDP (the module shards itself)
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=2, logger=False, strategy=strategy,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Probe()])
    start = time.perf_counter()
    trainer.fit(module)
    last = metrics[-1]
    out = {
        "family": family, "device": torch.cuda.get_device_name() if cuda else "cpu", "strategy": args.strategy,
        "weights_dtype": args.weights_dtype,
        "iterations": len(times), "seconds_per_iteration": times, "fit_seconds": time.perf_counter() - start,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "onpolicy_max_abs_ratio_dev": last.get("train/onpolicy_max_abs_ratio_dev"),
        "reward_mean": last.get("reward/brightness_mean"), "approx_kl": last.get("train/approx_kl"),
        "policy_params": sum(p.numel() for p in backbone.policy_parameters()),
        "critic_adapter_params": sum(p.numel() for p in backbone.critic_parameters()),
    }
    skipped = sum(m.get("fault/skipped", 0.0) for m in metrics)
    if skipped:  # the fault guard kept the run alive, but an update that never happens is a failed smoke test
        raise RuntimeError(f"{skipped:.0f} of {len(metrics)} updates skipped (non-finite numbers): {out}")
    finite = [out["reward_mean"], out["approx_kl"], *times]
    if len(times) != 2 or not all(v is not None and math.isfinite(v) for v in finite):
        raise RuntimeError(f"bad measurements: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when available) or cpu")
    parser.add_argument("--families", nargs="+", default=["sd15", "sd3", "sdxl", "flux"],
                        choices=["sd15", "sd3", "sdxl", "flux"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--sample-size", type=int, default=16, help="latent side of the tiny models")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per trajectory")
    parser.add_argument("--batch-size", type=int, default=4, help="trajectories per iteration")
    parser.add_argument("--weights-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="frozen weights' dtype (autocast is bf16 either way)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "fsdp"],
                        help="Lightning strategy (fsdp: CUDA only)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu", file=sys.stderr)
        return 2

    from lit_diffac.tiny_pipelines import save_flux_pipeline, save_sd3_pipeline, save_sd15_pipeline, save_sdxl_pipeline

    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
                      "bf16_supported": torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None}))
    results, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"sd15": lambda: save_sd15_pipeline(Path(tmp) / "sd15", sample_size=args.sample_size),
                    "sd3": lambda: save_sd3_pipeline(Path(tmp) / "sd3", sample_size=args.sample_size),
                    "sdxl": lambda: save_sdxl_pipeline(Path(tmp) / "sdxl", sample_size=args.sample_size),
                    "flux": lambda: save_flux_pipeline(Path(tmp) / "flux")}
        folders = {family: builders[family]() for family in args.families}  # only the families asked for
        for family in args.families:
            for name in args.runs:
                try:
                    result = {"run": name, **run_once(family, folders[family], args.device, RUNS[name], args)}
                except Exception:  # noqa: BLE001 - report every failure, then exit non-zero
                    failures += 1
                    result = {"run": name, "family": family, "error": traceback.format_exc(limit=8)}
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"gpu_smoke: {len(results) - failures}/{len(results)} runs passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
