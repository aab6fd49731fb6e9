"""A run's record and report: samples seen, held-out evaluations, recent training metrics, ``summary.json``.

:class:`RunHistory` is the one place an RL module keeps what it reports about a run; it owns its state
(``state_dict`` / ``load_state_dict`` in ``weights_only`` form, so resume continues it exactly) and writes the
summary.  The held-out evaluation (:class:`~lit_diffac.evaluation.HeldOutEvaluation`) appends to it.
:class:`RunReport` is the callback that decides when to evaluate and writes the report at the end;
:class:`IterationTimer` gives the ``perf/…`` timings of an iteration.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_diffac.faults import checkpoint_dir

#: summary.json reports training diagnostics averaged over this many final iterations.
SUMMARY_WINDOW = 10


class RunHistory:
    """What a run has done so far.

    Attributes:
        samples_seen: trajectories rolled out, over all processes.
        iterations: RL iterations completed (skipped ones included).
        evaluations: held-out evaluations, each ``{"iteration", "label", "samples_seen", "eval/…": value}``
            (``label`` ``"base"`` first, then ``"periodic"`` ones, the last one ``"final"``).
        recent: the training metrics of the last :data:`SUMMARY_WINDOW` iterations.
        last_metrics: the training metrics of the last iteration (what the progress bar shows).
        train_seconds: wall time spent in training iterations so far (the sum of their
            ``perf/iteration_time``; evaluations and checkpointing not counted).
        eval_train_seconds: ``train_seconds`` at each evaluation (kept apart from ``evaluations``, which a
            resumed run reproduces exactly), so accuracy can be read against training time as well as samples.
    """

    def __init__(self, window: int = SUMMARY_WINDOW) -> None:
        self.window = window
        self.samples_seen = 0
        self.evaluations: list[dict] = []
        self.recent: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.iterations = 0
        self.train_seconds = 0.0
        self.eval_train_seconds: list[float] = []
        self.started: float | None = None

    def start(self) -> None:
        """Start the wall-time clock of :meth:`summary` (at the beginning of fit)."""
        self.started = time.perf_counter()

    def record_iteration(self, metrics: dict[str, float]) -> None:
        """Keep one iteration's training metrics."""
        self.iterations += 1
        self.train_seconds += float(metrics.get("perf/iteration_time", 0.0))
        self.last_metrics = metrics
        self.recent.append(metrics)
        del self.recent[:-self.window]

    def record_evaluation(self, label: str, iteration: int, metrics: Mapping[str, float]) -> dict:
        """Append one held-out evaluation (after ``iteration`` completed iterations) and return the entry."""
        entry = {"iteration": iteration, "label": label, "samples_seen": self.samples_seen, **metrics}
        self.eval_train_seconds.append(self.train_seconds)
        self.evaluations.append(entry)
        return entry

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": int(self.samples_seen), "eval_history": [dict(e) for e in self.evaluations],
                "recent_metrics": [dict(m) for m in self.recent], "iterations": int(self.iterations),
                "train_seconds": float(self.train_seconds), "eval_train_seconds": list(self.eval_train_seconds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples_seen = state["samples_seen"]
        self.evaluations = [dict(e) for e in state["eval_history"]]
        self.recent = [dict(m) for m in state["recent_metrics"]]
        self.iterations = state.get("iterations", 0)  # older checkpoints lack these two
        self.train_seconds = state.get("train_seconds", 0.0)
        self.eval_train_seconds = list(state.get("eval_train_seconds", [math.nan] * len(self.evaluations)))

    def summary(self, module: str, iterations: int, seed: int, checkpoint: str | Path | None = None) -> dict:
        """The ``summary.json`` of a run: base and final held-out metrics, diagnostics averaged over the last
        iterations (``train/…`` into ``final_train``; ``perf/…`` left out; an iteration where a diagnostic is
        undefined, NaN, does not count for it; explained variances pooled, :func:`pooled_explained_variance`;
        ``final_explained_variance`` is the overall one), samples seen, wall time, training
        time (``train_seconds``; ``eval_train_seconds``: at each entry of ``eval_history``) and the
        checkpoint that holds the final weights (``None``: none written)."""
        base = next((e for e in self.evaluations if e["label"] == "base"), None)
        final = self.evaluations[-1] if self.evaluations else {}
        recent = self.recent
        averaged = {k: mean_finite([m[k] for m in recent if k in m]) for k in {k for m in recent for k in m}}
        averaged.update(pooled_explained_variance(recent))
        wall = time.perf_counter() - (self.started or time.perf_counter())
        return {
            "module": module,
            "iterations": iterations,
            "samples_seen": self.samples_seen,
            "wall_time_s": wall,
            "train_seconds": self.train_seconds,
            "base": {k: v for k, v in (base or {}).items() if k.startswith("eval/")},
            "final": {k: v for k, v in final.items() if k.startswith("eval/")},
            "final_explained_variance": averaged.get("train/explained_variance"),
            "final_train": {"averaged_over_iterations": len(recent),
                            **{k: v for k, v in sorted(averaged.items()) if not k.startswith("perf/")}},
            "eval_history": self.evaluations,
            "eval_train_seconds": self.eval_train_seconds,
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


def pooled_explained_variance(recent: list[Mapping[str, float]]) -> dict[str, float]:
    """Explained variance over several iterations as one ratio: ``1 − Σ_i Var_i(G − V) / Σ_i Var_i(G)``.

    For every ``train/explained_variance<span>`` whose parts ``train/value_error_var<span>`` and
    ``train/return_var<span>`` were logged (:func:`~lit_diffac.ppo.value_diagnostics`: the whole chain and each
    third), over the iterations where both are finite.  Unlike the mean of the per-iteration ratios, an iteration
    whose targets barely vary (a batch that nearly all succeeded: Var(G) ≈ 0.01 of the usual) weighs by its target
    variance, so it cannot drag the summary to −30 while the critic's error is as small as in any other iteration.
    Explained variances without logged parts (runs of older versions, per-reward ones) are left out of the result.
    """
    spans = {k.removeprefix("train/return_var") for m in recent for k in m if k.startswith("train/return_var")}
    out = {}
    for span in spans:
        parts = [(m[f"train/value_error_var{span}"], m[f"train/return_var{span}"]) for m in recent
                 if f"train/return_var{span}" in m and f"train/value_error_var{span}" in m]
        parts = [(e, r) for e, r in parts if math.isfinite(e) and math.isfinite(r)]
        if parts:
            total = sum(r for _, r in parts)
            out[f"train/explained_variance{span}"] = 1.0 - sum(e for e, _ in parts) / total if total > 0 else math.nan
    return out


def mean_finite(values: list[float]) -> float:
    """The mean of the finite ``values`` (NaN if there is none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunReport(L.Callback):
    """What an RL run reports, around the algorithm: the held-out evaluations (before the first iteration,
    every ``evaluation.every_n_iterations`` and after the last), ``summary.json``, and the hyperparameters with
    the final held-out metrics in each logger's hyperparameter view (TensorBoard's HParams tab).

    The RL modules add it themselves (``configure_callbacks``); it reads the module's public parts
    (``history``, ``evaluation``, ``hparams``) and owns no state.

    Args:
        evaluate: run the held-out evaluations (``False`` for value pretraining: the policy does not change).
    """

    def __init__(self, evaluate: bool = True) -> None:
        self.evaluate = evaluate

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.history.start()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = pl_module.history
        if history.evaluations and history.evaluations[-1]["label"] == "final":  # resumed after a finished fit:
            last = history.evaluations.pop()  # continue as if uninterrupted (it was a periodic point, or none)
            if self.evaluate and pl_module.evaluation.is_due(last["iteration"], last=False):
                history.evaluations.append({**last, "label": "periodic"})
        if self.evaluate and not history.evaluations:  # not again on resume
            pl_module.evaluation.run(pl_module, "base", 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.evaluate and pl_module.evaluation.is_due(done, last=done >= (trainer.max_epochs or 0)):
            pl_module.evaluation.run(pl_module, "periodic", done)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate:  # before GracefulStop writes the final last.ckpt, which then holds this evaluation
            pl_module.evaluation.run(pl_module, "final", trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_summary(trainer, pl_module)
        final = pl_module.history.evaluations[-1] if pl_module.history.evaluations else {}
        scores = [v for k, v in final.items() if k.startswith("eval/") and math.isfinite(v)]
        accuracy = [v for k, v in final.items() if k.startswith("eval/") and k.endswith("_accuracy") and math.isfinite(v)]
        if scores:  # HParams tab: the real hyperparameters, and hp_metric = the final held-out accuracy (or score)
            params, metrics = hyperparameters(pl_module), {"hp_metric": (accuracy or scores)[0]}
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.log_hyperparams(params, metrics, step=trainer.current_epoch)

    @staticmethod
    def write_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Write ``summary.json`` (naming ``last.ckpt`` if written) into the run's log folder; return its path."""
        if not (trainer.is_global_zero and trainer.logger is not None and trainer.log_dir is not None):
            return None
        last = checkpoint_dir(trainer) / "last.ckpt"
        return pl_module.history.write_summary(Path(trainer.log_dir) / "summary.json", type(pl_module).__name__,
                                               trainer.current_epoch, pl_module.hparams.seed,
                                               last if last.is_file() else None)


def hyperparameters(pl_module: L.LightningModule) -> dict[str, Any]:
    """The module's hyperparameters for a logger: its plain arguments plus a short description of each
    component (backbone, sampler, estimator, rewards, evaluation, critic replay)."""
    params: dict[str, Any] = {k: v for k, v in pl_module.hparams.items() if isinstance(v, (int, float, str, bool))}
    sampler, estimator, replay = pl_module.sampler, pl_module.estimator, pl_module.critic_replay
    params.update({
        "backbone": str(pl_module.backbone.pretrained), "backbone_class": type(pl_module.backbone).__name__,
        "lora_rank": pl_module.backbone.lora_rank, "sampler": type(sampler).__name__,
        "num_steps": sampler.num_steps, "estimator": type(estimator).__name__,
        "reward_normalization": estimator.reward_normalization, "rewards": ",".join(pl_module.reward_names),
        "reward_weights": ",".join(f"{w:g}" for w in pl_module.reward_weights.tolist()),
        "critic_replay": f"{replay.capacity} iterations x {replay.passes} passes" if replay is not None else "none",
        "eval_samples_per_prompt": pl_module.evaluation.samples_per_prompt,
        "eval_prompts": len(pl_module.evaluation.prompts),
    })
    for name in ("gamma", "lam", "advantage_clip", "target_clip"):
        if hasattr(estimator, name):
            params[f"estimator.{name}"] = getattr(estimator, name)
    return params
