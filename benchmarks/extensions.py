"""The paper's extensions on the toy DiT: value pretraining, timestep conditioning, reward hacking, steering.

    python -m benchmarks.extensions [--task digits|pairs] [--iters 300] [--seeds 0] [--threads 2] [--groups ...]
        [--out NAME] [--quick]

Runs ``lit-diffac`` recipes in subprocesses and writes ``benchmarks/results/<NAME>.{csv,md}`` (default
``extensions``; with several seeds, a mean row per variant) and ``<NAME>_steering.png``:

Each run's final held-out alignment is reported by the task's judge (the reward's CNN) and, on the digits task, by
the independent judge the recipes evaluate with (``independent_acc``: an SVM on the 8×8 digits; a gap between the
two is a policy that learned the CNN):

1. value pretraining for 0 / short / long iterations before PPO → final held-out alignment, explained variance;
2. value head with vs without timestep conditioning → explained variance (overall, early, late) and alignment;
3. reward hacking: brightness alone vs brightness + digit alignment at weights 1 : w (``--weights``; one head per
   reward, one head on the weighted sum, or one head per reward with the advantages whitened together after
   weighting; ``--hacking`` picks which) → final brightness and held-out alignment accuracy;
4. test-time steering scale sweep on the trained policy vs best-of-N at equal backbone compute.

``--task pairs`` runs the same comparisons on the two-digit task (``recipes/toy_pairs/actor_critic_dit.yaml``; the
value-pretraining and multi-reward recipes of the digits task with the pair model, prompts and judge swapped in;
default results ``extensions_pairs``); its alignment columns are then the pair accuracy (both digits right).

``--report-from A.csv B.csv`` rebuilds the table from earlier runs (e.g. one process per seed, run side by side:
runs are deterministic for a seed, thread count and CPU, so this is what ``--seeds`` in one process gives); a row
of the same group, variant and seed in a later CSV replaces the earlier one.

``--quick`` shrinks everything (2 iterations, tiny batches) to check the pipeline; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DIT = str(ROOT / "recipes" / "toy" / "actor_critic_dit.yaml")
MULTI = str(ROOT / "recipes" / "toy" / "multi_reward_dit.yaml")
VALUE = str(ROOT / "recipes" / "toy" / "value_pretrain_dit.yaml")
JUDGE = "{class_path: lit_diffac.rewards.DigitAlignment}"
GROUPS = ("value_pretraining", "timestep_conditioning", "reward_hacking", "steering")
#: reward hacking's multi-reward variants: ``--hacking`` name → (label, overrides of the multi-reward recipe)
HACKING = {
    "per_reward": ("one head per reward", []),
    "sum": ("one head on the sum", ["--model.init_args.value_per_reward=false"]),
    "combined": ("one head per reward, whitened together",
                 ["--model.init_args.estimator.init_args.whitening=combined"]),
}
PAIR_JUDGE = "{class_path: lit_diffac.rewards.PairAlignment}"
#: Per task: the actor-critic recipe, overrides that turn the digits task's value-pretraining and multi-reward
#: recipes into the task's, the judge, its metric name and the held-out prompts.
TASKS = {
    "digits": {"recipe": DIT, "swap": [], "judge": JUDGE, "metric": "digit_alignment", "prompts": "toy:heldout"},
    "pairs": {"recipe": str(ROOT / "recipes" / "toy_pairs" / "actor_critic_dit.yaml"),
              "swap": ["--model.init_args.backbone.init_args.pretrained=toy-pairs-dit",
                       "--model.init_args.train_prompts=toy-pairs:train"],
              "judge": PAIR_JUDGE, "metric": "pair_alignment", "prompts": "toy-pairs:heldout"},
}


def lit_diffac(args: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "lit_diffac", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"lit-diffac {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def run(recipe: str, overrides: list[str], cfg) -> dict:
    """Run a recipe, return its summary.json (plus the checkpoint folder)."""
    stdout = lit_diffac(["run", recipe, "--trainer.enable_progress_bar=false",
                         f"--trainer.logger.init_args.save_dir={RESULTS / 'runs' / cfg.out}",
                         *cfg.common, *overrides], cfg.threads)
    path = Path(stdout.strip().splitlines()[-1].removeprefix("summary: "))
    summary = json.loads(path.read_text())
    summary["log_dir"] = str(path.parent)
    return summary


def fields(summary: dict, metric: str = "digit_alignment") -> dict:
    final, train = summary["final"], summary["final_train"]
    return {"alignment_acc": final.get(f"eval/{metric}_accuracy"),
            "independent_acc": final.get("eval/independent_judge_accuracy"), "brightness": final.get("eval/brightness"),
            "ev": summary["final_explained_variance"], "ev_early": train.get("train/explained_variance_early"),
            "ev_late": train.get("train/explained_variance_late"), "fit_s": summary["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits",
                        help="digits (recipes/toy) or pairs (the two-digit task, recipes/toy_pairs)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--pretrain", type=int, nargs=2, default=[15, 60], help="short and long value pretraining")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                        help="reward hacking: alignment weights w of brightness : alignment = 1 : w")
    parser.add_argument("--hacking", nargs="+", default=["brightness", *HACKING], choices=["brightness", *HACKING],
                        help="reward hacking: which runs (default: all): brightness alone, and at each weight one "
                             "head per reward (per_reward), one head on the sum (sum), one head per reward with the "
                             "advantages whitened together (combined: CriticGAE(whitening='combined'))")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS),
                        help="which comparisons to run (default: all)")
    parser.add_argument("--out", default=None,
                        help="stem of the result files in benchmarks/results/ (default: extensions, extensions_pairs)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-from", nargs="+", type=Path, metavar="CSV",
                        help="no runs: one table (mean rows per variant) from earlier runs' CSVs, e.g. one per seed "
                             "run side by side")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.out = args.out or ("extensions" if args.task == "digits" else "extensions_pairs")
    if args.report_from:
        # the same (group, variant, seed) in a later CSV replaces an earlier one's row (runs are deterministic)
        merged = {(r["group"], r["variant"], r["seed"]): r for path in args.report_from for r in read_rows(path)}
        write(list(merged.values()), args, 0.0)
        return 0
    recipe, swap, metric = task["recipe"], task["swap"], task["metric"]
    judge_only = [f"--model.init_args.rewards=[{task['judge']}]"] if args.task != "digits" else []
    # the multi-reward recipe's rewards and evaluation, for the task (digits: as the recipe has them)
    multi = [*swap, f"--model.init_args.rewards=[{{class_path: lit_diffac.rewards.Brightness}}, {task['judge']}]",
             f"--model.init_args.evaluation.init_args.prompts={task['prompts']}",
             "--model.init_args.evaluation.init_args.samples_per_prompt=10"] if args.task != "digits" else []
    tiny = ["--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20"] if args.quick else []
    eval_n = ["--model.init_args.evaluation.init_args.samples_per_prompt=1"] if args.quick else []
    iters = 2 if args.quick else args.iters
    pre_short, pre_long = (1, 2) if args.quick else args.pretrain
    rows: list[dict] = []
    started = time.time()
    for seed in args.seeds:
        args.common = [f"--seed_everything={seed}", f"--model.init_args.seed={seed}", *tiny]
        ac = [f"--trainer.max_epochs={iters}", "--model.init_args.evaluation.init_args.every_n_iterations=0",
              *eval_n]

        def record(group, variant, summary, **extra):
            rows.append({"group": group, "variant": variant, "seed": seed, **fields(summary, metric), **extra})
            print(json.dumps(rows[-1]), flush=True)

        # 1 + 2: value pretraining 0 / short / long; the 0 run is also the timestep-conditioned reference.
        base = run(recipe, ac, args) if {"value_pretraining", "timestep_conditioning", "steering"} & set(args.groups) \
            else None
        if "value_pretraining" in args.groups:
            record("value_pretraining", "0 iterations", base)
            for n in (pre_short, pre_long):
                head = RESULTS / "runs" / args.out / f"value_head_{n}_seed{seed}.safetensors"
                run(VALUE, [*swap, *judge_only, f"--trainer.max_epochs={n}", f"--model.init_args.output_path={head}"],
                    args)
                record("value_pretraining", f"{n} iterations",
                       run(recipe, [*ac, f"--model.init_args.value_head.init_args.init_from={head}"], args))
        if "timestep_conditioning" in args.groups:
            record("timestep_conditioning", "with (default)", base)
            record("timestep_conditioning", "without",
                   run(recipe, [*ac, "--model.init_args.value_head.init_args.timestep_conditioning=false"], args))
        # 3: reward hacking.
        if "reward_hacking" in args.groups:
            judges = task["judge"] + (", {class_path: lit_diffac.rewards.IndependentDigitJudge}"
                                      if args.task == "digits" else "")
            bright_only = [*ac, "--model.init_args.rewards=[{class_path: lit_diffac.rewards.Brightness}]",
                           f"--model.init_args.evaluation.init_args.rewards=[{judges}]"]
            if "brightness" in args.hacking:
                record("reward_hacking", "brightness only", run(recipe, bright_only, args))
            for w in args.weights:  # brightness : alignment = 1 : w
                weights = [*multi, *ac, f"--model.init_args.reward_weights=[1.0, {w}]"]
                for variant in args.hacking:
                    if variant in HACKING:
                        label, overrides = HACKING[variant]
                        record("reward_hacking", f"1:{w:g}, {label}", run(MULTI, [*weights, *overrides], args))
        # 4: steering sweep and best-of-N on the trained policy (the value-pretraining-0 run).
        if "steering" in args.groups:
            ckpt = Path(base["log_dir"]) / "checkpoints" / "last.ckpt"
            samples_per_prompt = 2 if args.quick else 25
            for scale in args.scales:
                rows.append(sample_row(seed, f"steer scale {scale:g}", ckpt, samples_per_prompt, args,
                                       ["--scale", str(scale), "--steps", "all"]))
            for n, rank in ((3, "value"), (3, metric)):
                rows.append(sample_row(seed, f"best-of-{n} by {rank}", ckpt, samples_per_prompt, args,
                                       ["--best-of", str(n), "--rank-by", rank]))
    write(rows, args, time.time() - started)
    return 0


def sample_row(seed: int, variant: str, ckpt: Path, samples_per_prompt: int, args, extra: list[str]) -> dict:
    task = TASKS[getattr(args, "task", "digits")]
    out = RESULTS / "runs" / args.out / f"samples_{variant.replace(' ', '_')}_seed{seed}"
    lit_diffac(["sample", "--config", task["recipe"], "--ckpt", str(ckpt), "--prompts", task["prompts"], "--seed",
                "12345", "--samples-per-prompt", str(samples_per_prompt), "--out", str(out), *extra,
                "--trainer.logger=false"], args.threads)
    report = json.loads((out / "rewards.json").read_text())
    row = {"group": "steering", "variant": variant, "seed": seed,
           "alignment_acc": report["mean"][f"{task['metric']}_accuracy"],
           "digit_probability" if task["metric"] == "digit_alignment" else "pair_probability":
               report["mean"][task["metric"]],
           "compute_per_sample": report["compute_forward_equivalents"] / len(report["images"])}
    print(json.dumps(row), flush=True)
    return row


def write(rows: list[dict], args, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with (RESULTS / f"{args.out}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    command = ("python -m benchmarks.extensions " + " ".join(sys.argv[1:])).strip()
    sources = getattr(args, "report_from", None)
    how = (f"a table of the runs in {', '.join(str(p) for p in sources)} (their own headers give threads "
           "and time)" if sources else f"OMP_NUM_THREADS={args.threads}, {seconds / 60:.0f} min")
    lines = [f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, {how}", ""]
    for group in dict.fromkeys(r["group"] for r in rows):
        sub = [r for r in rows if r["group"] == group]
        cols = [k for k in keys if k not in ("group",) and any(r.get(k) is not None for r in sub)]
        lines += [f"**{group}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sub:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")
        if len({r["seed"] for r in sub}) > 1:  # mean over seeds per variant
            for variant in dict.fromkeys(r["variant"] for r in sub):
                same = [r for r in sub if r["variant"] == variant]
                mean = {k: sum(r[k] for r in same) / len(same) for k in cols
                        if all(isinstance(r.get(k), (int, float)) for r in same) and k != "seed"}
                lines.append("| " + " | ".join(
                    "mean" if k == "seed" else variant if k == "variant" else _fmt(mean.get(k)) for k in cols) + " |")
        lines.append("")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines))
    if any(r["variant"].startswith("steer") for r in rows):
        plot(rows, RESULTS / f"{args.out}_steering.png")
    print("\n".join(lines))


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's CSV, numbers as numbers and empty cells as ``None``."""

    def value(key: str, cell: str):
        if cell == "":
            return None
        if key == "seed":
            return int(cell)
        try:
            return float(cell)
        except ValueError:
            return cell

    with path.open(newline="") as fh:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steer = [r for r in rows if r["variant"].startswith("steer")]
    best = [r for r in rows if r["variant"].startswith("best-of")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["compute_per_sample"] for r in steer], [r["alignment_acc"] for r in steer], "o-", label="steering")
    for r in steer:
        ax.annotate(r["variant"].split()[-1], (r["compute_per_sample"], r["alignment_acc"]), fontsize=7)
    ax.plot([r["compute_per_sample"] for r in best], [r["alignment_acc"] for r in best], "s", label="best-of-N")
    ax.set_xlabel("backbone compute per sample (forward equivalents)")
    ax.set_ylabel("held-out alignment accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
