"""Run one recipe under several seeds and tabulate the ``summary.json`` of each run.

    python -m benchmarks.seeds recipes/toy/actor_critic_dit.yaml --seeds 0 1 2 [--threads 2] [--jobs 1]
        [-- overrides...]

Each seed runs ``lit-diffac run RECIPE --seed_everything=S --model.init_args.seed=S`` in a subprocess (so a
run's wall time is its own; ``--jobs N`` runs N side by side, whose wall times then include sharing the CPU),
then a Markdown table and a JSON file go to ``benchmarks/results/``:
held-out alignment before and after, the gain, the critic's final explained variance (overall and per third
of the chain), samples seen and wall time, plus mean and spread (min–max) over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_seed(recipe: str, seed: int, threads: int, overrides: list[str], save_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lit_diffac", "run", recipe, f"--seed_everything={seed}",
           f"--model.init_args.seed={seed}", "--trainer.enable_progress_bar=false",
           f"--trainer.logger.init_args.save_dir={save_dir}", *overrides]
    start = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    last = out.stdout.strip().splitlines()[-1]
    summary = json.loads(Path(last.removeprefix("summary: ")).read_text())
    summary["process_wall_time_s"] = time.time() - start
    return summary


INDEPENDENT = "eval/independent_judge_accuracy"


def row(seed: int, s: dict) -> dict:
    acc = next(k for k in s["final"] if k.endswith("_accuracy") and k != INDEPENDENT)
    train = s["final_train"]
    return {"seed": seed, "base": s["base"][acc], "final": s["final"][acc], "gain": s["final"][acc] - s["base"][acc],
            "independent_base": s["base"].get(INDEPENDENT), "independent": s["final"].get(INDEPENDENT),
            "ev": s["final_explained_variance"], "ev_early": train.get("train/explained_variance_early"),
            "ev_late": train.get("train/explained_variance_late"), "samples": s["samples_seen"],
            "fit_s": s["wall_time_s"], "process_s": s["process_wall_time_s"]}


def table(rows: list[dict]) -> str:
    """Markdown table of :func:`row` dicts with mean / min / max rows; the independent judge's columns
    (``IndependentDigitJudge`` in the recipe's evaluation) when every run has them."""
    judged = all(r.get("independent") is not None for r in rows)
    head = "| seed | base acc | final acc | gain (pts) |" + (" independent judge: base / final |" if judged else "") + \
        " EV | EV early | EV late | samples | fit time (s) | process time (s) |"
    lines = [head, "|" + "---|" * (11 if judged else 10)]
    keys = ("base", "final", "gain", *(("independent_base", "independent") if judged else ()), "ev", "ev_early",
            "ev_late", "fit_s", "process_s")
    aggregates = [(name, {k: fn([r[k] for r in rows]) for k in keys})
                  for name, fn in (("mean", statistics.mean), ("min", min), ("max", max))]
    for label, r, samples in [*((r["seed"], r, r["samples"]) for r in rows), *((n, a, "") for n, a in aggregates)]:
        judge = f" {r['independent_base']:.3f} / {r['independent']:.3f} |" if judged else ""
        lines.append(f"| {label} | {r['base']:.3f} | {r['final']:.3f} | {100 * r['gain']:+.1f} |{judge} {r['ev']:.2f} | "
                     f"{r['ev_early']:.2f} | {r['ev_late']:.2f} | {samples} | {r['fit_s']:.0f} | {r['process_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--out", default=None, help="result name (default: the recipe's stem)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, after --")
    # argparse gives a ``nargs="*"`` positional its values right after the recipe, so overrides after ``--`` (which
    # come after the options) would be refused: parse them apart
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides += argv[cut + 1:]
    name = args.out or Path(args.recipe).stem
    RESULTS.mkdir(parents=True, exist_ok=True)
    def one(seed: int) -> dict:
        result = row(seed, run_seed(args.recipe, seed, args.threads, args.overrides, RESULTS / "runs"))
        print(json.dumps(result), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, args.seeds))
    command = "python -m benchmarks.seeds " + " ".join(argv)
    header = (f"`{command}` — {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
              f"{time.strftime('%Y-%m-%d')}, OMP_NUM_THREADS={args.threads}, {args.jobs} run(s) at a time\n\n")
    (RESULTS / f"{name}_seeds.md").write_text(header + table(rows) + "\n")
    (RESULTS / f"{name}_seeds.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(header + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
