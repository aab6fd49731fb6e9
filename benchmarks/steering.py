"""Test-time steering with the trained critic vs plain sampling vs best-of-N at equal compute, by two judges.

    lit-diffac run recipes/toy/actor_critic_dit.yaml            # the main job: runs/actor_critic_dit/version_N
    python -m benchmarks.steering --run dit=runs/actor_critic_dit/version_0 [--run unet=...] [--scale 4]
        [--sweep-scales 1 4 16] [--sweep-steps first:5 last:5] [--samples-per-prompt 25] [--seed 4242] [--quick]
    python -m benchmarks.steering --report-from results/steering_dit.json results/steering_unet.json  # merge

For each ``BACKBONE=RUN_FOLDER`` (a finished run of a toy digit recipe: its ``config.yaml`` and
``checkpoints/last.ckpt``; repeat a backbone for several training seeds, ``--run dit=RUN0 dit=RUN1 dit=RUN2``),
on the held-out prompts (``--prompts``, default ``toy:heldout``) × ``--samples-per-prompt`` with the same
``--seed``, every variant is one ``lit-diffac sample`` call:

* ``plain``: the policy's own sampler (``--scale 0``);
* ``steered``: critic steering at ``--scale`` on every step (``--steps all``); its backbone compute per sample
  is reported by ``lit-diffac sample`` (a steered step costs a forward and a backward: 3 forward-equivalents);
* ``best_of_n_value``: best-of-N ranked by the critic's value at the last step, N = the steered run's compute
  per sample over the plain run's, rounded (equal compute); ``best_of_n_reward``: the same N ranked by the
  training reward itself (an upper reference: it peeks at the judge);
* a sweep of scales and step windows (``--sweep-scales``, ``--sweep-steps``) at their own compute.

Every folder is scored by the project's judge (the reward's digit classifier: ``digit_alignment_accuracy``) and
by the independent judge (:mod:`benchmarks.independent_judge`: an RBF SVM on the original 8×8 digits), so that
steering toward the reward's own classifier is not mistaken for alignment.  Per backbone the JSON holds the
mean over its runs (``plain_accuracy``, ``steered_accuracy``, ``best_of_n_value_accuracy``, …, the same under
``independent_judge``), the training ``seeds`` (each run's ``seed_everything``) and each run's own figures under
``runs``; ``--report-from`` merges the backbones of earlier reports (run one process per backbone side by side)
into one.  Writes ``benchmarks/results/NAME.{json,md}`` (``steering``; ``--quick``: ``results/quick/steering``,
2 samples per prompt, no sweep).
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
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: the variants every run measures (the sweep's come on top)
MAIN = ("plain", "steered", "best_of_n_value", "best_of_n_reward")


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
    return {
        "run": str(run), "seed": training_seed(run), "scale": args.scale, "best_of_n": n, "sampling_seed": args.seed,
        "samples": len(reports["plain"]["images"]),
        **{f"{name}_accuracy": project[name] for name in MAIN},
        "independent_judge": {f"{name}_accuracy": independent[name] for name in MAIN},
        "compute_per_sample": {name: per_sample(name) for name in MAIN},
        "sweep": [{"variant": name, "accuracy": project[name], "independent_accuracy": independent[name],
                   "compute_per_sample": per_sample(name)} for name in reports if name not in MAIN],
    }


def training_seed(run: Path) -> int | None:
    """The run's ``seed_everything`` from the ``config.yaml`` Lightning saved beside its checkpoints."""
    config = run / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    return (yaml.safe_load(config.read_text()) or {}).get("seed_everything")


def combine(per_run: list[dict]) -> dict:
    """One backbone's runs (one per training seed) → the mean of every accuracy, each run's figures under ``runs``.

    ``best_of_n`` and the compute per sample are the first run's (equal for runs of one recipe)."""
    first, mean = per_run[0], statistics.fmean
    keys = [f"{name}_accuracy" for name in MAIN]
    sweep = [{**s, "accuracy": mean(r["sweep"][i]["accuracy"] for r in per_run),
              "independent_accuracy": mean(r["sweep"][i]["independent_accuracy"] for r in per_run)}
             for i, s in enumerate(first["sweep"])]
    return {
        "scale": first["scale"], "best_of_n": first["best_of_n"], "seeds": [r["seed"] for r in per_run],
        "sampling_seed": first["sampling_seed"], "samples": first["samples"],
        **{k: mean(r[k] for r in per_run) for k in keys},
        "independent_judge": {k: mean(r["independent_judge"][k] for r in per_run) for k in keys},
        "compute_per_sample": first["compute_per_sample"], "sweep": sweep, "runs": per_run,
    }


def table(results: dict) -> str:
    lines = ["| backbone (training seeds) | variant | compute / sample | project judge | independent judge |",
             "|---|---|---|---|---|"]

    def cell(mean: float, per_run: list[float]) -> str:
        return f"{mean:.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in per_run)})" if len(per_run) > 1 else "")

    for backbone, r in results.items():
        runs = r.get("runs", [r])
        seeds = ", ".join(str(s) for s in r.get("seeds", [r.get("seed")]))
        rows = []
        for name in MAIN:
            k = f"{name}_accuracy"
            rows.append((name, r["compute_per_sample"][name], cell(r[k], [x[k] for x in runs]),
                         cell(r["independent_judge"][k], [x["independent_judge"][k] for x in runs])))
        rows += [(s["variant"], s["compute_per_sample"], cell(s["accuracy"], [x["sweep"][i]["accuracy"] for x in runs]),
                  cell(s["independent_accuracy"], [x["sweep"][i]["independent_accuracy"] for x in runs]))
                 for i, s in enumerate(r["sweep"])]
        for name, compute, acc, ind in rows:
            label = {"steered": f"steered, scale {r['scale']:g}, all steps",
                     "best_of_n_value": f"best-of-{r['best_of_n']} by the critic's value",
                     "best_of_n_reward": f"best-of-{r['best_of_n']} by the reward (peeks at the judge)"}.get(name, name)
            lines.append(f"| {backbone} ({seeds}) | {label} | {compute:.0f} | {acc} | {ind} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", default=[], metavar="BACKBONE=RUN_FOLDER",
                        help="finished runs of toy digit recipes (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--report-from", nargs="+", type=Path, default=[], metavar="JSON",
                        help="merge the backbones of earlier steering JSONs into one report (no sampling; a later "
                             "file's backbone replaces an earlier one's)")
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
    command = "python -m benchmarks.steering " + " ".join(str(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.report_from:
        if args.run:
            parser.error("--report-from merges earlier reports; give it without --run")
        report = {"command": command, **merge_reports(args.report_from)}
        header = f"`{command}`, {time.strftime('%Y-%m-%d')}: the backbones of"
        return write_report(report, header, RESULTS, args.name)
    if not args.run:
        parser.error("give --run BACKBONE=RUN_FOLDER (or --report-from JSON ...)")
    runs: dict[str, list[Path]] = {}
    for spec in args.run:
        backbone, _, folder = spec.partition("=")
        if not folder or not (Path(folder) / "checkpoints" / "last.ckpt").is_file():
            parser.error(f"--run {spec!r}: expected BACKBONE=RUN_FOLDER with checkpoints/last.ckpt inside")
        runs.setdefault(backbone, []).append(Path(folder))
    from benchmarks.independent_judge import svm_judge

    start = time.time()
    svm, svm_heldout = svm_judge()
    results_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir = results_dir / "runs" / args.name
    results = {backbone: combine([measure(backbone, folder, args, out_dir / f"run{i}", svm)
                                  for i, folder in enumerate(folders)])
               for backbone, folders in runs.items()}
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads})"
    report = {"command": command, "machine": machine, "minutes": (time.time() - start) / 60,
              "independent_judge_accuracy_on_real_digits": svm_heldout, **results}
    header = (f"`{command}` — {machine}, {time.strftime('%Y-%m-%d')}, {report['minutes']:.0f} min; "
              f"prompts {args.prompts} × {args.samples_per_prompt}, seed {args.seed}")
    return write_report(report, header, results_dir, args.name)


def is_backbone(value) -> bool:
    return isinstance(value, dict) and "plain_accuracy" in value


def merge_reports(paths: list[Path]) -> dict:
    """Earlier steering JSONs → one report: every backbone object (a later file's replaces an earlier one's) and,
    under ``sources``, each file's command, machine and minutes."""
    merged: dict = {"sources": []}
    for path in paths:
        report = json.loads(Path(path).read_text())
        merged["sources"] += report.get("sources") or [  # a merged report passes its own sources on
            {"file": str(path), **{k: report.get(k) for k in ("command", "machine", "minutes")}}]
        merged["independent_judge_accuracy_on_real_digits"] = report.get("independent_judge_accuracy_on_real_digits")
        merged.update({k: v for k, v in report.items() if is_backbone(v)})
    return merged


def write_report(report: dict, header: str, results_dir: Path, name: str) -> int:
    """``results_dir/NAME.json`` (the report) and ``NAME.md`` (the header, the merged sources if any, then the
    table of every backbone)."""
    results = {k: v for k, v in report.items() if is_backbone(v)}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    sources = "".join(f"\n- {s['file']}: `{s['command']}` — {s['machine']}, {s['minutes']:.0f} min"
                      for s in report.get("sources", []))
    text = header + sources + f"\n\n{table(results)}\n"
    (results_dir / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
