"""Checkpoint size: trainable-only checkpoints against the module's whole state dict (issue 19).

    python -m benchmarks.checkpoint_size [--iterations N] [--only toy|sd35m] [--out NAME] [--quick]

A checkpoint now keeps only what training changes (:mod:`lit_diffac.frozen_weights`): the trainable backbone
parameters (LoRA adapters, or the whole denoiser of a full fine-tune), the value head, the optimiser states, the
lr schedulers and the training state (:mod:`lit_diffac.resume`: history, RNG, the critic replay when
``CriticReplay(checkpoint=True)``), plus a SHA-256 of the frozen base weights.  Before, it held the module's
whole ``state_dict``.  Two parts:

* ``toy`` (**measured**): the toy recipes run through the CLI (``lit_diffac.cli.main(["run", recipe, ...])`` in
  a temporary folder) for ``--iterations`` iterations (default 2) with a cheap evaluation (1 sample per prompt,
  before and after training only), in four variants: ``recipes/toy/actor_critic_dit.yaml`` as it is (full
  fine-tune, critic replay checkpointed), the same with ``critic_replay.init_args.checkpoint=false``, the same
  with a LoRA policy (``backbone.init_args.lora_rank=8``), and ``recipes/toy/actor_critic_unet.yaml`` (full,
  no replay).  For each: the size of ``last.ckpt`` on disk and its sections from ``torch.load(...,
  weights_only=True)`` (tensor bytes of ``state_dict``, ``optimizer_states``, the critic replay
  ``ckpt["lit_diffac"]["critic_replay"]``, other tensors — RNG states —, and the rest of the file: pickle,
  zip records, non-tensor entries).  **Before**: the module is built from the run's ``config.yaml`` and the
  checkpoint (:func:`lit_diffac.sampling.load_module_and_checkpoint`, frozen weights reloaded from the
  pipeline); its whole ``module.state_dict()`` (tensor bytes) replaces the checkpoint's ``state_dict``, and
  that checkpoint is written again and its file size measured (checksums recomputed, the frozen-weights
  record dropped: the format before the change).  The critic replay holds ``min(iterations run, 32)``
  iterations; its size once full (the recipe's ``iterations: 32``) is **computed** as bytes per iteration x 32.
* ``sd35m`` (**computed**, no weights needed): ``recipes/sd35/pickscore.yaml`` — SD3.5-Medium with LoRA
  rank 32 and PickScore.  Every component is built **on the meta device from its config** (no memory, no
  download) and its tensors counted exactly: ``SD3Transformer2DModel`` with SD3.5-Medium's
  ``transformer/config.json`` values, CLIP-L and OpenCLIP bigG text encoders (``CLIPTextModelWithProjection``),
  the T5-XXL encoder (``T5EncoderModel``, t5-v1_1-xxl), the SD3 VAE (``AutoencoderKL``, 16 latent channels)
  and PickScore's CLIP ViT-H/14 (``CLIPModel``).  The backbone is the real
  :class:`~lit_diffac.backbones.DiTBackbone` built from those meta components with the recipe's backbone
  options (its ``weights_dtype`` cast, ``apply_lora`` on ``DEFAULT_TARGETS``, the taps); the value head is the
  recipe's :class:`~lit_diffac.value_heads.ValueHead` (built for real, it is small); what a checkpoint keeps
  is decided by :func:`lit_diffac.frozen_weights.frozen_keys`, as in training.  AdamW state: ``exp_avg`` and
  ``exp_avg_sq`` in float32 per parameter plus a float32 ``step`` per tensor.  After = trainable state dict +
  optimiser state; before = the whole state dict (frozen weights in the recipe's bf16) + optimiser state;
  the other sections (RNG states, history, schedulers, hyper-parameters: 0.2-0.4 MB in the toy checkpoints,
  pickle records included) are left out.  The trainable part is also serialised for real (zeros of the same
  shapes, one real AdamW step) with ``torch.save`` and that file measured.

Writes ``benchmarks/results/NAME.{json,md}`` (NAME: ``checkpoint_size``; ``--quick``: ``checkpoint_size_quick``:
one toy variant at batch 2 for 1 iteration and a tiny SD3 configuration, for the tests).  MB = 10^6 bytes,
GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.sd3_model import SD35_RECIPE, SD35M, TINY_SD3, build_sd3_module

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

DIT_RECIPE = "recipes/toy/actor_critic_dit.yaml"
UNET_RECIPE = "recipes/toy/actor_critic_unet.yaml"

#: cheap evaluation: one sample per held-out prompt, before and after training only.
CHEAP = ["--model.init_args.evaluation.init_args.samples_per_prompt=1",
         "--model.init_args.evaluation.init_args.every_n_iterations=0",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: ``--quick``: what the tests run.
QUICK = ["--model.init_args.batch_size=2"]

TOY_VARIANTS = [
    {"name": "toy DiT, full fine-tune (recipe as is: critic replay checkpointed)", "recipe": DIT_RECIPE,
     "overrides": []},
    {"name": "toy DiT, full fine-tune, critic replay not checkpointed", "recipe": DIT_RECIPE,
     "overrides": ["--model.init_args.critic_replay.init_args.checkpoint=false"]},
    {"name": "toy DiT, LoRA rank 8 (critic replay checkpointed)", "recipe": DIT_RECIPE,
     "overrides": ["--model.init_args.backbone.init_args.lora_rank=8"]},
    {"name": "toy UNet, full fine-tune (no critic replay)", "recipe": UNET_RECIPE, "overrides": []},
]

DOCS_BEFORE_ESTIMATE_GB = 17.0  # docs/from_toy_to_sd.md, lit_diffac/frozen_weights.py: "~17 GB for SD3.5-M with T5"


# ---------------------------------------------------------------------------------------------- counting
def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict / list / tuple, each storage counted once (as ``torch.save``
    writes it); meta tensors (no storage) count their own ``nbytes``, each tensor object once."""
    import torch

    seen: set = set()
    total = 0

    def walk(o) -> None:
        nonlocal total
        if torch.is_tensor(o):
            if o.is_meta:
                key, size = ("meta", id(o)), o.nbytes
            else:
                storage = o.untyped_storage()
                key, size = ("storage", storage.data_ptr(), storage.nbytes()), storage.nbytes()
            if key not in seen or size == 0:
                seen.add(key)
                total += size
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return total


def mb(n: float) -> float:
    return round(n / 1e6, 3)


def gb(n: float) -> float:
    return round(n / 1e9, 3)


def checkpoint_sections(ckpt: dict, file_bytes: int) -> dict:
    """Tensor bytes of a loaded checkpoint's sections; ``rest``: the file's other bytes (pickle, zip records,
    non-tensor entries such as hyper-parameters and history)."""
    state = tensor_bytes(ckpt.get("state_dict", {}))
    optim = tensor_bytes(ckpt.get("optimizer_states", []))
    replay = tensor_bytes((ckpt.get("lit_diffac") or {}).get("critic_replay"))
    every = tensor_bytes(ckpt)
    return {"state_dict": state, "optimizer_states": optim, "critic_replay": replay,
            "other_tensors": every - state - optim - replay, "rest_of_file": file_bytes - every}


def adamw_state_bytes(params) -> int:
    """AdamW's state for ``params``: ``exp_avg`` and ``exp_avg_sq`` of each parameter's dtype and shape, and a
    float32 scalar ``step`` per tensor (torch's default, non-capturable, non-fused AdamW)."""
    return sum(2 * p.nbytes + 4 for p in params)


# ---------------------------------------------------------------------------------------------- toy (measured)
@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_recipe(recipe: str, iterations: int, overrides: list[str], folder: Path) -> Path:
    """Run ``recipe`` through the CLI in ``folder`` for ``iterations`` iterations; the path of its ``last.ckpt``."""
    from lit_diffac.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    with _cwd(folder):
        code = main(["run", str(ROOT / recipe), f"--trainer.max_epochs={iterations}", *CHEAP, *overrides])
    if code not in (0, None):
        raise RuntimeError(f"lit-diffac run {recipe} {' '.join(overrides)} exited with {code}")
    found = sorted(folder.glob("runs/*/version_*/checkpoints/last.ckpt"))
    if len(found) != 1:
        raise RuntimeError(f"expected one last.ckpt under {folder}, found {found}")
    return found[0]


def before_checkpoint(ckpt_path: Path, ckpt: dict, out: Path) -> tuple[dict, int]:
    """The checkpoint the module would have written before the change, written to ``out``.

    Returns:
        (the module's whole state dict, the size of ``out`` in bytes).
    """
    import torch

    from lit_diffac.checkpoints import CHECKSUM_KEY, add_checksums
    from lit_diffac.export import recipe_from_run_config
    from lit_diffac.frozen_weights import FROZEN_KEY
    from lit_diffac.resume import CHECKPOINT_KEY
    from lit_diffac.sampling import load_module_and_checkpoint

    # the run's config.yaml without its fit-only keys (ckpt_path, ...), as `lit-diffac sample` reads it
    config = recipe_from_run_config(str(ckpt_path.parent.parent / "config.yaml"), out.parent)
    module, _ = load_module_and_checkpoint(config, str(ckpt_path))
    full = module.state_dict()
    old = {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}
    old["state_dict"] = full
    old[CHECKPOINT_KEY] = {k: v for k, v in old[CHECKPOINT_KEY].items() if k != FROZEN_KEY}
    torch.save(add_checksums(old), out)
    size = out.stat().st_size
    out.unlink()
    trainable = sum(p.numel() for p in module.trainable_parameters())
    value_head = sum(p.numel() for p in module.value_head.parameters()) if module.value_head is not None else 0
    del module
    gc.collect()
    return {"state": full, "trainable_backbone_params": trainable, "value_head_params": value_head}, size


def measure_toy(variant: dict, iterations: int, folder: Path, extra: list[str] = ()) -> dict:
    """One toy row: run ``variant``, measure ``last.ckpt`` and the checkpoint it replaces."""
    import torch

    overrides = [*variant["overrides"], *extra]
    start = time.perf_counter()
    path = run_recipe(variant["recipe"], iterations, overrides, folder)
    run_s = time.perf_counter() - start
    file_bytes = path.stat().st_size
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    after = checkpoint_sections(ckpt, file_bytes)
    info, before_file = before_checkpoint(path, ckpt, folder / "before.ckpt")
    before_state = tensor_bytes(info["state"])
    replay = (ckpt.get("lit_diffac") or {}).get("critic_replay")
    entries = len(replay["entries"]) if replay else 0
    capacity = _replay_capacity(path.parent.parent / "config.yaml")
    row = {
        "name": variant["name"], "recipe": variant["recipe"], "overrides": overrides, "iterations": iterations,
        "run_s": round(run_s, 1),
        "trainable_backbone_params": info["trainable_backbone_params"], "value_head_params": info["value_head_params"],
        "after": {"file_bytes": file_bytes, "file_mb": mb(file_bytes), "sections_bytes": after,
                  "state_dict_keys": len(ckpt["state_dict"])},
        "before": {"file_bytes": before_file, "file_mb": mb(before_file),
                   "state_dict_bytes": before_state, "state_dict_keys": len(info["state"]),
                   "file_bytes_from_sections": file_bytes - after["state_dict"] + before_state,
                   "how": "measured: the run's checkpoint written again with the module's whole state_dict "
                          "(frozen weights reloaded from the pipeline), checksums recomputed"},
        "after_over_before": round(file_bytes / before_file, 4),
        "frozen_keys_removed": ckpt["lit_diffac"]["frozen_weights"]["keys"],
    }
    if capacity:
        per_iteration = after["critic_replay"] / entries if entries else None
        row["critic_replay"] = {"capacity_iterations": capacity, "entries_in_checkpoint": entries,
                                "checkpointed": bool(entries)}
        if per_iteration:
            full = per_iteration * capacity
            row["critic_replay"].update({
                "bytes_per_iteration": int(per_iteration), "mb_per_iteration": mb(per_iteration),
                "full_bytes_computed": int(full), "full_mb_computed": mb(full),
                "after_file_full_replay_bytes_computed": int(file_bytes - after["critic_replay"] + full),
                "before_file_full_replay_bytes_computed": int(before_file - after["critic_replay"] + full),
                "how": f"computed: measured replay bytes / {entries} iteration(s) x {capacity}"})
    del ckpt, info
    gc.collect()
    return row


def _replay_capacity(config: Path) -> int:
    """The run's ``critic_replay.init_args.iterations`` (0: no critic replay)."""
    import yaml

    model = yaml.safe_load(config.read_text())["model"]["init_args"]
    replay = model.get("critic_replay")
    if not replay:
        return 0
    return int((replay.get("init_args") or {}).get("iterations", 32))


# ---------------------------------------------------------------------------------------------- SD3.5-M (computed)
def _state_bytes(module) -> tuple[int, int]:
    """``(bytes, tensors)`` of ``module.state_dict()``, tied weights counted once."""
    state = module.state_dict(keep_vars=True)
    return tensor_bytes(state), len({id(t) for t in state.values()})


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params_arithmetic(denoiser, adapter: str = "policy") -> int:
    """LoRA parameters counted from the adapted ``Linear`` layers: ``rank x (in_features + out_features)`` each."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for layer in denoiser.modules():
        if isinstance(layer, LoraLayer) and adapter in layer.r:
            base = layer.get_base_layer()
            total += layer.r[adapter] * (base.in_features + base.out_features)
    return total


def sd3_lora_sizes(shapes: dict = SD35M, recipe: str = SD35_RECIPE, serialize: bool = True) -> dict:
    """The recipe's checkpoint before and after, computed from ``shapes`` on the meta device."""
    from lit_diffac.frozen_weights import frozen_keys

    holder, options = build_sd3_module(shapes, recipe, "meta")
    backbone, value_head, reward_clip = holder.backbone, holder.value_head, holder.rewards[0].model
    backbone_args, use_t5, head_args = options["backbone"], options["use_t5"], options["value_head"]
    reward_dtype, pooled_dim = options["reward_dtype"], holder.pooled_dim
    policy = backbone.policy_parameters()
    trainable = [*policy, *backbone.critic_parameters()]
    frozen = set(frozen_keys(holder, trainable))
    state = holder.state_dict(keep_vars=True)
    kept = {k: v for k, v in state.items() if k not in frozen}
    optimised = [*trainable, *value_head.parameters()]
    optim_bytes = adamw_state_bytes(optimised)
    after_state = tensor_bytes(kept)
    before_state = tensor_bytes(state)

    parts = {"transformer": backbone.denoiser, "text_encoder (CLIP-L)": backbone.text_encoder,
             "text_encoder_2 (OpenCLIP bigG)": backbone.text_encoder_2}
    if use_t5:
        parts["text_encoder_3 (T5-XXL encoder)"] = backbone.text_encoder_3
    parts["vae"] = backbone.vae
    parts["reward (PickScore, CLIP ViT-H/14)"] = reward_clip
    components_out = {}
    for name, module in parts.items():
        size, tensors = _state_bytes(module)
        lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
        names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        buffers = sum(t.numel() for n, t in module.state_dict(keep_vars=True).items() if n not in names)  # persistent
        components_out[name] = {"params": _params(module) - lora, "lora_params": lora,
                                "buffers_elements": buffers, "state_dict_bytes": size, "gb": gb(size),
                                "tensors": tensors}
    lora_params = sum(p.numel() for p in policy)
    head_params = sum(p.numel() for p in value_head.parameters())
    result = {
        "label": shapes["label"], "recipe": recipe,
        "how": "computed: every component built from its config on the meta device (no weights), its state_dict "
               "tensors counted exactly in the dtype the recipe gives them; trainable parts chosen by "
               "lit_diffac.frozen_weights.frozen_keys; AdamW state = 2 float32 tensors per parameter + a float32 "
               "step per tensor; other checkpoint sections (RNG, history, schedulers, hyper-parameters) left out",
        "backbone_options": backbone_args, "reward_dtype": str(reward_dtype).removeprefix("torch."),
        "value_head": {"feature_dims": backbone.feature_dims, "text_dim": pooled_dim,
                       "num_outputs": options["num_rewards"],
                       **head_args, "params": head_params},
        "lora": {"params": lora_params, "tensors": len(policy),
                 "adapted_linear_layers": sum(1 for n, _ in backbone.denoiser.named_parameters()
                                              if n.endswith(".lora_A.policy.weight")),
                 "params_arithmetic": lora_params_arithmetic(backbone.denoiser),
                 "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in policy})},
        "components": components_out,
        "after": {"state_dict_bytes": after_state, "state_dict_keys": len(kept), "optimizer_bytes": optim_bytes,
                  "bytes": after_state + optim_bytes, "mb": mb(after_state + optim_bytes)},
        "before": {"state_dict_bytes": before_state, "state_dict_keys": len(state), "optimizer_bytes": optim_bytes,
                   "bytes": before_state + optim_bytes, "gb": gb(before_state + optim_bytes),
                   "frozen_bytes": before_state - after_state, "frozen_gb": gb(before_state - after_state),
                   "frozen_keys": len(frozen)},
    }
    result["after_over_before"] = round(result["after"]["bytes"] / result["before"]["bytes"], 6)
    if use_t5:
        t5 = components_out["text_encoder_3 (T5-XXL encoder)"]["state_dict_bytes"]
        result["before"]["without_t5_bytes"] = result["before"]["bytes"] - t5
    if serialize:
        result["after"]["serialized"] = serialize_trainable(kept, optimised)
    return result


def serialize_trainable(kept: dict, optimised: list) -> dict:
    """``torch.save`` zeros of the kept tensors' shapes and dtypes with two real AdamW states (one step each:
    the actor on the backbone's trainable tensors, the critic on the value head), and measure the file."""
    import torch

    real = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in kept.items()}
    ids = {id(p) for p in optimised}
    params = {}
    for key, value in kept.items():  # same tensors as the module's: trainable ones become real parameters
        params[key] = torch.nn.Parameter(real[key]) if isinstance(value, torch.nn.Parameter) and id(value) in ids \
            else None
    actor = [p for k, p in params.items() if p is not None and not k.startswith("value_head.")]
    critic = [p for k, p in params.items() if p is not None and k.startswith("value_head.")]
    states = []
    for group in (actor, critic):
        if not group:
            continue
        optimizer = torch.optim.AdamW(group, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        for p in group:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        states.append(optimizer.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainable.ckpt"
        torch.save({"state_dict": real, "optimizer_states": states}, path)
        size = path.stat().st_size
    optim = tensor_bytes(states)
    return {"file_bytes": size, "file_mb": mb(size), "optimizer_tensor_bytes": optim,
            "state_dict_tensor_bytes": tensor_bytes(real),
            "how": "measured: torch.save of zeros with the kept tensors' shapes and dtypes + two real AdamW "
                   "state_dicts after one step"}


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def markdown(result: dict) -> str:
    lines = [f"# Checkpoint size (issue 19)", "",
             f"`{result['command']}` — {result['date']}, {result['machine']['platform']}, "
             f"{result['machine']['cpu_count']} CPUs, torch {result['machine']['torch']}, "
             f"{result['runtime_s']:.0f} s in all. MB = 10^6 bytes, GB = 10^9 bytes.", ""]
    if "toy" in result:
        toy = result["toy"]
        lines += [f"## Toy recipes (measured, {toy['iterations']} iteration(s), `last.ckpt`)", "",
                  "Before: the same checkpoint written with the module's whole `state_dict` (the format before "
                  "trainable-only checkpoints), measured. Sections: tensor bytes in the loaded checkpoint; "
                  "*other*: RNG-state tensors plus the rest of the file (pickle and zip records, hyper-parameters, "
                  "history and other non-tensor entries).", "",
                  "| run | trainable params (backbone + head) | state_dict before → after | optimiser | critic replay "
                  "| other | checkpoint before | checkpoint after | after / before |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in toy["rows"]:
            s = row["after"]["sections_bytes"]
            other = s["other_tensors"] + s["rest_of_file"]
            lines.append(
                f"| {row['name']} | {row['trainable_backbone_params']:,} + {row['value_head_params']:,} "
                f"| {_size(row['before']['state_dict_bytes'])} → {_size(s['state_dict'])} "
                f"| {_size(s['optimizer_states'])} | {_size(s['critic_replay'])} | {_size(other)} "
                f"| {_size(row['before']['file_bytes'])} | {_size(row['after']['file_bytes'])} "
                f"| {row['after_over_before']:.3f} |")
        full = [r for r in toy["rows"] if r.get("critic_replay", {}).get("full_bytes_computed")]
        if full:
            lines += ["", "Critic replay once full (the recipe keeps 32 iterations; **computed**: measured bytes per "
                      "iteration × 32):", "",
                      "| run | replay per iteration | replay, 32 iterations | checkpoint after (full replay) "
                      "| checkpoint before (full replay) |", "| --- | --- | --- | --- | --- |"]
            for row in full:
                r = row["critic_replay"]
                lines.append(f"| {row['name']} | {_size(r['bytes_per_iteration'])} | {_size(r['full_bytes_computed'])} "
                             f"| {_size(r['after_file_full_replay_bytes_computed'])} "
                             f"| {_size(r['before_file_full_replay_bytes_computed'])} |")
    if "sd35m" in result:
        sd = result["sd35m"]
        lines += ["", f"## {sd['label']} + LoRA, `{sd['recipe']}` (computed)", "",
                  "Parameter counts come from the models' configs, built on the meta device (no weights); bytes "
                  "in the recipe's dtypes (frozen weights "
                  f"{sd['backbone_options'].get('weights_dtype', 'float32')}, reward {sd['reward_dtype']}, "
                  "LoRA / value head / AdamW float32). The other checkpoint sections (RNG states, history, "
                  "schedulers, hyper-parameters; 0.2-0.4 MB in the toy checkpoints above) are left out.", "",
                  "| part | parameters | state_dict bytes | in the checkpoint |", "| --- | --- | --- | --- |"]
        for name, c in sd["components"].items():
            extra = f" (+ {c['buffers_elements']:,} buffer elements)" if c["buffers_elements"] else ""
            lines.append(f"| {name} | {c['params']:,}{extra} | {_size(c['state_dict_bytes'] - 4 * c['lora_params'])} "
                         f"| before only |")
        lora, head = sd["lora"], sd["value_head"]
        lines += [f"| LoRA rank {sd['backbone_options'].get('lora_rank')} on {lora['adapted_linear_layers']} linear "
                  f"layers ({', '.join(lora['dtype'])}) | {lora['params']:,} | {_size(4 * lora['params'])} "
                  "| before and after |",
                  f"| value head (taps {head['feature_dims']}, pooled {head['text_dim']}) | {head['params']:,} "
                  f"| {_size(4 * head['params'])} | before and after |",
                  f"| AdamW state (LoRA + head) | | {_size(sd['after']['optimizer_bytes'])} | before and after |", "",
                  "| | before (whole state dict + AdamW) | after (trainable + AdamW) | after / before |",
                  "| --- | --- | --- | --- |",
                  f"| {sd['label']} LoRA, PickScore | {_size(sd['before']['bytes'])} | {_size(sd['after']['bytes'])} "
                  f"| {sd['after_over_before']:.4f} |"]
        if "without_t5_bytes" in sd["before"]:
            lines += [f"| same, `use_t5: false` | {_size(sd['before']['without_t5_bytes'])} "
                      f"| {_size(sd['after']['bytes'])} | "
                      f"{sd['after']['bytes'] / sd['before']['without_t5_bytes']:.4f} |"]
        if "serialized" in sd["after"]:
            lines += ["", f"The trainable part written with `torch.save` (zeros of the same shapes, real AdamW states "
                      f"after one step): {_size(sd['after']['serialized']['file_bytes'])} on disk."]
        if "docs_estimate" in sd:
            lines += ["", sd["docs_estimate"]]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def output_path(name: str) -> Path:
    path = Path(name)
    return path.with_suffix(".json") if path.parent != Path(".") or path.is_absolute() else RESULTS / f"{name}.json"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_size", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2, help="RL iterations of each toy run (default 2)")
    parser.add_argument("--only", choices=("toy", "sd35m"), default=None, help="one part only")
    parser.add_argument("--out", default=None, help="results name in benchmarks/results/ (or a path); default "
                                                   "checkpoint_size, with --quick checkpoint_size_quick")
    parser.add_argument("--quick", action="store_true", help="one toy variant at batch 2 and a tiny SD3 "
                                                             "configuration (seconds; the tests)")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if args.out is None:
        args.out = "checkpoint_size_quick" if args.quick else "checkpoint_size"
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.perf_counter()
    result = {"command": " ".join(["python -m benchmarks.checkpoint_size", *argv]),
              "machine": machine(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "notes": []}
    if args.only in (None, "toy"):
        variants = TOY_VARIANTS[:1] if args.quick else TOY_VARIANTS
        extra = QUICK if args.quick else []
        rows = []
        with tempfile.TemporaryDirectory(prefix="checkpoint_size_") as tmp:
            for i, variant in enumerate(variants):
                print(f"[toy] {variant['name']} ...", flush=True)
                rows.append(measure_toy(variant, args.iterations, Path(tmp) / f"run{i}", extra))
                print(f"[toy]   last.ckpt {mb(rows[-1]['after']['file_bytes'])} MB "
                      f"(before: {mb(rows[-1]['before']['file_bytes'])} MB)", flush=True)
        result["toy"] = {"iterations": args.iterations, "overrides_for_all": [*CHEAP, *extra], "rows": rows}
        result["notes"].append("Toy rows: the frozen weights of the toy recipes are small (the 2-layer text "
                               "encoder; with LoRA also the denoiser's base weights), so trimming saves little "
                               "there: the optimiser state (2 float32 tensors per trained parameter) and, in the "
                               "DiT recipe, the critic replay dominate. The replay is the recipe's "
                               "CriticReplay(iterations=32); checkpoint=false leaves it out.")
    if args.only in (None, "sd35m"):
        print("[sd35m] building on the meta device ...", flush=True)
        sd = sd3_lora_sizes(TINY_SD3 if args.quick else SD35M, serialize=True)
        with_t5 = sd["before"]["bytes"]
        reward = sd["components"]["reward (PickScore, CLIP ViT-H/14)"]["state_dict_bytes"]
        sd["docs_estimate"] = (
            f"Docs (docs/from_toy_to_sd.md, lit_diffac/frozen_weights.py): \"~17 GB for SD3.5-M with T5\" for the "
            f"frozen weights. Computed here: {gb(sd['before']['frozen_bytes']):.2f} GB frozen "
            f"({gb(with_t5):.2f} GB for the whole checkpoint before), of which the PickScore reward "
            f"{gb(reward):.2f} GB (the pipeline's frozen weights alone: "
            f"{gb(sd['before']['frozen_bytes'] - reward):.2f} "
            f"GB) and the transformer's positional-embedding buffer "
            f"{gb(2 * sd['components']['transformer']['buffers_elements']):.2f} GB"
            if not args.quick else "(tiny configuration: no comparison with the docs' estimate)")
        result["sd35m"] = sd
        if not args.quick:
            result["notes"].append(
                "SD3.5-M: computed, not measured on real weights. recipes/sd35/pickscore.yaml sets no critic_replay, "
                "so its checkpoints have no replay section; with a checkpointed replay it would dominate "
                "(docs/from_toy_to_sd.md estimates ~9.4 MB of cached features per image and step).")
        print(f"[sd35m] before {gb(sd['before']['bytes'])} GB, after {mb(sd['after']['bytes'])} MB", flush=True)
    result["runtime_s"] = round(time.perf_counter() - start, 1)
    return result


def write(result: dict, out: str) -> Path:
    path = output_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    result = run(args, argv)
    path = write(result, args.out)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
