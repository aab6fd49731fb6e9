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
  per evaluation (backbone, method, seed, iteration, samples, accuracy, mean reward; digits: also the independent
  judge's accuracy, ``independent_accuracy``; pairs: the accuracy on seen and on unseen pairs);
* ``<name>.png``: mean accuracy over seeds vs samples (band: min–max), one panel per backbone;
* ``<name>.md``: accuracy per method at the largest budget every run reached, and the headline figure — the
  samples the actor-critic needs to reach GRPO's accuracy at that budget, as a fraction of it (the linearly
  interpolated seed-mean curve; "not reached" when it never does within the budget), beside GRPO's gain over the
  base model (``grpo_gain``: when GRPO does not learn, the crossing measures noise, not speed).

**Tuned protocol** (``--grid KEY=V1,V2,… [KEY=…]``, e.g. ``--grid actor_lr=2.5e-5,5e-5,1e-4,2e-4``): every
method gets the same grid (the product of the listed recipe values), run on one seed (``--tune-seed``, default the
first of ``--seeds``); each (backbone, method) keeps the configuration with the best accuracy at the budget all
its grid runs reached (ties: the best mean over the curve); then the other seeds run with that configuration.
The CSV has every run (``config``, ``selected`` columns); the table, plot and headline use the selected ones, and
the report lists the grid. ``KEY`` is a ``model.init_args`` key (``actor_lr``) or a full dotted path
(``model.init_args.estimator.init_args.lam``).

**Transferred choice** (``--selected-from JSON``): every method runs, on every seed, the configuration an earlier
tuned run chose for it (that run's ``<name>.json``, ``protocol.selected``; a backbone it did not tune takes the
method's choice on the backbone it did). Every method gets the same tuning budget, none on this setting: e.g. the
sparse reward with the learning rates tuned on the dense one.

Each evaluation also records the run's training time so far (``train_seconds``: the module's per-iteration wall
time summed, evaluations not counted), so the headline gives the same crossing in training time too:
``time_fraction`` = actor-critic seconds to reach GRPO's final accuracy / GRPO's seconds (< 1: ahead at equal
wall-clock). Runs side by side share the machine, so their clocks compare only when nothing else runs;
``--time-iterations N`` times N iterations of each backbone's and method's chosen configuration afterwards, one
run at a time,
and uses those per-iteration times instead (with ``--report-from``: without rerunning the comparison);
``--seconds-per-iteration METHOD=S …`` (or ``BACKBONE/METHOD=S`` for one backbone of a merged report) gives such
times directly.

``--reuse CSV …`` takes the complete runs of earlier CSVs instead of running them again (runs are deterministic
for a given seed and thread count, so the result is the same; e.g. a grid around runs already done, or a grid run
on one seed and its choice run apart on the others: ``--grid … --seeds 0 1 2 --reuse grid.csv seeds.csv`` runs
nothing and reports them as one tuned result). A later CSV's copy of a run wins; a CSV's results JSON beside it,
where there is one, gives its runs' wall time and final explained variance. It is for runs of the same task,
budget and overrides; the tool cannot check the overrides.

Each run that finishes is also appended to ``runs/<name>_progress.csv`` at once, so a benchmark that is stopped
(or whose machine goes away) keeps its complete runs: ``--reuse`` that file to go on where it stopped.

``--keep-checkpoints`` makes each run write its final state to ``runs/<run>/version_0/checkpoints/last.ckpt``
(beside its ``config.yaml``: a run folder ``benchmarks.steering --run`` takes).

``--time-limit`` stops runs still going (their curves end early and the comparison uses the budget all runs
reached); ``--report-from CSV`` redoes the table, plot and headline of an earlier run without running anything.
``--report-from A.csv B.csv …`` merges runs of the same protocol (e.g. one tuned run per backbone, run one after
the other) into one result, ``<name>.{csv,json,md,png}`` (``--name`` required), as if they had run as one; a
later CSV's runs of a (backbone, method) replace an earlier one's (a method's variant, run apart with its own
overrides, against the others). Different backbones may come with different grids (``protocol.per_backbone`` in
the JSON); one backbone's runs must share one.
``--quick`` (one seed, DiT only, 2 iterations, a tiny evaluation, written under ``results/quick/``) checks the
pipeline end to end in about a minute; a test runs it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.curves import METHODS, headline, mean_curve, plot, report, select

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "toy"
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
    #: the one held-out prompt of ``--time-iterations`` runs
    timing_prompt: str = "the digit 3"


TASKS = {
    "digits": Task(RECIPES, ACCURACY, REWARD, 25, "sample_efficiency",
                   (("independent_accuracy", "eval/independent_judge_accuracy"),)),
    "pairs": Task(RECIPES.parent / "toy_pairs", "eval/pair_alignment_accuracy", "eval/pair_alignment", 10,
                  "sample_efficiency_pairs", (("accuracy_seen", "eval/pair_alignment_accuracy_seen"),
                                              ("accuracy_unseen", "eval/pair_alignment_accuracy_unseen")),
                  "3 and 7"),
}


EVAL_LINE = re.compile(r"^\[eval ([\w-]+) @ iteration (\d+), (\d+) samples\] (.*)$")


def parse_grid(specs: list[str]) -> list[str]:
    """``--grid`` values → configuration labels, the product of every key's values.

    ``["actor_lr=1e-4,2e-4", "k=a"]`` → ``["actor_lr=1e-4 k=a", "actor_lr=2e-4 k=a"]``; no grid → ``[""]`` (the
    recipes as they are).
    """
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values or "" in values.split(","):
            raise SystemExit(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. actor_lr=2.5e-5,5e-5,1e-4,2e-4)")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [" ".join(items) for items in itertools.product(*axes)] if axes else [""]


def config_overrides(config: str) -> list[str]:
    """A configuration label → recipe overrides (a bare key is a ``model.init_args`` key)."""
    overrides = []
    for item in config.split():
        key, value = item.split("=", 1)
        path = key if key.startswith(("model.", "trainer.", "seed_everything")) else f"model.init_args.{key}"
        overrides.append(f"--{path}={value}")
    return overrides


def run_name(backbone: str, method: str, seed: int, config: str = "") -> str:
    """The log and logger name of one run: ``grpo_dit_seed0`` (``…_actor_lr=1e-4`` with a configuration)."""
    return f"{method}_{backbone}_seed{seed}" + (("_" + re.sub(r"[^\w.=-]+", "_", config)) if config else "")


def command(backbone: str, method: str, seed: int, args: argparse.Namespace, out_dir: Path,
            config: str = "") -> list[str]:
    """The ``lit-diffac run`` command line of one (backbone, method, seed, configuration)."""
    recipe = TASKS[args.task].recipes / f"{method}_{backbone}.yaml"
    return [sys.executable, "-m", "lit_diffac", "run", str(recipe), f"--seed_everything={seed}",
            f"--model.init_args.seed={seed}", f"--trainer.max_epochs={args.iterations}",
            f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
            # the module's own held-out evaluation only: no recipe callbacks (sample grids), no checkpoints but,
            # with --keep-checkpoints, the final state (checkpoints/last.ckpt, e.g. for benchmarks.steering)
            *(["--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
               f"{{every_n_epochs: {args.iterations}, filename: last, enable_version_counter: false}}}}]"]
              if getattr(args, "keep_checkpoints", False) else
              ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]),
            f"--trainer.logger.init_args.save_dir={out_dir / 'runs'}",
            f"--trainer.logger.init_args.name={run_name(backbone, method, seed, config)}",
            f"--model.init_args.evaluation.init_args.every_n_iterations={args.eval_every}",
            f"--model.init_args.evaluation.init_args.samples_per_prompt={args.eval_samples}",
            # alignment only, as in the earlier results (diversity is NaN with one sample per prompt)
            "--model.init_args.evaluation.init_args.diversity=false", *args.overrides, *config_overrides(config)]


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


def train_seconds(evals: list[dict], summary: dict | None) -> None:
    """Give each evaluation its run's training time so far (``summary.json``'s ``eval_train_seconds``; NaN for a
    run stopped early, which wrote no summary)."""
    history = (summary or {}).get("eval_history", [])
    times = {e["samples_seen"]: s for e, s in zip(history, (summary or {}).get("eval_train_seconds", []))}
    for e in evals:
        e["train_seconds"] = float(times.get(e["samples"], math.nan))


def run_all(jobs: list[tuple[str, str, int, str]], args: argparse.Namespace, out_dir: Path,
            start: float | None = None) -> dict:
    """Run every job ``(backbone, method, seed, config)``, ``args.jobs`` at a time; ``args.time_limit`` seconds
    after ``start`` (default: now), stop what is still running.

    Returns ``{job: {"evals": [...], "summary": dict | None, "wall_s": float, "complete": bool}}``; a run that
    failed raises with the end of its log.
    """
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    pending, running, results = list(jobs), {}, {}
    start = time.time() if start is None else start
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            backbone, method, seed, config = job
            log = out_dir / "runs" / f"{run_name(*job)}.log"
            handle = log.open("w")
            running[job] = (subprocess.Popen(command(backbone, method, seed, args, out_dir, config), env=env,
                                             stdout=handle,
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
            train_seconds(evals, summary)
            if proc.returncode not in (0, None) and not overtime:
                raise RuntimeError(f"{job} failed (exit {proc.returncode}); end of {log}:\n" + text[-3000:])
            results[job] = {"evals": evals, "summary": summary, "wall_s": time.time() - began,
                            "complete": summary is not None}
            if results[job]["complete"]:
                append_progress(out_dir / "runs" / f"{args.name}_progress.csv", args.task,
                                curve_rows(*job[:3], results[job], args.task, job[3]))
            final = evals[-1][TASKS[args.task].accuracy] if evals else float("nan")
            print(f"{job}: {'done' if summary else 'STOPPED'} at iteration {evals[-1]['iteration'] if evals else 0},"
                  f" accuracy {final:.3f}, {results[job]['wall_s']:.0f} s", flush=True)
        if overtime:
            for job in pending:
                results[job] = {"evals": [], "summary": None, "wall_s": 0.0, "complete": False}
            pending.clear()
    return results


def csv_fields(task: str) -> list[str]:
    """The columns of ``<name>.csv`` (and of the progress file ``runs/<name>_progress.csv``)."""
    return ["backbone", "method", "seed", "config", "selected", "iteration", "samples", "train_seconds", "accuracy",
            "reward", *(column for column, _ in TASKS[task].extra)]


def write_csv(path: Path, task: str, rows: list[dict]) -> None:
    """``<name>.csv``: one row per evaluation, the columns of :func:`csv_fields`."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_fields(task), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def append_progress(path: Path, task: str, rows: list[dict]) -> None:
    """Add a finished run's rows to the progress file, so that an interrupted benchmark loses no complete run:
    ``--reuse runs/<name>_progress.csv`` takes them up again."""
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f for f in csv_fields(task) if f != "selected"])
        if new:
            writer.writeheader()
        writer.writerows(rows)


def reused_results(paths: Path | list[Path], task: str, iterations: int) -> dict:
    """``--reuse``: the complete runs of earlier CSVs (their last evaluation at ``iterations``), as
    :func:`run_all` returns them, keyed by ``(backbone, method, seed, config)``; a later CSV's copy of a run wins.
    Where a CSV has its results JSON beside it, the run's ``wall_s`` and final explained variance come from there
    (:func:`recorded_runs`; else NaN and ``summary`` ``None``)."""
    spec, results = TASKS[task], {}
    for path in [paths] if isinstance(paths, Path) else paths:
        by_run = {}
        for r in read_csv(path):
            by_run.setdefault((r["backbone"], r["method"], r["seed"], r.get("config", "")), []).append(r)
        recorded = recorded_runs(results_json(path))
        for job, rows in by_run.items():
            # a progress file can hold a run twice (the benchmark run again): its last rows win
            rows = sorted({r["iteration"]: r for r in rows}.values(), key=lambda r: r["iteration"])
            if rows[-1]["iteration"] != iterations:
                continue  # stopped early, or another budget: run it again
            evals = [{"label": "reused", "iteration": r["iteration"], "samples": r["samples"],
                      "train_seconds": r["train_seconds"], spec.accuracy: r["accuracy"], spec.reward: r["reward"],
                      **{key: r.get(column, math.nan) for column, key in spec.extra}} for r in rows]
            earlier = recorded.get(job, {})
            results[job] = {"evals": evals, "wall_s": earlier.get("wall_s", math.nan), "complete": True,
                            "summary": earlier.get("summary")}
    return results


def results_json(csv_path: Path) -> dict:
    """The results JSON written beside ``csv_path`` (``{}`` where there is none, e.g. a progress file)."""
    path = csv_path.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_runs(previous: dict) -> dict:
    """A results JSON's runs as :func:`run_all` returns them (``summary`` holds the final explained variance
    only), keyed by ``(backbone, method, seed, config)``."""
    runs = {}
    for key, run in previous.get("runs", {}).items():
        backbone, method, seed, config = key.split("/", 3)
        runs[backbone, method, int(seed), config] = {
            "evals": run["evals"], "wall_s": run["wall_s"], "complete": run["complete"],
            "summary": {"final_explained_variance": run.get("final_explained_variance")}}
    return runs


def run_or_reuse(jobs: list[tuple[str, str, int, str]], args: argparse.Namespace, out_dir: Path,
                 start: float | None = None) -> dict:
    """:func:`run_all` on the jobs that ``args.reused`` (``--reuse``) does not already hold."""
    reused = {job: args.reused[job] for job in jobs if job in args.reused}
    if reused:
        print(f"reusing {len(reused)} complete run(s) of {', '.join(map(str, args.reuse))}: "
              + ", ".join(run_name(*j) for j in reused), flush=True)
    fresh = [job for job in jobs if job not in reused]
    return {**reused, **(run_all(fresh, args, out_dir, start) if fresh else {})}


def earlier_runs(paths: list[Path]) -> tuple[list[dict], dict, str, dict | None]:
    """``--report-from``: the rows of earlier CSVs, their runs as :func:`run_all` returns them (from each CSV's
    JSON, where there is one), the machine line and the tuning protocol, merged over ``paths``.

    Runs of one backbone must be of the same experiment (grid, tuning seed, transferred source); CSVs of different
    backbones may each have their own (e.g. a grid moved for one backbone), which the merged protocol then lists
    under ``per_backbone``. Choices are joined. A later CSV's runs of a (backbone, method) replace an earlier one's
    (e.g. a method variant run on its own)."""
    keys = ("grid", "tune_seed", "configs", "transferred_from")
    rows, results, machines, protocol, experiments = [], {}, [], None, {}
    for path in paths:
        theirs_rows = read_csv(path)
        replaced = {(r["backbone"], r["method"]) for r in theirs_rows}
        rows = [r for r in rows if (r["backbone"], r["method"]) not in replaced] + theirs_rows
        results = {job: r for job, r in results.items() if job[:2] not in replaced}
        previous = results_json(path)
        machines.append(previous.get("machine", f"see {path.name}'s run"))
        results.update(recorded_runs(previous))
        theirs = previous.get("protocol")
        if theirs is None:
            continue
        experiment = {key: theirs.get(key) for key in keys}
        for backbone in dict.fromkeys(r["backbone"] for r in theirs_rows):
            mine = experiments.setdefault(backbone, experiment)
            for key in keys:
                if mine.get(key) != experiment.get(key):
                    raise SystemExit(f"--report-from: {path} was run with {key} {experiment.get(key)!r}, an earlier "
                                     f"CSV with {mine.get(key)!r} on {backbone}; only runs of the same protocol merge")
        protocol = protocol or {**theirs, "selected": {}, "grid_results": {}}
        for key in ("selected", "grid_results"):
            protocol[key].update(theirs.get(key, {}))
    if protocol and len({json.dumps(e, sort_keys=True) for e in experiments.values()}) > 1:
        protocol = {**{k: v for k, v in protocol.items() if k not in keys}, "per_backbone": experiments}
    machine = "; ".join(dict.fromkeys(machines)) + "; report redone from " + ", ".join(p.name for p in paths)
    return rows, results, machine, protocol


def curve_rows(backbone: str, method: str, seed: int, result: dict, task: str = "digits",
               config: str = "") -> list[dict]:
    spec = TASKS[task]
    return [{"backbone": backbone, "method": method, "seed": seed, "config": config, "iteration": e["iteration"],
             "samples": e["samples"], "train_seconds": e.get("train_seconds", math.nan),
             "accuracy": e[spec.accuracy], "reward": e[spec.reward],
             **{column: e.get(key, math.nan) for column, key in spec.extra}}
            for e in result["evals"]]


def time_methods(rows: list[dict], args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    """Training seconds per iteration of each (backbone, method) of ``rows`` (its configuration there), keyed
    ``"backbone/method"``, each run alone for ``args.time_iterations`` iterations with a one-prompt evaluation:
    ``train_seconds / iterations`` of its ``summary.json``."""
    per_iteration = {}
    for backbone, method in dict.fromkeys((r["backbone"], r["method"]) for r in rows):
        if method not in args.methods or backbone not in args.backbones:
            continue
        config = next((r.get("config", "") for r in rows if r["backbone"] == backbone and r["method"] == method), "")
        timing = argparse.Namespace(**{**vars(args), "iterations": args.time_iterations, "jobs": 1, "time_limit": 0,
                                       "eval_every": 10 ** 6, "eval_samples": 1,
                                       "overrides": [*args.overrides, "--model.init_args.evaluation.init_args."
                                                     f"prompts=[{TASKS[args.task].timing_prompt}]"]})
        result = run_all([(backbone, method, 0, config)], timing, out_dir / "timing")[(backbone, method, 0, config)]
        if not result["summary"]:
            raise RuntimeError(f"the timing run of {method} wrote no summary")
        per_iteration[f"{backbone}/{method}"] = result["summary"]["train_seconds"] / result["summary"]["iterations"]
        print(f"{method} on {backbone}: {per_iteration[f'{backbone}/{method}']:.3f} s per training iteration",
              flush=True)
    return per_iteration


def transferred(path: Path, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``--selected-from``: each (backbone, method)'s configuration chosen by the tuned run whose JSON is ``path``
    (for a backbone that run did not tune, the method's choice on the one it did, if it tuned exactly one)."""
    protocol = json.loads(path.read_text()).get("protocol") or {}
    selected = protocol.get("selected")
    if not selected:
        raise SystemExit(f"--selected-from {path}: no tuned protocol's choice in it (protocol.selected)")
    chosen = {}
    for backbone, method in pairs:
        if f"{backbone}/{method}" in selected:
            chosen[backbone, method] = selected[f"{backbone}/{method}"]
            continue
        other = {config for key, config in selected.items() if key.split("/")[1] == method}
        if len(other) != 1:
            raise SystemExit(f"--selected-from {path}: no single choice for {method} (has {sorted(selected)})")
        chosen[backbone, method] = other.pop()
    return chosen


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``sample_efficiency.csv`` (to redo the report and plot of an earlier run)."""
    floats = ("accuracy", "reward", "accuracy_seen", "accuracy_unseen", "independent_accuracy", "train_seconds")
    with path.open() as fh:
        return [{**r, "seed": int(r["seed"]), "iteration": int(r["iteration"]), "samples": int(r["samples"]),
                 "config": r.get("config", ""), **({"selected": int(r["selected"])} if "selected" in r else {}),
                 # a column an older CSV lacks (written blank when merged with a newer one) reads as NaN
                 **{k: float(r[k]) if r[k] not in (None, "") else math.nan for k in floats if k in r}}
                for r in csv.DictReader(fh)]


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
                        help="stem of the result files (default: sample_efficiency, sample_efficiency_pairs; with "
                             "--report-from, the CSV's stem)")
    parser.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="CSV",
                        help="no runs: redo the table, plot and headline from an earlier run's CSV; several CSVs "
                             "(e.g. one per backbone) are merged into one result, <name>.{csv,json,md,png} "
                             "(--name required)")
    parser.add_argument("--quick", action="store_true", help="one seed, DiT only, 2 iterations, a tiny evaluation")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="tuned protocol: every method's grid on --tune-seed, then the best on every seed")
    parser.add_argument("--tune-seed", type=int, default=None, help="the grid's seed (default: the first of --seeds)")
    parser.add_argument("--selected-from", type=Path, default=None, metavar="JSON",
                        help="run each method's configuration chosen by an earlier tuned run (its results JSON)")
    parser.add_argument("--time-iterations", type=int, default=0, metavar="N",
                        help="then time N iterations of each method's (chosen) configuration, one run at a time, "
                             "and use those per-iteration times for the time curves (0: the runs' own clocks)")
    parser.add_argument("--seconds-per-iteration", nargs="+", default=[], metavar="[BACKBONE/]METHOD=S",
                        help="training time per iteration measured apart (on a quiet machine): the time curves use "
                             "iteration x S instead of the runs' own clocks (which share the machine); METHOD=S "
                             "for every backbone, BACKBONE/METHOD=S for one")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="each run writes its final state to checkpoints/last.ckpt in its run folder (e.g. for "
                             "benchmarks.steering); by default runs write no checkpoint")
    parser.add_argument("--reuse", type=Path, nargs="+", default=None, metavar="CSV",
                        help="take the complete runs of earlier CSVs (same task, iterations and overrides) "
                             "instead of running them again; a later CSV's copy of a run wins")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, after --")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    if args.report_from and len(args.report_from) > 1 and not args.name:  # the merged CSV would overwrite an input
        parser.error("a merge of several --report-from CSVs writes <name>.csv: give it a --name of its own")
    args.name = args.name or (args.report_from[0].stem if args.report_from else task.name)  # a redo keeps its stem
    args.eval_samples = args.eval_samples or task.eval_samples
    out_dir = Path(args.out) if args.out else RESULTS
    if args.quick:
        args.backbones, args.seeds, args.iterations, args.eval_every, args.eval_samples = ["dit"], [0], 2, 1, 1
        out_dir = Path(args.out) if args.out else RESULTS / "quick"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = "python -m benchmarks.sample_efficiency " + " ".join(argv if argv is not None else sys.argv[1:])
    configs = parse_grid(args.grid)
    args.reused = reused_results(args.reuse, args.task, args.iterations) if args.reuse else {}
    if args.selected_from and len(configs) > 1:
        parser.error("--selected-from runs an earlier choice; it takes no --grid")
    tune_seed = args.seeds[0] if args.tune_seed is None else args.tune_seed
    grid, protocol = {}, None
    if args.report_from:
        rows, results, machine, protocol = earlier_runs(args.report_from)
        if protocol:
            grid = {tuple(k.split("/")): v for k, v in protocol.get("grid_results", {}).items()}
        if len(args.report_from) > 1:  # a merge is a result of its own: its CSV too
            write_csv(out_dir / f"{args.name}.csv", args.task, rows)
    else:
        pairs = [(b, m) for b in args.backbones for m in args.methods]
        start = time.time()
        if len(configs) > 1:  # the tuned protocol: every method's grid on one seed, then its best on the others
            results = run_or_reuse([(b, m, tune_seed, c) for b, m in pairs for c in configs], args, out_dir, start)
            tuning = [row for (b, m, s, c), r in results.items() for row in curve_rows(b, m, s, r, args.task, c)]
            picks = {(b, m): select(tuning, b, m, configs) for b, m in pairs}
            chosen = {pair: config for pair, (config, _) in picks.items()}
            grid = {pair: table for pair, (_, table) in picks.items()}
            results.update(run_or_reuse([(b, m, s, chosen[b, m]) for b, m in pairs for s in args.seeds
                                         if s != tune_seed], args, out_dir, start))
            protocol = {"grid": args.grid, "tune_seed": tune_seed, "configs": configs,
                        "selected": {f"{b}/{m}": c for (b, m), c in chosen.items()},
                        "grid_results": {f"{b}/{m}": table for (b, m), table in grid.items()}}
        else:
            chosen = transferred(args.selected_from, pairs) if args.selected_from else {p: configs[0] for p in pairs}
            results = run_or_reuse([(b, m, s, chosen[b, m]) for b, m in pairs for s in args.seeds], args, out_dir,
                                   start)
            if args.selected_from:
                protocol = {"transferred_from": str(args.selected_from),
                            "selected": {f"{b}/{m}": c for (b, m), c in chosen.items()}}
        rows = [{**row, "selected": int(c == chosen[b, m])} for (b, m, s, c), r in results.items()
                for row in curve_rows(b, m, s, r, args.task, c)]
        write_csv(out_dir / f"{args.name}.csv", args.task, rows)
        machine = f"{platform.node()} ({os.cpu_count()} CPUs, accelerator={args.accelerator}"
        if args.accelerator == "gpu":
            import torch

            machine += f", {torch.cuda.get_device_name(0)}"
        machine += f", OMP_NUM_THREADS={args.threads}, {args.jobs} runs at a time)"
    rows = [r for r in rows if r.get("selected", 1)]  # the tuned protocol reports each method's chosen configuration
    if args.time_iterations:
        args.seconds_per_iteration = [f"{m}={s}" for m, s in time_methods(rows, args, out_dir).items()]
    if args.seconds_per_iteration:
        per_iteration = {m: float(s) for m, s in (item.split("=", 1) for item in args.seconds_per_iteration)}
        rows = [{**r, "train_seconds": r["iteration"] * seconds} if (seconds := per_iteration.get(
                    f"{r['backbone']}/{r['method']}", per_iteration.get(r["method"]))) is not None else r
                for r in rows]
        machine += "; training time = iteration x " + ", ".join(f"{m} {s:g} s" for m, s in per_iteration.items())
    backbones = [b for b in args.backbones if any(r["backbone"] == b for r in rows)]
    plot(rows, backbones, args.methods, out_dir / f"{args.name}.png", args.task)
    text = report(rows, results, backbones, args.methods, cmd, machine, grid)
    if protocol and "transferred_from" in protocol:
        text += ("\nConfigurations transferred from " + protocol["transferred_from"] + " (each method's tuned choice "
                 "there, no tuning here): " + ", ".join(f"{k} {v}" for k, v in protocol["selected"].items()) + ".\n")
    (out_dir / f"{args.name}.md").write_text(text)
    headlines = [headline(rows, b) for b in backbones
                 if {"grpo", "actor_critic"} <= set(args.methods) and mean_curve(rows, b, "grpo")
                 and mean_curve(rows, b, "actor_critic")]
    redo = args.report_from and len(args.report_from) == 1  # beside the run's own JSON, not over it
    (out_dir / f"{args.name}{'_report' if redo else ''}.json").write_text(json.dumps(
        {"command": cmd, "machine": machine, "headline": headlines, "protocol": protocol,
         "runs": {"/".join(map(str, k)): {"complete": r["complete"], "wall_s": r["wall_s"], "evals": r["evals"],
                                          "final_explained_variance": (r["summary"] or {}).get(
                                              "final_explained_variance")} for k, r in results.items()}},
        indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
