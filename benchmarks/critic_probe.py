"""How much of the reward can a critic explain at each denoising step, and how much does ours?

    python -m benchmarks.critic_probe [--recipe recipes/toy/actor_critic_dit.yaml] [--trajectories 1536]

Two measurements on rollouts of the recipe's *initial* policy (frozen), per step k of the chain:

* **ceiling** — the explained variance of the best possible critic, ``Var(E[R | x_k]) / Var(R)``, estimated by
  branching: from each state ``x_k`` of 128 trajectories, ``M`` independent continuations are sampled and
  ``1 − E[Var(R | x_k)] / Var(R)`` is computed from their rewards;
* **offline fit** — the recipe's value head regressed (same features, same loss) on a fixed set of rollouts
  for ``--steps`` updates, and its explained variance on held-out trajectories, per step.

A state-aligned critic has low EV at the first steps (the outcome is not decided yet) and high EV at the
last ones; a critic that only learned a per-prompt mean has the same EV at every step.  Results go to
``benchmarks/results/critic_probe.{json,md}``.
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

from lit_diffac.losses import explained_variance
from lit_diffac.ppo import build_optimizer
from lit_diffac.rollout import collect_rollout

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def ceiling(module, prompts: list[str], branches: int, generator: torch.Generator) -> list[float]:
    """Per-step EV ceiling from ``branches`` continuations of every state of one rollout."""
    bb, sampler, reward = module.backbone, module.sampler, module.rewards[0]
    rollout = collect_rollout(bb, sampler, prompts, generator=generator)
    embeds = bb.encode_prompts(prompts)
    out = []
    for k in range(sampler.num_steps):
        rewards = []
        for _ in range(branches):
            x = rollout.latents[:, k]
            for j in range(k, sampler.num_steps):
                index = torch.full((len(prompts),), j)
                prediction = bb(x, sampler.timestep_for(index), embeds).prediction
                x = sampler.step(prediction, index, x, generator=generator).prev_sample
            rewards.append(reward(bb.decode(x), prompts))
        r = torch.stack(rewards, 1)  # [B, M]
        out.append(1.0 - (r.var(1).mean() / r.var()).item())
    return out


def offline_fit(module, prompts: list[str], trajectories: int, steps: int, generator: torch.Generator) -> list[float]:
    """Fit the module's value head on fixed rollouts; per-step EV on held-out trajectories."""
    bb, sampler, head = module.backbone, module.sampler, module.value_head
    data = []  # (features, t_frac, pooled, reward) per (batch, step)
    for _ in range(trajectories // 64):
        idx = torch.randint(len(prompts), (64,), generator=generator)
        batch = [prompts[i] for i in idx]
        rollout = collect_rollout(bb, sampler, batch, generator=generator, keep_features=True)
        reward = module.rewards[0](rollout.images, batch)
        embeds = bb.encode_prompts(batch)
        for k in range(sampler.num_steps):
            t = sampler.timestep_fraction(torch.full((64,), k))
            data.append(([f[:, k] for f in rollout.features], t, embeds.pooled, reward, k))
    rewards = torch.cat([d[3] for d in data])
    mean, std = rewards.mean(), rewards.std()
    batches = len(data) // sampler.num_steps
    if batches < 2:
        raise ValueError("the offline fit needs at least 128 trajectories (two batches of 64)")
    n_train = max(1, int(0.75 * batches)) * sampler.num_steps  # whole batches: held-out trajectories are unseen
    hp = module.hparams
    # the recipe's critic optimiser (its `optimizer`, default AdamW) at critic_lr
    optimizer = build_optimizer(module.optimizer_factory, list(head.parameters()), hp.critic_lr)
    for _ in range(steps):
        feats, t, pooled, r, _k = data[int(torch.randint(n_train, (1,), generator=generator))]
        loss = 0.5 * ((head(feats, t, pooled)[:, 0] - (r - mean) / std) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = []
    with torch.no_grad():
        for k in range(sampler.num_steps):
            held = [d for d in data[n_train:] if d[4] == k]
            v = torch.cat([head(f, t, p)[:, 0] for f, t, p, _r, _ in held])
            out.append(explained_variance(v, torch.cat([(r - mean) / std for *_x, r, _ in held])).item())
    return out


def main(argv: list[str] | None = None) -> int:
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.sampling import load_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/toy/actor_critic_dit.yaml")
    parser.add_argument("--trajectories", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    module = load_module(args.recipe, overrides=["--trainer.logger=false"])
    prompts = load_prompts(module.hparams.train_prompts)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    branch_prompts = [prompts[i] for i in torch.randint(len(prompts), (128,), generator=generator)]
    result = {"ceiling": ceiling(module, branch_prompts, args.branches, generator),
              "offline_fit": offline_fit(module, prompts, args.trajectories, args.steps, generator)}
    command = "python -m benchmarks.critic_probe " + " ".join(argv if argv is not None else sys.argv[1:])
    result.update(command=command, minutes=(time.time() - start) / 60, machine=platform.node(), cpus=os.cpu_count())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "critic_probe.json").write_text(json.dumps(result, indent=2))
    steps = range(len(result["ceiling"]))
    lines = [f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, "
             f"{result['minutes']:.0f} min", "", "| step k | " + " | ".join(str(k) for k in steps) + " |",
             "|---|" + "---|" * len(steps),
             "| EV ceiling (branching) | " + " | ".join(f"{v:.2f}" for v in result["ceiling"]) + " |",
             "| EV of the value head fitted offline | " + " | ".join(f"{v:.2f}" for v in result["offline_fit"]) + " |"]
    (RESULTS / "critic_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
