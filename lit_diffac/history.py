"""A run's record: samples seen, held-out evaluations and recent training metrics, and its ``summary.json``.

:class:`RunHistory` is the one place an RL module keeps what it reports about a run; it owns its state
(``state_dict`` / ``load_state_dict`` in ``weights_only`` form, so resume continues it exactly) and writes the
summary.  The held-out evaluation (:class:`~lit_diffac.evaluation.HeldOutEvaluation`) appends to it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch

#: summary.json reports training diagnostics averaged over this many final iterations.
SUMMARY_WINDOW = 10


class RunHistory:
    """What a run has done so far.

    Attributes:
        samples_seen: trajectories rolled out, over all processes.
        evaluations: held-out evaluations, each ``{"iteration", "label", "samples_seen", "eval/…": value}``
            (``label`` ``"base"`` first, then ``"periodic"`` ones, the last one ``"final"``).
        recent: the training metrics of the last :data:`SUMMARY_WINDOW` iterations.
        last_metrics: the training metrics of the last iteration (what the progress bar shows).
    """

    def __init__(self, window: int = SUMMARY_WINDOW) -> None:
        self.window = window
        self.samples_seen = 0
        self.evaluations: list[dict] = []
        self.recent: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.started: float | None = None

    def start(self) -> None:
        """Start the wall-time clock of :meth:`summary` (at the beginning of fit)."""
        self.started = time.perf_counter()

    def record_iteration(self, metrics: dict[str, float]) -> None:
        """Keep one iteration's training metrics."""
        self.last_metrics = metrics
        self.recent.append(metrics)
        del self.recent[:-self.window]

    def record_evaluation(self, label: str, iteration: int, metrics: Mapping[str, float]) -> dict:
        """Append one held-out evaluation (after ``iteration`` completed iterations) and return the entry."""
        entry = {"iteration": iteration, "label": label, "samples_seen": self.samples_seen, **metrics}
        self.evaluations.append(entry)
        return entry

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": int(self.samples_seen), "eval_history": [dict(e) for e in self.evaluations],
                "recent_metrics": [dict(m) for m in self.recent]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples_seen = state["samples_seen"]
        self.evaluations = [dict(e) for e in state["eval_history"]]
        self.recent = [dict(m) for m in state["recent_metrics"]]

    def summary(self, module: str, iterations: int, seed: int, checkpoint: str | Path | None = None) -> dict:
        """The ``summary.json`` of a run: base and final held-out metrics, diagnostics averaged over the last
        iterations (``train/…`` into ``final_train``; ``perf/…`` left out), samples seen, wall time and the
        checkpoint that holds the final weights (``None``: none written)."""
        base = next((e for e in self.evaluations if e["label"] == "base"), None)
        final = self.evaluations[-1] if self.evaluations else {}
        recent = self.recent
        averaged = {k: sum(m[k] for m in recent if k in m) / sum(k in m for m in recent)
                    for k in {k for m in recent for k in m}}
        wall = time.perf_counter() - (self.started or time.perf_counter())
        return {
            "module": module,
            "iterations": iterations,
            "samples_seen": self.samples_seen,
            "wall_time_s": wall,
            "base": {k: v for k, v in (base or {}).items() if k.startswith("eval/")},
            "final": {k: v for k, v in final.items() if k.startswith("eval/")},
            "final_explained_variance": averaged.get("train/explained_variance"),
            "final_train": {"averaged_over_iterations": len(recent),
                            **{k: v for k, v in sorted(averaged.items()) if not k.startswith("perf/")}},
            "eval_history": self.evaluations,
            "seed": seed,
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        }

    def write_summary(self, path: str | Path, module: str, iterations: int, seed: int,
                      checkpoint: str | Path | None = None) -> Path:
        """Write :meth:`summary` as JSON to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(module, iterations, seed, checkpoint), indent=2))
        return path


class IterationTimer:
    """Wall-clock phases of one RL iteration → the ``perf/…`` metrics.

    Each :meth:`lap` waits for queued GPU work first (a no-op on the CPU), so a phase's time is its own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.reward_times: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """End ``phase`` now."""
        _sync(self.device)
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now

    @staticmethod
    @contextmanager
    def measure(times: dict[str, float] | None, key: str, device: torch.device):
        """Time the ``with`` block into ``times[key]`` (nothing when ``times`` is ``None``)."""
        start = time.perf_counter()
        yield
        if times is not None:
            _sync(device)
            times[key] = time.perf_counter() - start

    def metrics(self, samples: int, samples_seen: int) -> dict[str, float]:
        """``perf/<phase>_time``, ``perf/iteration_time``, ``perf/samples_per_sec``, ``perf/samples_seen`` and
        ``perf/reward_time/<name>``."""
        total = self.last - self.start
        return {**{f"perf/{phase}_time": t for phase, t in self.phases.items()}, "perf/iteration_time": total,
                "perf/samples_per_sec": samples / total, "perf/samples_seen": float(samples_seen),
                **self.reward_times}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
