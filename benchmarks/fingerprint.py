"""Behaviour fingerprints: short runs of recipes, to show that a refactor changed nothing that is learned.

    python -m benchmarks.fingerprint run --out DIR [--iterations 15] [--threads 1] [--jobs 2] [RECIPE ...]
    python -m benchmarks.fingerprint compare DIR_BEFORE DIR_AFTER

``run`` trains each recipe (default: the actor-critic, GRPO and DDPO toy DiT recipes) for ``--iterations``
iterations with a fixed seed and ``OMP_NUM_THREADS``, and writes ``DIR/<recipe>.json``: the run's
``summary.json`` (wall times dropped) and a SHA-256 of every tensor of the final checkpoint (weights, optimiser
states, training state).  ``compare`` prints every metric and tensor that differs between two such folders and
exits 1 if any does.  Run both sides on the same machine with the same thread count: floating-point reduction
order depends on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DEFAULT_RECIPES = ["recipes/toy/actor_critic_dit.yaml", "recipes/toy/grpo_dit.yaml", "recipes/toy/ddpo_dit.yaml"]
#: summary.json entries that measure time or name a temporary folder, not behaviour.
TIMING_KEYS = {"wall_time_s", "train_seconds", "eval_train_seconds", "checkpoint"}


def tensor_hashes(obj, prefix: str = "") -> dict[str, str]:
    """``{path: sha256}`` of every tensor nested in ``obj`` (dicts, lists, tuples, dataclass-free containers)."""
    out: dict[str, str] = {}
    if torch.is_tensor(obj):
        data = obj.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        out[prefix] = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16] + f" {tuple(obj.shape)}"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(tensor_hashes(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(tensor_hashes(value, f"{prefix}/{i}"))
    return out


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and not k.startswith("perf/")}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def run_recipe(recipe: str, iterations: int, threads: int, overrides: list[str]) -> dict:
    """Train ``recipe`` for ``iterations`` and return its fingerprint."""
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "lit_diffac", "run", recipe, f"--trainer.max_epochs={iterations}",
               "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp}", *overrides]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{recipe} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        summary_path = Path(out.stdout.strip().splitlines()[-1].removeprefix("summary: "))
        summary = json.loads(summary_path.read_text())
        ckpts = sorted(summary_path.parent.glob("checkpoints/last*.ckpt"), key=os.path.getmtime)
        checkpoint = torch.load(ckpts[-1], map_location="cpu", weights_only=True) if ckpts else {}
        state = {k: checkpoint[k] for k in checkpoint if k in ("state_dict", "optimizer_states")}
        extra = {k: v for k, v in checkpoint.items() if k.startswith("lit_diffac")}
        return {"recipe": recipe, "command": " ".join(cmd[1:]), "summary": _strip_timing(summary),
                "tensors": tensor_hashes({**state, **extra})}


def compare(before: dict, after: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty: identical)."""
    diffs = []

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b:
                    diffs.append(f"{path}/{key}: only {'after' if key not in a else 'before'}")
                else:
                    walk(a[key], b[key], f"{path}/{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}/{i}")
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")

    walk(before["summary"], after["summary"], "summary")
    walk(before["tensors"], after["tensors"], "tensors")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fingerprint recipes")
    run.add_argument("recipes", nargs="*", default=DEFAULT_RECIPES)
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--iterations", type=int, default=15)
    run.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    run.add_argument("--jobs", type=int, default=1, help="runs side by side")
    run.add_argument("--override", action="append", default=[], help="extra recipe override (repeatable)")
    cmp = sub.add_parser("compare", help="compare two fingerprint folders")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)

    if args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)

        def one(recipe: str) -> None:
            result = run_recipe(recipe, args.iterations, args.threads, args.override)
            (args.out / f"{Path(recipe).stem}.json").write_text(json.dumps(result, indent=2))
            print(f"{recipe}: {len(result['tensors'])} tensors, final {result['summary']['final']}", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, args.recipes))
        return 0

    status = 0
    for path in sorted(args.before.glob("*.json")):
        other = args.after / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {args.after}")
            status = 1
            continue
        diffs = compare(json.loads(path.read_text()), json.loads(other.read_text()))
        print(f"{path.stem}: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for line in diffs[:40]:
            print("   ", line)
        status |= bool(diffs)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
