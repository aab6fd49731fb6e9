"""Does the critic learn to read ``x_t`` from a stream of rollouts?  PPO's critic updates vs a critic replay.

    python -m benchmarks.critic_replay [--recipe recipes/toy/actor_critic_dit.yaml] [--iterations 300]
        [--seed 0] [--quick] [--patch-sizes 1 2 4 --variants main] [--out NAME]

An offline replica of the critic's side of an actor-critic run, on rollouts of the recipe's *initial* policy
(frozen, so only the critic's learning is measured): every iteration brings 32 new trajectories (their cached
features and standardised final rewards), and the recipe's value head, with the recipe's critic optimiser,

* takes one pass over them in minibatches of 64 (trajectory, step) pairs — what the PPO minibatches do;
* then, per variant, a :class:`~lit_diffac.critic_replay.CriticReplay`'s ``passes`` extra passes of 320 pairs
  drawn from the last ``iterations`` iterations in minibatches of ``minibatch_size``
  (:func:`lit_diffac.critic_replay.fit_critic`, the module's own code).

Explained variance on 640 held-out trajectories is reported per denoising step k every 50 iterations.  A critic
that only learned a per-prompt mean has the same EV at every step; a state-aligned one rises towards the last
steps, where ``x_t`` shows the digit (ceiling: ``benchmarks.critic_probe``).

``--patch-sizes``: the same with the head reading (and the replay caching) features pooled ``p × p`` on the token
grid (``ValueHead(patch_size=p)``, what the SD recipes use so that the cache stays under 1 MB per image and step;
the toy DiT's 8×8 tokens become 4×4 at ``p = 2``); ``--variants main`` runs only the main recipe's replay.
Results: ``benchmarks/results/NAME.{json,md}`` (default ``critic_replay``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.critic_capacity import collect
from lit_diffac.critic_replay import CriticReplay, fit_critic
from lit_diffac.losses import explained_variance
from lit_diffac.ppo import build_optimizer, clip_gradients
from lit_diffac.value_heads.head import ValueHead

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32  # trajectories per iteration, as in the recipe

#: name → (CriticReplay passes (0: no replay), iterations, minibatch_size)
VARIANTS = {
    "PPO minibatches only (no critic_replay, the paper's setting)": (0, 1, 64),
    "+ 2 extra passes on the current rollout (CriticReplay iterations 1, passes 2)": (2, 1, 64),
    "+ 1 extra pass from 32 iterations (CriticReplay iterations 32, passes 1, minibatch 128)": (1, 32, 128),
    "+ 2 extra passes from 32 iterations (the main recipe: CriticReplay iterations 32, passes 2, "
    "minibatch 128)": (2, 32, 128),
}


def run_variant(data: dict, head: ValueHead, module, passes: int, replay_size: int, minibatch: int,
                iterations: int, held_out: int, seed: int, every: int) -> dict[int, list[float]]:
    """Stream ``iterations`` batches through PPO-like and replayed critic updates; held-out EV per step.

    Optimiser and gradient clipping are the recipe's critic ones (its ``optimizer``, default AdamW, at
    ``critic_lr``; ``max_grad_norm``).
    """
    hp = module.hparams
    t, pooled = data["t"], data["pooled"]
    # what the replay caches and the head reads: its parameter-free pooling of every step's taps
    feats = [head.compress(f.flatten(0, 1)).unflatten(0, f.shape[:2]) for f in data["feats"]]
    reward = data["reward"]
    z = ((reward - reward.mean()) / reward.std())[:, None]
    num_steps = len(t)
    optimizer = build_optimizer(module.optimizer_factory, list(head.parameters()), hp.critic_lr)
    replay = CriticReplay(iterations=replay_size, storage_dtype="bfloat16")
    generator = torch.Generator().manual_seed(seed)
    clip = lambda params: clip_gradients(params, hp.max_grad_norm)
    held = torch.arange(len(reward) - held_out, len(reward))
    curves = {}
    for it in range(iterations):
        rows = torch.arange(it * BATCH, (it + 1) * BATCH)
        targets = z[rows][:, None].expand(-1, num_steps, -1)
        replay.add([f[rows] for f in feats], pooled[rows], targets, torch.zeros_like(targets))
        current = CriticReplay(iterations=1, storage_dtype=None)
        current.entries.append(replay.entries[-1])
        fit_critic(head, current, optimizer, passes=1, pairs_per_pass=BATCH * num_steps, minibatch_size=64,
                   timestep_fraction=lambda k: t[k], generator=generator, clip=clip)  # the PPO minibatches
        if passes:
            fit_critic(head, replay, optimizer, passes=passes, pairs_per_pass=BATCH * num_steps,
                       minibatch_size=minibatch, timestep_fraction=lambda k: t[k], generator=generator, clip=clip)
        if (it + 1) % every == 0 or it + 1 == iterations:
            with torch.no_grad():
                curves[it + 1] = [explained_variance(
                    head([f[held, k].float() for f in feats], t[k].expand(len(held)), pooled[held],
                         compressed=True)[:, 0],
                    z[held, 0]).item() for k in range(num_steps)]
    return curves


def main(argv: list[str] | None = None) -> int:
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.sampling import load_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/toy/actor_critic_dit.yaml")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="6 iterations (checks the pipeline)")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=None,
                        help="value-head pooling factors to compare (default: the recipe's)")
    parser.add_argument("--variants", choices=["all", "main"], default="all",
                        help="main: only the main recipe's replay (2 passes from 32 iterations)")
    parser.add_argument("--out", default="critic_replay", help="result file stem in benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = 6
    start = time.time()
    torch.manual_seed(args.seed)
    module = load_module(args.recipe, overrides=["--trainer.logger=false"])
    module.backbone.requires_grad_(False)
    hp = module.hparams
    held_out = 64 if args.quick else 640
    data = collect(module, load_prompts(hp.train_prompts), args.iterations * BATCH + held_out,
                   torch.Generator().manual_seed(args.seed))
    print(f"collected {len(data['reward'])} trajectories in {time.time() - start:.0f} s", flush=True)
    dims = [f.shape[-1] if f.ndim == 4 else f.shape[2] for f in data["feats"]]
    if args.patch_sizes and module.value_head.patch_size != 1:  # its rollouts' features would be pooled already
        parser.error(f"--patch-sizes needs a recipe whose head reads unpooled taps (patch_size 1), got "
                     f"{module.value_head.patch_size}")
    patches = args.patch_sizes or [module.value_head.patch_size]
    variants = VARIANTS if args.variants == "all" else dict(list(VARIANTS.items())[-1:])
    every = max(1, args.iterations // 6)
    result: dict = {"ev": {}}
    for patch, (name, (passes, replay_size, minibatch)) in itertools.product(patches, variants.items()):
        torch.manual_seed(args.seed)
        head = ValueHead(dims, data["pooled"].shape[-1], dim=module.value_head.dim, patch_size=patch)
        head.token_grid = module.backbone.feature_grid
        if len(patches) > 1:
            grid = head.compress(data["feats"][0][:1, 0]).shape
            name += f", patch_size {patch} ({grid[1] if len(grid) == 3 else grid[2] * grid[3]} tokens per tap)"
        t0 = time.time()
        curves = run_variant(data, head, module, passes, replay_size, minibatch, args.iterations, held_out,
                             args.seed, every)
        result["ev"][name] = {str(k): v for k, v in curves.items()}
        last = curves[max(curves)]
        print(f"{name}: step 0 {last[0]:.2f}, last step {last[-1]:.2f}, mean {sum(last) / len(last):.2f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    command = ("python -m benchmarks.critic_replay " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    result.update(command=command, minutes=(time.time() - start) / 60, machine=platform.node(),
                  cpus=os.cpu_count(), iterations=args.iterations, held_out=held_out)
    steps = range(len(data["t"]))
    final = args.iterations
    lines = [f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, "
             f"{result['minutes']:.0f} min; {args.iterations} iterations × {BATCH} trajectories of the frozen base "
             f"policy, {held_out} held-out trajectories", "",
             f"Explained variance on held-out trajectories per denoising step k, after {final} iterations:", "",
             "| critic updates | " + " | ".join(str(k) for k in steps) + " | mean |", "|---|" + "---|" * (len(steps) + 1)]
    for name, curves in result["ev"].items():
        ev = curves[str(final)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ev) + f" | **{sum(ev) / len(ev):.2f}** |")
    lines += ["", "Last-step / mean EV during the stream:", "",
              "| critic updates | " + " | ".join(f"it {k}" for k in next(iter(result["ev"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(result["ev"].values())))]
    for name, curves in result["ev"].items():
        lines.append(f"| {name} | " + " | ".join(f"{ev[-1]:.2f} / {sum(ev) / len(ev):.2f}" for ev in curves.values())
                     + " |")
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
