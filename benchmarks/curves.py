"""The analysis behind ``benchmarks.sample_efficiency``: seed-mean accuracy curves, the samples (and training
seconds) the actor-critic needs to reach GRPO's final accuracy, each method's pick from a tuning grid, the plot
and the markdown report.

Everything here is a pure function of the benchmark's rows: one dict per held-out evaluation with ``backbone``,
``method``, ``seed``, ``iteration``, ``samples``, ``accuracy`` (and, where measured, ``train_seconds``, ``config``,
``selected``, the pair task's ``accuracy_seen`` / ``accuracy_unseen``, the digit task's ``independent_accuracy``:
the second judge's).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

METHODS = {"actor_critic": "actor-critic (ours)", "grpo": "GRPO", "ddpo": "DDPO"}


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


def time_curve(rows: list[dict], backbone: str, method: str, budget: float = math.inf) -> list[tuple[float, float]]:
    """``(training seconds, accuracy)``, both means over seeds, at each evaluation point of :func:`mean_curve`
    (points where a seed has no training time, a run stopped early, are left out)."""
    curve = []
    for samples, accuracy, *_ in mean_curve(rows, backbone, method, budget):
        seconds = [r.get("train_seconds", math.nan) for r in rows if r["backbone"] == backbone and r["method"] == method
                   and r["samples"] == samples]
        if all(math.isfinite(s) for s in seconds):
            curve.append((statistics.mean(seconds), accuracy))
    return curve


def samples_to_reach(curve: list[tuple], target: float) -> float | None:
    """First x (samples, or seconds for a :func:`time_curve`) at which the (linearly interpolated) mean curve
    ``[(x, accuracy, …), …]`` reaches ``target``."""
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
    ac_time, grpo_time = time_curve(rows, backbone, "actor_critic", budget), time_curve(rows, backbone, "grpo", budget)
    grpo_seconds = grpo_time[-1][0] if grpo_time and grpo_time[-1][1] == target else None
    ac_seconds = samples_to_reach(ac_time, target) if grpo_seconds else None
    return {"backbone": backbone, "grpo_final": target, "grpo_samples": spent,
            # GRPO's gain over its first evaluation (the base model): near 0, the crossing compares noise
            "grpo_gain": target - grpo[0][1], "actor_critic_samples": needed,
            "fraction": None if needed is None or spent == 0 else needed / spent,
            "grpo_train_seconds": grpo_seconds, "actor_critic_train_seconds": ac_seconds,
            "time_fraction": None if ac_seconds is None or not grpo_seconds else ac_seconds / grpo_seconds}


def select(rows: list[dict], backbone: str, method: str, configs: list[str]) -> tuple[str, list[dict]]:
    """The tuned protocol's choice: of one seed's grid runs of (backbone, method), the configuration with the best
    accuracy at the budget all of them reached (ties: the best mean accuracy over the curve).

    Returns the chosen label and one ``{"config", "budget", "accuracy", "curve_mean"}`` per configuration run.
    """
    curves = {c: mean_curve([r for r in rows if r["config"] == c], backbone, method) for c in configs}
    curves = {c: curve for c, curve in curves.items() if curve}
    if not curves:
        raise RuntimeError(f"no grid run of {method} on {backbone} evaluated anything")
    budget = min(curve[-1][0] for curve in curves.values())
    table = []
    for config, curve in curves.items():
        points = [a for s, a, *_ in curve if s <= budget]
        table.append({"config": config, "budget": budget, "accuracy": points[-1],
                      "curve_mean": statistics.mean(points)})
    best = max(table, key=lambda row: (row["accuracy"], row["curve_mean"]))
    return best["config"], table


def plot(rows: list[dict], backbones: list[str], methods: list[str], path: Path, task: str = "digits") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any(math.isfinite(r.get("train_seconds", math.nan)) for r in rows)
    fig, axes = plt.subplots(1 + timed, len(backbones), figsize=(5.5 * len(backbones), 4 * (1 + timed)),
                             squeeze=False)
    ylabel = "held-out accuracy (both digits right)" if task == "pairs" else "held-out alignment accuracy"
    title = {"dit": "toy DiT (flow SDE)", "unet": "toy UNet (DDIM)"}
    for ax, backbone in zip(axes[-1] if timed else (), backbones):  # the same curves against training time
        for method in methods:
            curve = time_curve(rows, backbone, method)
            if curve:
                ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3, label=METHODS[method])
        ax.set_title(title.get(backbone, backbone) + ": vs training time")
        ax.set_xlabel("training seconds (mean over seeds; evaluations not counted)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, backbone in zip(axes[0], backbones):
        for method in methods:
            curve = mean_curve(rows, backbone, method)
            if not curve:
                continue
            xs = [c[0] for c in curve]
            ax.plot(xs, [c[1] for c in curve], marker="o", ms=3, label=METHODS[method])
            ax.fill_between(xs, [c[2] for c in curve], [c[3] for c in curve], alpha=0.2)
        ax.set_title(title.get(backbone, backbone))
        ax.set_xlabel("generated training samples")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], results: dict, backbones: list[str], methods: list[str], command: str,
           machine: str, grid: dict | None = None) -> str:
    """The markdown report of the selected runs (``rows``); ``grid``: ``{(backbone, method): select()'s table}``
    of the tuned protocol, listed after the headline."""
    # further accuracies of each evaluation: the pair task's seen / unseen pairs, the digit task's second judge
    labels = {"accuracy_seen": "seen pairs", "accuracy_unseen": "unseen pairs",
              "independent_accuracy": "independent judge"}
    groups = [c for c in labels if any(math.isfinite(r.get(c, math.nan)) for r in rows)]
    lines = [f"`{command}` — {machine}, {time.strftime('%Y-%m-%d')}", "",
             "| backbone | method | base acc | budget (samples) | acc at budget: mean over seeds | min–max | "
             + "".join(f"{labels[c]}: base → at budget | " for c in groups)
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
            chosen = {r.get("config", "") for r in rows if r["backbone"] == backbone and r["method"] == method}
            runs = [r for (b, m, _, c), r in results.items()
                    if b == backbone and m == method and c in chosen and r["evals"]]
            iters = "/".join(map(str, sorted({r["evals"][-1]["iteration"] for r in runs}))) or "—"
            evs = [r["summary"]["final_explained_variance"] for r in runs
                   if r["summary"] and r["summary"]["final_explained_variance"] is not None]
            ev = f"{statistics.mean(evs):.2f}" if evs else "—"
            timed = [r["wall_s"] for r in runs if not math.isnan(r["wall_s"])]  # NaN: reused, timed in its report
            wall = f"{statistics.mean(timed):.0f}" if timed else "—"
            complete = f"{len(runs)} ({sum(r['complete'] for r in runs)})" if runs else "—"
            split = "".join(f"{_fmt(group_mean(rows, backbone, method, c, curve[0][0]))} → "
                            f"{_fmt(group_mean(rows, backbone, method, c, curve[-1][0]))} | " for c in groups)
            lines.append(f"| {backbone} | {METHODS[method]} | {curve[0][1]:.3f} | {curve[-1][0]} | "
                         f"{curve[-1][1]:.3f} | {min(at_budget):.3f}–{max(at_budget):.3f} | {split}{complete} | "
                         f"{iters} | {ev} | {wall} |")
    lines += ["", "| backbone | GRPO final acc | GRPO gain over base | GRPO samples | actor-critic samples to reach it | "
              "fraction | GRPO training s | actor-critic s to reach it | time fraction |",
              "|---|---|---|---|---|---|---|---|---|"]
    for backbone in backbones:
        if "grpo" in methods and "actor_critic" in methods and mean_curve(rows, backbone, "grpo") \
                and mean_curve(rows, backbone, "actor_critic"):
            h = headline(rows, backbone)
            reached = "not reached" if h["actor_critic_samples"] is None else f"{h['actor_critic_samples']:.0f}"
            frac = "—" if h["fraction"] is None else f"{h['fraction']:.2f}"
            secs = [("—" if h[k] is None else f"{h[k]:.0f}") for k in ("grpo_train_seconds", "actor_critic_train_seconds")]
            if h["grpo_train_seconds"] is not None and h["actor_critic_train_seconds"] is None:
                secs[1] = "not reached"
            tfrac = "—" if h["time_fraction"] is None else f"{h['time_fraction']:.2f}"
            lines.append(f"| {backbone} | {h['grpo_final']:.3f} | {h['grpo_gain']:+.3f} | {h['grpo_samples']} | "
                         f"{reached} | {frac} | "
                         f"{secs[0]} | {secs[1]} | {tfrac} |")
    if grid:
        lines += ["", "Tuned protocol: each method's grid on one seed; the chosen configuration (**bold**) ran on "
                  "every seed.", "", "| backbone | method | configuration | budget | accuracy at budget | "
                  "mean over the curve |", "|---|---|---|---|---|---|"]
        for (backbone, method), table in grid.items():
            ran = {r.get("config", "") for r in rows if r["backbone"] == backbone and r["method"] == method}
            for row in table:
                label = f"**{row['config']}**" if row["config"] in ran else row["config"]
                lines.append(f"| {backbone} | {METHODS[method]} | {label} | {row['budget']} | {row['accuracy']:.3f} | "
                             f"{row['curve_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def group_mean(rows: list[dict], backbone: str, method: str, column: str, samples: int) -> float:
    """Mean over seeds of ``column`` (e.g. the pair task's ``accuracy_unseen``) at ``samples`` (runs that did not
    record it, e.g. from before a judge existed, left out; NaN when none did)."""
    values = [r[column] for r in rows if r["backbone"] == backbone and r["method"] == method
              and r["samples"] == samples and math.isfinite(r.get(column, math.nan))]
    return statistics.mean(values) if values else math.nan
