"""Sample efficiency: held-out alignment vs generated samples for actor-critic, GRPO and DDPO.

    python -m benchmarks.sample_efficiency [--task digits|pairs] [--backbones dit unet] [--seeds 0 1 2]
        [--iterations 300] [--eval-every 25] [--jobs 2] [--threads 1] [--accelerator cpu|gpu] [--quick]

Every (backbone, method, seed) is one ``lit-diffac run recipes/toy/<method>_<backbone>.yaml`` (``--task pairs``:
``recipes/toy_pairs/``, the two-digit task) in its own process (``--jobs`` at a time), with the same sample budget
(``batch_size`` 32 × ``--iterations``), the recipes' learning rates and PPO settings (identical across methods:
only the advantage estimator differs) and the module's built-in held-out evaluation every ``--eval-every``
iterations (seed 12345, CFG off; digits: 20 prompts × ``--eval-samples`` samples, default 25; pairs: 80 prompts,
40 seen and 40 unseen pairs, default 10). Outputs, in ``benchmarks/results/``:

* ``<name>.csv`` (default name ``sample_efficiency``, ``sample_efficiency_pairs`` for ``--task pairs``): one row
  per evaluation (backbone, method, seed, iteration, samples, accuracy, mean reward; pairs: also the accuracy on
  seen and on unseen pairs);
* ``<name>.png``: mean accuracy over seeds vs samples (band: min–max), one panel per backbone;
* ``<name>.md``: accuracy per method at the largest budget every run reached, and the headline figure — the
  samples the actor-critic needs to reach GRPO's accuracy at that budget, as a fraction of it (the linearly
  interpolated seed-mean curve; "not reached" when it never does within the budget).

``--time-limit`` stops runs still going (their curves end early and the comparison uses the budget all runs
reached); ``--report-from CSV`` redoes the table, plot and headline of an earlier run without running anything.
``--quick`` (one seed, DiT only, 2 iterations, a tiny evaluation, written under ``results/quick/``) checks the
pipeline end to end in about a minute; a test runs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "toy"
METHODS = {"actor_critic": "actor-critic (ours)", "grpo": "GRPO", "ddpo": "DDPO"}
ACCURACY = "eval/digit_alignment_accuracy"
REWARD = "eval/digit_alignment"


@dataclass(frozen=True)
class Task:
    """A toy task: its recipes' folder, the held-out metrics read from each run, default evaluation samples."""

    recipes: Path
    accuracy: str
    reward: str
    eval_samples: int
    name: str
    #: extra accuracies recorded per evaluation: CSV column → metric key
    extra: tuple[tuple[str, str], ...] = ()


TASKS = {
    "digits": Task(RECIPES, ACCURACY, REWARD, 25, "sample_efficiency"),
    "pairs": Task(RECIPES.parent / "toy_pairs", "eval/pair_alignment_accuracy", "eval/pair_alignment", 10,
                  "sample_efficiency_pairs", (("accuracy_seen", "eval/pair_alignment_accuracy_seen"),
                                              ("accuracy_unseen", "eval/pair_alignment_accuracy_unseen"))),
}


EVAL_LINE = re.compile(r"^\[eval ([\w-]+) @ iteration (\d+), (\d+) samples\] (.*)$")


def command(backbone: str, method: str, seed: int, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The ``lit-diffac run`` command line of one (backbone, method, seed)."""
    recipe = TASKS[args.task].recipes / f"{method}_{backbone}.yaml"
    return [sys.executable, "-m", "lit_diffac", "run", str(recipe), f"--seed_everything={seed}",
            f"--model.init_args.seed={seed}", f"--trainer.max_epochs={args.iterations}",
            f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
            # the module's own held-out evaluation only: no recipe callbacks (sample grids), no checkpoints
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={out_dir / 'runs'}",
            f"--trainer.logger.init_args.name={method}_{backbone}_seed{seed}",
            f"--model.init_args.evaluation.init_args.every_n_iterations={args.eval_every}",
            f"--model.init_args.evaluation.init_args.samples_per_prompt={args.eval_samples}",
            # alignment only, as in the earlier results (diversity is NaN with one sample per prompt)
            "--model.init_args.evaluation.init_args.diversity=false", *args.overrides]


def parse_log(text: str) -> tuple[list[dict], dict | None]:
    """A run's log → its evaluations so far (from the module's ``[eval …]`` lines) and its summary if it ended."""
    evals, seen = [], set()
    for line in text.splitlines():
        match = EVAL_LINE.match(line.strip())
        if match:
            label, iteration, samples, rest = match.groups()
            if int(samples) in seen:  # one evaluation per sample count (a duplicate line is dropped)
                continue
            seen.add(int(samples))
            metrics = {f"eval/{k}": float(v) for k, v in (item.rsplit(" ", 1) for item in rest.split(", "))}
            evals.append({"label": label, "iteration": int(iteration), "samples": int(samples), **metrics})
    lines = text.strip().splitlines()
    summary = None
    if lines and lines[-1].startswith("summary: "):
        summary = json.loads(Path(lines[-1].removeprefix("summary: ")).read_text())
    return evals, summary


def run_all(jobs: list[tuple[str, str, int]], args: argparse.Namespace, out_dir: Path) -> dict:
    """Run every job, ``args.jobs`` at a time; past ``args.time_limit`` seconds, stop what is still running.

    Returns ``{job: {"evals": [...], "summary": dict | None, "wall_s": float, "complete": bool}}``; a run that
    failed raises with the end of its log.
    """
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    pending, running, results = list(jobs), {}, {}
    start = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            log = out_dir / "runs" / ("{1}_{0}_seed{2}.log".format(*job))
            handle = log.open("w")
            running[job] = (subprocess.Popen(command(*job, args, out_dir), env=env, stdout=handle,
                                             stderr=subprocess.STDOUT), handle, log, time.time())
        time.sleep(1.0)
        overtime = args.time_limit and time.time() - start > args.time_limit
        for job, (proc, handle, log, began) in list(running.items()):
            if proc.poll() is None and not overtime:
                continue
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            handle.close()
            del running[job]
            text = log.read_text()
            evals, summary = parse_log(text)
            if proc.returncode not in (0, None) and not overtime:
                raise RuntimeError(f"{job} failed (exit {proc.returncode}); end of {log}:\n" + text[-3000:])
            results[job] = {"evals": evals, "summary": summary, "wall_s": time.time() - began,
                            "complete": summary is not None}
            final = evals[-1][TASKS[args.task].accuracy] if evals else float("nan")
            print(f"{job}: {'done' if summary else 'STOPPED'} at iteration {evals[-1]['iteration'] if evals else 0},"
                  f" accuracy {final:.3f}, {results[job]['wall_s']:.0f} s", flush=True)
        if overtime:
            for job in pending:
                results[job] = {"evals": [], "summary": None, "wall_s": 0.0, "complete": False}
            pending.clear()
    return results


def curve_rows(backbone: str, method: str, seed: int, result: dict, task: str = "digits") -> list[dict]:
    spec = TASKS[task]
    return [{"backbone": backbone, "method": method, "seed": seed, "iteration": e["iteration"],
             "samples": e["samples"], "accuracy": e[spec.accuracy], "reward": e[spec.reward],
             **{column: e[key] for column, key in spec.extra}}
            for e in result["evals"]]


def mean_curve(rows: list[dict], backbone: str, method: str,
               budget: float = math.inf) -> list[tuple[int, float, float, float]]:
    """``(samples, mean, min, max)`` of accuracy over seeds at each evaluation point up to ``budget`` samples.

    Only points that every seed of the method reached count (a run stopped early shortens the curve rather
    than biasing its mean).
    """
    seeds = {r["seed"] for r in rows if r["backbone"] == backbone and r["method"] == method}
    points: dict[int, list[float]] = {}
    for r in rows:
        if r["backbone"] == backbone and r["method"] == method and r["samples"] <= budget:
            points.setdefault(r["samples"], []).append(r["accuracy"])
    return [(s, statistics.mean(v), min(v), max(v)) for s, v in sorted(points.items()) if len(v) == len(seeds)]


def common_budget(rows: list[dict], backbone: str, methods: list[str]) -> int:
    """The largest sample count that every run of every method reached (the same-budget comparison point)."""
    return min(mean_curve(rows, backbone, m)[-1][0] for m in methods if mean_curve(rows, backbone, m))


def samples_to_reach(curve: list[tuple[int, float, float, float]], target: float) -> float | None:
    """First sample count at which the (linearly interpolated) mean curve reaches ``target``."""
    if curve and curve[0][1] >= target:
        return float(curve[0][0])
    for (s0, a0, *_), (s1, a1, *_) in zip(curve, curve[1:]):
        if a1 >= target:
            return s0 + (s1 - s0) * (target - a0) / (a1 - a0)
    return None


def headline(rows: list[dict], backbone: str) -> dict:
    """Samples the actor-critic needs to reach GRPO's final accuracy, at the budget both reached."""
    budget = common_budget(rows, backbone, ["actor_critic", "grpo"])
    ac, grpo = mean_curve(rows, backbone, "actor_critic", budget), mean_curve(rows, backbone, "grpo", budget)
    target, spent = grpo[-1][1], grpo[-1][0]
    needed = samples_to_reach(ac, target)
    return {"backbone": backbone, "grpo_final": target, "grpo_samples": spent, "actor_critic_samples": needed,
            "fraction": None if needed is None or spent == 0 else needed / spent}


def plot(rows: list[dict], backbones: list[str], methods: list[str], path: Path, task: str = "digits") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        for method in methods:
            curve = mean_curve(rows, backbone, method)
            if not curve:
                continue
            xs = [c[0] for c in curve]
            ax.plot(xs, [c[1] for c in curve], marker="o", ms=3, label=METHODS[method])
            ax.fill_between(xs, [c[2] for c in curve], [c[3] for c in curve], alpha=0.2)
        ax.set_title({"dit": "toy DiT (flow SDE)", "unet": "toy UNet (DDIM)"}.get(backbone, backbone))
        ax.set_xlabel("generated training samples")
        ax.set_ylabel("held-out accuracy (both digits right)" if task == "pairs" else "held-out alignment accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], results: dict, backbones: list[str], methods: list[str], command: str,
           machine: str) -> str:
    groups = [c for c in ("accuracy_seen", "accuracy_unseen") if rows and c in rows[0]]  # the pair task's
    lines = [f"`{command}` — {machine}, {time.strftime('%Y-%m-%d')}", "",
             "| backbone | method | base acc | budget (samples) | acc at budget: mean over seeds | min–max | "
             + "".join(f"{c.replace('accuracy_', '')} pairs: base → at budget | " for c in groups)
             + "runs (complete) | last iteration | critic EV (end) | time per run (s) |",
             "|---|---|---|---|---|---|" + "---|" * len(groups) + "---|---|---|---|"]
    for backbone in backbones:
        present = [m for m in methods if mean_curve(rows, backbone, m)]
        if not present:
            continue
        budget = common_budget(rows, backbone, present)
        for method in present:
            curve = mean_curve(rows, backbone, method, budget)
            at_budget = [r["accuracy"] for r in rows if r["backbone"] == backbone and r["method"] == method
                         and r["samples"] == curve[-1][0]]
            runs = [r for (b, m, _), r in results.items() if b == backbone and m == method and r["evals"]]
            iters = "/".join(map(str, sorted({r["evals"][-1]["iteration"] for r in runs}))) or "—"
            evs = [r["summary"]["final_explained_variance"] for r in runs
                   if r["summary"] and r["summary"]["final_explained_variance"] is not None]
            ev = f"{statistics.mean(evs):.2f}" if evs else "—"
            wall = f"{statistics.mean(r['wall_s'] for r in runs):.0f}" if runs else "—"
            complete = f"{len(runs)} ({sum(r['complete'] for r in runs)})" if runs else "—"
            split = "".join(f"{group_mean(rows, backbone, method, c, curve[0][0]):.3f} → "
                            f"{group_mean(rows, backbone, method, c, curve[-1][0]):.3f} | " for c in groups)
            lines.append(f"| {backbone} | {METHODS[method]} | {curve[0][1]:.3f} | {curve[-1][0]} | "
                         f"{curve[-1][1]:.3f} | {min(at_budget):.3f}–{max(at_budget):.3f} | {split}{complete} | "
                         f"{iters} | {ev} | {wall} |")
    lines += ["", "| backbone | GRPO final acc | GRPO samples | actor-critic samples to reach it | fraction |",
              "|---|---|---|---|---|"]
    for backbone in backbones:
        if "grpo" in methods and "actor_critic" in methods and mean_curve(rows, backbone, "grpo") \
                and mean_curve(rows, backbone, "actor_critic"):
            h = headline(rows, backbone)
            reached = "not reached" if h["actor_critic_samples"] is None else f"{h['actor_critic_samples']:.0f}"
            frac = "—" if h["fraction"] is None else f"{h['fraction']:.2f}"
            lines.append(f"| {backbone} | {h['grpo_final']:.3f} | {h['grpo_samples']} | {reached} | {frac} |")
    return "\n".join(lines) + "\n"


def group_mean(rows: list[dict], backbone: str, method: str, column: str, samples: int) -> float:
    """Mean over seeds of ``column`` (e.g. the pair task's ``accuracy_unseen``) at ``samples``."""
    values = [r[column] for r in rows if r["backbone"] == backbone and r["method"] == method
              and r["samples"] == samples]
    return statistics.mean(values) if values else math.nan


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``sample_efficiency.csv`` (to redo the report and plot of an earlier run)."""
    floats = ("accuracy", "reward", "accuracy_seen", "accuracy_unseen")
    with path.open() as fh:
        return [{**r, "seed": int(r["seed"]), "iteration": int(r["iteration"]), "samples": int(r["samples"]),
                 **{k: float(r[k]) for k in floats if k in r}} for r in csv.DictReader(fh)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits",
                        help="digits (recipes/toy) or pairs (recipes/toy_pairs: the two-digit task)")
    parser.add_argument("--backbones", nargs="+", default=["dit", "unet"], choices=["dit", "unet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="held-out samples per prompt (default: digits 25 x 20 prompts; pairs 10 x 80 prompts)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of each run (cpu, gpu)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds; then stop the runs still going and report them as incomplete (0: none)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--name", default=None,
                        help="stem of the result files (default: sample_efficiency, sample_efficiency_pairs)")
    parser.add_argument("--report-from", type=Path, default=None, metavar="CSV",
                        help="no runs: redo the table, plot and headline from an earlier run's CSV")
    parser.add_argument("--quick", action="store_true", help="one seed, DiT only, 2 iterations, a tiny evaluation")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, after --")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.name = args.name or task.name
    args.eval_samples = args.eval_samples or task.eval_samples
    out_dir = Path(args.out) if args.out else RESULTS
    if args.quick:
        args.backbones, args.seeds, args.iterations, args.eval_every, args.eval_samples = ["dit"], [0], 2, 1, 1
        out_dir = Path(args.out) if args.out else RESULTS / "quick"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = "python -m benchmarks.sample_efficiency " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_from:
        rows, results = read_csv(args.report_from), {}
        earlier = args.report_from.with_suffix(".json")
        machine = json.loads(earlier.read_text())["machine"] if earlier.is_file() else "see the CSV's run"
        machine += f"; report redone from {args.report_from.name}"
    else:
        jobs = [(b, m, s) for b in args.backbones for m in args.methods for s in args.seeds]
        results = run_all(jobs, args, out_dir)
        rows = [row for (b, m, s), r in results.items() for row in curve_rows(b, m, s, r, args.task)]
        with (out_dir / f"{args.name}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["backbone", "method", "seed", "iteration", "samples", "accuracy",
                                                    "reward", *(column for column, _ in task.extra)])
            writer.writeheader()
            writer.writerows(rows)
        machine = f"{platform.node()} ({os.cpu_count()} CPUs, accelerator={args.accelerator}"
        if args.accelerator == "gpu":
            import torch

            machine += f", {torch.cuda.get_device_name(0)}"
        machine += f", OMP_NUM_THREADS={args.threads}, {args.jobs} runs at a time)"
    backbones = [b for b in args.backbones if any(r["backbone"] == b for r in rows)]
    plot(rows, backbones, args.methods, out_dir / f"{args.name}.png", args.task)
    text = report(rows, results, backbones, args.methods, cmd, machine)
    (out_dir / f"{args.name}.md").write_text(text)
    headlines = [headline(rows, b) for b in backbones
                 if {"grpo", "actor_critic"} <= set(args.methods) and mean_curve(rows, b, "grpo")
                 and mean_curve(rows, b, "actor_critic")]
    (out_dir / f"{args.name}{'_report' if args.report_from else ''}.json").write_text(json.dumps(
        {"command": cmd, "machine": machine, "headline": headlines,
         "runs": {"/".join(map(str, k)): {"complete": r["complete"], "wall_s": r["wall_s"], "evals": r["evals"],
                                          "final_explained_variance": (r["summary"] or {}).get(
                                              "final_explained_variance")} for k, r in results.items()}},
        indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
