"""Is the toy critic limited by its head, its features or its data?  Offline fits on fixed rollouts.

    python -m benchmarks.critic_capacity [--recipe recipes/toy/actor_critic_dit.yaml] [--trajectories 1536]
        [--steps 1500] [--seed 0] [--quick]

Rollouts of the recipe's *initial* policy (frozen) are collected once, with the backbone features of every step.
Each critic variant is then regressed on the standardised final reward of 75 % of the trajectories (minibatches of
64 random (trajectory, step) pairs, as in PPO, the recipe's critic optimiser settings) and scored by explained
variance per denoising step on the other 25 %:

* ``head`` — the recipe's value head on the tapped features (what the actor-critic trains);
* ``head, 4 queries`` / ``head, 1 token layer`` — more read-out capacity on the same features;
* ``pixel CNN on x_t`` — a small convolutional critic on the noisy latent itself (timestep FiLM, prompt
  embedding added), i.e. no backbone features at all.

A linear probe (logistic regression on each tap's mean-pooled features) also predicts the digit the judge sees
in the *final* image from the features of step k, next to the prompt-only baseline (the fraction of final images
showing the prompted digit).  If every critic stays far below the branching ceiling of
``benchmarks.critic_probe`` at the last steps, the data budget, not the head, is the limit.
Results: ``benchmarks/results/critic_capacity.{json,md}``.
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
from torch import nn

from lit_diffac.losses import explained_variance
from lit_diffac.ppo import build_optimizer
from lit_diffac.rollout import collect_rollout
from lit_diffac.toy.prompts import digit_of
from lit_diffac.value_heads.head import ValueHead, sinusoidal_embedding

RESULTS = Path(__file__).resolve().parent / "results"


class PixelCritic(nn.Module):
    """A small CNN value function ``V(x_t, t, c)`` on the latent itself (the control: no backbone features)."""

    def __init__(self, channels: int, text_dim: int, width: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, 2 * width))
        self.time = nn.Linear(64, 2 * width)
        self.text = nn.Linear(text_dim, 2 * width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, 1))

    def forward(self, latents: torch.Tensor, t_frac: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.conv(latents) * (1 + self.time(sinusoidal_embedding(t_frac, 64))) + self.text(pooled)
        return self.out(h)


@torch.no_grad()
def collect(module, prompts: list[str], trajectories: int, generator: torch.Generator) -> dict:
    """Rollouts with features: ``feats`` (one ``[N, K, ...]`` per tap), ``latents [N, K, C, H, W]``, rewards…"""
    bb, sampler, reward = module.backbone, module.sampler, module.rewards[0]
    parts: dict[str, list] = {"feats": [], "latents": [], "pooled": [], "reward": [], "seen": [], "asked": []}
    for _ in range(max(1, trajectories // 64)):
        batch = [prompts[i] for i in torch.randint(len(prompts), (64,), generator=generator)]
        rollout = collect_rollout(bb, sampler, batch, generator=generator, keep_features=True)
        parts["feats"].append([f.half() for f in rollout.features])
        parts["latents"].append(rollout.latents[:, :-1].half())
        parts["pooled"].append(rollout.embeds.pooled.float())
        parts["reward"].append(reward(rollout.images, batch).float())
        parts["seen"].append(reward._probs(rollout.images).argmax(-1))
        parts["asked"].append(torch.tensor([digit_of(p) for p in batch]))
    data = {k: torch.cat(v) for k, v in parts.items() if k != "feats"}
    data["feats"] = [torch.cat([f[j] for f in parts["feats"]]) for j in range(len(parts["feats"][0]))]
    data["t"] = sampler.timestep_fraction(torch.arange(sampler.num_steps)).float()
    return data


def fit(critic: nn.Module, inputs, data: dict, n_train: int, steps: int, module,
        generator: torch.Generator) -> list[float]:
    """Regress ``critic(inputs(i, k))`` on the standardised reward; per-step EV on the held-out trajectories.

    The optimiser is the recipe's critic optimiser (its ``optimizer``, default AdamW, at ``critic_lr``).
    """
    reward = data["reward"]
    z = (reward - reward[:n_train].mean()) / reward[:n_train].std()
    num_steps = data["latents"].shape[1]
    optimizer = build_optimizer(module.optimizer_factory, list(critic.parameters()), module.hparams.critic_lr)
    for _ in range(steps):
        i = torch.randint(n_train, (64,), generator=generator)
        k = torch.randint(num_steps, (64,), generator=generator)
        loss = 0.5 * ((critic(*inputs(i, k))[:, 0] - z[i]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held = torch.arange(n_train, len(reward))
    with torch.no_grad():
        return [explained_variance(critic(*inputs(held, torch.full_like(held, k)))[:, 0], z[held]).item()
                for k in range(num_steps)]


def class_probe(data: dict, n_train: int) -> dict[str, list[float]]:
    """Per tap and step: accuracy of a linear probe predicting the final image's digit from mean-pooled features."""
    from sklearn.linear_model import LogisticRegression

    seen = data["seen"].numpy()
    out = {}
    for j, feats in enumerate(data["feats"]):
        accuracies = []
        for k in range(feats.shape[1]):
            x = feats[:, k].float()
            x = (x.mean(1) if x.ndim == 3 else x.flatten(2).mean(-1)).numpy()
            probe = LogisticRegression(max_iter=2000).fit(x[:n_train], seen[:n_train])
            accuracies.append(float(probe.score(x[n_train:], seen[n_train:])))
        out[f"tap {j}"] = accuracies
    return out


def main(argv: list[str] | None = None) -> int:
    from lit_diffac.data.prompts import load_prompts
    from lit_diffac.sampling import load_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/toy/actor_critic_dit.yaml")
    parser.add_argument("--trajectories", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="128 trajectories, 5 steps (checks the pipeline)")
    args = parser.parse_args(argv)
    if args.quick:
        args.trajectories, args.steps = 128, 5
    torch.manual_seed(args.seed)
    start = time.time()
    module = load_module(args.recipe, overrides=["--trainer.logger=false"])
    module.backbone.requires_grad_(False)
    hp = module.hparams
    generator = torch.Generator().manual_seed(args.seed)
    data = collect(module, load_prompts(hp.train_prompts), args.trajectories, generator)
    n = len(data["reward"])
    n_train = (3 * n // 4) // 64 * 64 or 64
    feats, t, pooled = data["feats"], data["t"], data["pooled"]
    dims = [f.shape[-1] if f.ndim == 4 else f.shape[2] for f in feats]
    text_dim = pooled.shape[-1]

    def tapped(i, k):
        return [f[i, k].float() for f in feats], t[k], pooled[i]

    def pixels(i, k):
        return data["latents"][i, k].float(), t[k], pooled[i]

    config = {"dim": module.value_head.dim, "patch_size": module.value_head.patch_size}
    variants = {
        "head": (lambda: ValueHead(dims, text_dim, **config), tapped),
        "head, 4 queries": (lambda: ValueHead(dims, text_dim, num_queries=4, **config), tapped),
        "head, 1 token layer": (lambda: ValueHead(dims, text_dim, token_layers=1, **config), tapped),
        "pixel CNN on x_t": (lambda: PixelCritic(data["latents"].shape[2], text_dim), pixels),
    }
    result: dict = {"ev": {}}
    for name, (build, inputs) in variants.items():
        torch.manual_seed(args.seed)
        result["ev"][name] = fit(build(), inputs, data, n_train, args.steps, module,
                                 torch.Generator().manual_seed(args.seed))
        print(name, " ".join(f"{v:.2f}" for v in result["ev"][name]), flush=True)
    result["class_probe"] = class_probe(data, n_train)
    result["prompt_only_accuracy"] = float((data["seen"] == data["asked"]).float()[n_train:].mean())
    command = ("python -m benchmarks.critic_capacity " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    result.update(command=command, minutes=(time.time() - start) / 60, machine=platform.node(),
                  cpus=os.cpu_count(), trajectories=n, train_trajectories=n_train)
    steps = range(len(t))
    lines = [f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, "
             f"{result['minutes']:.0f} min; {n_train} training / {n - n_train} held-out trajectories", "",
             "Explained variance on held-out trajectories, per denoising step k:", "",
             "| critic | " + " | ".join(str(k) for k in steps) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in ev) + " |" for name, ev in result["ev"].items()]
    lines += ["", "Linear probe: accuracy predicting the digit the judge sees in the final image from step k's "
              f"mean-pooled features (prompt only: {result['prompt_only_accuracy']:.2f}):", "",
              "| features | " + " | ".join(str(k) for k in steps) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in acc) + " |" for name, acc in result["class_probe"].items()]
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "critic_capacity.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "critic_capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
