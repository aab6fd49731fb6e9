"""Test-time steering with the trained critic vs plain sampling vs best-of-N at equal compute, by two judges.

    lit-diffac run recipes/toy/actor_critic_dit.yaml            # the main job: runs/actor_critic_dit/version_N
    python -m benchmarks.steering --run dit=runs/actor_critic_dit/version_0 [--run unet=...] [--scale 4]
        [--sweep-scales 1 4 16] [--sweep-steps first:5 last:5] [--samples-per-prompt 25] [--seed 4242] [--quick]

For each ``BACKBONE=RUN_FOLDER`` (a finished run of a toy digit recipe: its ``config.yaml`` and
``checkpoints/last.ckpt``), on the held-out prompts × ``--samples-per-prompt`` with the same ``--seed``, every
variant is one ``lit-diffac sample`` call:

* ``plain``: the policy's own sampler (``--scale 0``);
* ``steered``: critic steering at ``--scale`` on every step (``--steps all``); its backbone compute per sample
  is reported by ``lit-diffac sample`` (a steered step costs a forward and a backward: 3 forward-equivalents);
* ``best_of_n_value``: best-of-N ranked by the critic's value at the last step, N = the steered run's compute
  per sample over the plain run's, rounded (equal compute); ``best_of_n_reward``: the same N ranked by the
  training reward itself (an upper reference: it peeks at the judge);
* a sweep of scales and step windows (``--sweep-scales``, ``--sweep-steps``) at their own compute.

Every folder is scored by the project's judge (the reward's digit classifier: ``digit_alignment_accuracy``) and
by the independent judge (:mod:`benchmarks.independent_judge`: an RBF SVM on the original 8×8 digits), so that
steering toward the reward's own classifier is not mistaken for alignment.  Writes
``benchmarks/results/NAME.{json,md}`` (``steering``; ``--quick``: ``results/quick/steering``, 2 samples per prompt,
no sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def sample(run: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``lit-diffac sample`` call on the run's last checkpoint; its ``rewards.json``."""
    command = [sys.executable, "-m", "lit_diffac", "sample", "--ckpt", str(run / "checkpoints" / "last.ckpt"),
               "--prompts", args.prompts, "--samples-per-prompt", str(args.samples_per_prompt),
               "--seed", str(args.seed), "--out", str(out), *extra, "--trainer.logger=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "rewards.json").read_text())


def measure(backbone: str, run: Path, args: argparse.Namespace, out_dir: Path, svm) -> dict:
    from benchmarks.independent_judge import judge_folder

    folders: dict[str, Path] = {}
    reports: dict[str, dict] = {}

    def variant(name: str, extra: list[str]) -> None:
        folders[name] = out_dir / backbone / name.replace(" ", "_").replace(":", "")
        reports[name] = sample(run, folders[name], args, extra)
        print(f"{backbone} {name}: {json.dumps(reports[name]['mean'])}", flush=True)

    def per_sample(name: str) -> float:  # backbone forward-equivalents per sample
        return reports[name]["compute_forward_equivalents"] / len(reports[name]["images"])

    variant("plain", ["--scale", "0"])
    variant("steered", ["--scale", str(args.scale), "--steps", "all"])
    n = max(2, round(per_sample("steered") / per_sample("plain")))
    variant("best_of_n_value", ["--best-of", str(n), "--rank-by", "value"])
    variant("best_of_n_reward", ["--best-of", str(n), "--rank-by", "digit_alignment"])
    for scale in args.sweep_scales:
        variant(f"steer scale {scale:g} all", ["--scale", str(scale), "--steps", "all"])
    for window in args.sweep_steps:
        variant(f"steer scale {args.scale:g} {window}", ["--scale", str(args.scale), "--steps", window])
    project = {name: r["mean"]["digit_alignment_accuracy"] for name, r in reports.items()}
    independent = {name: judge_folder(svm, folder)["svm_accuracy"] for name, folder in folders.items()}
    main = ("plain", "steered", "best_of_n_value", "best_of_n_reward")
    return {
        "run": str(run), "scale": args.scale, "best_of_n": n, "seeds": [args.seed],
        "samples": len(reports["plain"]["images"]),
        **{f"{name}_accuracy": project[name] for name in main},
        "independent_judge": {f"{name}_accuracy": independent[name] for name in main},
        "compute_per_sample": {name: per_sample(name) for name in main},
        "sweep": [{"variant": name, "accuracy": project[name], "independent_accuracy": independent[name],
                   "compute_per_sample": per_sample(name)} for name in reports if name not in main],
    }


def table(results: dict) -> str:
    lines = ["| backbone | variant | compute / sample | project judge | independent judge |", "|---|---|---|---|---|"]
    for backbone, r in results.items():
        rows = [(name, r["compute_per_sample"][name], r[f"{name}_accuracy"], r["independent_judge"][f"{name}_accuracy"])
                for name in ("plain", "steered", "best_of_n_value", "best_of_n_reward")]
        rows += [(s["variant"], s["compute_per_sample"], s["accuracy"], s["independent_accuracy"]) for s in r["sweep"]]
        for name, compute, acc, ind in rows:
            label = {"steered": f"steered, scale {r['scale']:g}, all steps",
                     "best_of_n_value": f"best-of-{r['best_of_n']} by the critic's value",
                     "best_of_n_reward": f"best-of-{r['best_of_n']} by the reward (peeks at the judge)"}.get(name, name)
            lines.append(f"| {backbone} | {label} | {compute:.0f} | {acc:.3f} | {ind:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, metavar="BACKBONE=RUN_FOLDER",
                        help="finished runs of toy digit recipes (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--scale", type=float, default=4.0, help="the headline steering scale")
    parser.add_argument("--sweep-scales", type=float, nargs="*", default=[1.0, 16.0])
    parser.add_argument("--sweep-steps", nargs="*", default=["first:5", "last:5"])
    parser.add_argument("--prompts", default="toy:heldout")
    parser.add_argument("--samples-per-prompt", type=int, default=25)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each sampling call")
    parser.add_argument("--name", default="steering")
    parser.add_argument("--quick", action="store_true", help="2 held-out samples per prompt, no sweep")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples_per_prompt, args.sweep_scales, args.sweep_steps = 2, [], []
    runs = {}
    for spec in args.run:
        backbone, _, folder = spec.partition("=")
        if not folder or not (Path(folder) / "checkpoints" / "last.ckpt").is_file():
            parser.error(f"--run {spec!r}: expected BACKBONE=RUN_FOLDER with checkpoints/last.ckpt inside")
        runs[backbone] = Path(folder)
    from benchmarks.independent_judge import svm_judge

    start = time.time()
    svm, svm_heldout = svm_judge()
    results_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir = results_dir / "runs" / args.name
    results = {backbone: measure(backbone, folder, args, out_dir, svm) for backbone, folder in runs.items()}
    command = "python -m benchmarks.steering " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads})"
    report = {"command": command, "machine": machine, "minutes": (time.time() - start) / 60,
              "independent_judge_accuracy_on_real_digits": svm_heldout, **results}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    text = (f"`{command}` — {machine}, {time.strftime('%Y-%m-%d')}, {report['minutes']:.0f} min; held-out prompts × "
            f"{args.samples_per_prompt}, seed {args.seed}\n\n{table(results)}\n")
    (results_dir / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
