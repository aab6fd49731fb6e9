"""Run on a CUDA machine from the repository root: ``python benchmarks/results/gpu_flux_bf16_diagnosis.py [VARIANT ...]``.

Why does the tiny FLUX pipeline give non-finite actor gradients on CUDA (bf16) but not on the CPU?"""
import json, sys, tempfile, time, traceback
from pathlib import Path
import torch
import lightning as L
from lit_diffac.backbones.flux import FluxBackbone
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules import LatentActorCritic
from lit_diffac.rewards import Brightness
from lit_diffac.samplers import FlowSDESampler
from lit_diffac.tiny_pipelines import save_flux_pipeline

t0 = time.time()
tmp = tempfile.mkdtemp()
folder = save_flux_pipeline(Path(tmp) / "flux")
VARIANTS = {
    "A_default_bf16w_bf16ac_ckpt": dict(weights_dtype="bfloat16", autocast_dtype="bfloat16", gradient_checkpointing=True),
    "B_fp32w_bf16ac_ckpt": dict(weights_dtype="float32", autocast_dtype="bfloat16", gradient_checkpointing=True),
    "C_bf16w_bf16ac_nockpt": dict(weights_dtype="bfloat16", autocast_dtype="bfloat16", gradient_checkpointing=False),
    "D_fp32w_fp32": dict(weights_dtype="float32", autocast_dtype="float32", gradient_checkpointing=False),
    "E_A_math_sdpa": dict(weights_dtype="bfloat16", autocast_dtype="bfloat16", gradient_checkpointing=True, math=True),
    "F_A_anomaly": dict(weights_dtype="bfloat16", autocast_dtype="bfloat16", gradient_checkpointing=True, anomaly=True),
}
only = sys.argv[1:] or list(VARIANTS)
for name in only:
    v = dict(VARIANTS[name]); math_only = v.pop("math", False); anomaly = v.pop("anomaly", False)
    torch.backends.cuda.enable_flash_sdp(not math_only); torch.backends.cuda.enable_mem_efficient_sdp(not math_only)
    torch.backends.cuda.enable_cudnn_sdp(not math_only)
    torch.autograd.set_detect_anomaly(anomaly)
    res = {"variant": name}
    try:
        backbone = FluxBackbone(str(folder), feature_taps=[18, 37, 56], max_sequence_length=32, resolution=32,
                                lora_rank=8, vae_decode_batch=2, **v)
        module = LatentActorCritic(backbone=backbone, rewards=[Brightness()], sampler=FlowSDESampler(num_steps=4, noise_level=0.9),
                                   train_prompts=["a photo of a cat", "a red sign"],
                                   evaluation=HeldOutEvaluation(prompts=["a photo of a dog"], samples_per_prompt=1, diversity=False),
                                   batch_size=4, minibatch_size=8, clip_range=1e-4, seed=0)
        bad = []
        for pname, p in module.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, n=pname: bad.append(n) if not torch.isfinite(g).all() else None)
        trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module)
        m = module.last_metrics
        res.update(skipped=m.get("fault/skipped"), reward=m.get("reward/brightness_mean"), kl=m.get("train/approx_kl"),
                   n_bad=len(bad), bad=bad[:12], policy_loss=m.get("train/policy_loss"))
    except Exception:
        res["error"] = traceback.format_exc()[-6000:]
    res["t"] = round(time.time() - t0, 1)
    print("RESULT", json.dumps(res), flush=True)
