"""Fault handling for the RL modules: non-finite iterations are skipped, signals stop at an iteration boundary.

* :class:`NonFiniteGuard` — runs one RL update, skipped and rolled back when anything in it is non-finite,
  and counts the skips (its state is checkpointed);
* :func:`nonfinite_inputs` — which of an iteration's rewards, log-probs and values are NaN / ±inf;
* :class:`NonFiniteUpdate` — raised inside an update when a loss or gradient norm is not finite;
* :class:`TrainableSnapshot` — a copy of the trainable weights and optimiser states taken before an update,
  restored when the update turns out non-finite (weights and optimiser state end as if it never ran);
* :class:`GracefulStop` — a callback: SIGTERM or the first Ctrl-C lets the current iteration finish, writes
  ``last.ckpt`` to the run's checkpoint folder (saying where) and stops; a guard's ``halt_reason`` (set
  after too many consecutive bad iterations) does the same and ends with :class:`~lit_diffac.errors.TrainingHalted`.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from lit_diffac.errors import TrainingHalted


class NonFiniteUpdate(Exception):
    """A loss or gradient norm of an update was NaN / ±inf; the message says which."""


class RunInterrupted(KeyboardInterrupt):
    """Raised after a signal's checkpoint is written: Lightning shuts down as after Ctrl-C (exit status 1)."""


def nonfinite_inputs(rewards: torch.Tensor, log_probs: torch.Tensor, values: torch.Tensor | None,
                     reward_names: Sequence[str]) -> str | None:
    """Describe the non-finite entries of an iteration's inputs, or ``None`` when all are finite.

    Args:
        rewards: ``[B, R]`` raw rewards.
        log_probs: ``[B, K]`` rollout log-probs.
        values: ``[B, K, V]`` rollout values, or ``None`` (no critic).
        reward_names: the ``R`` reward names.

    Returns:
        e.g. ``"reward 'brightness' is not finite for 2/4 samples; log-prob is not finite for 1/40 steps"``.
    """
    problems = []
    for j, name in enumerate(reward_names):
        bad = (~torch.isfinite(rewards[:, j])).sum().item()
        if bad:
            problems.append(f"reward {name!r} is not finite for {bad}/{rewards.shape[0]} samples")
    for label, tensor in (("log-prob", log_probs), ("value", values)):
        if tensor is not None:
            bad = (~torch.isfinite(tensor)).sum().item()
            if bad:
                problems.append(f"{label} is not finite for {bad}/{tensor.numel()} entries")
    return "; ".join(problems) or None


def drop_nonfinite_samples(rollout: Any, reward_names: Sequence[str]) -> tuple[Any, str | None]:
    """``(rollout without the trajectories whose rewards are not finite, message naming the rewards)``.

    Only some samples bad: they leave the update (``fault/dropped_samples``), the rest trains.  None or all
    bad: the rollout is returned whole (all bad: the iteration is then skipped by :class:`NonFiniteGuard`).
    """
    bad = ~torch.isfinite(rollout.rewards).all(-1)
    if not bad.any() or bad.all():
        return rollout, None
    names = [name for j, name in enumerate(reward_names) if not torch.isfinite(rollout.rewards[:, j]).all()]
    return rollout.select(~bad), (f"dropped {int(bad.sum())}/{len(bad)} trajectories from the update: "
                                  f"reward {', '.join(map(repr, names))} is not finite for them")


class TrainableSnapshot:
    """Copies of trainable parameters and optimiser states, to undo an update.

    Args:
        parameters: the parameters an update may change.
        optimizers: the optimisers that change them (``None`` entries are skipped).
        stateful: other objects the update changes, with ``state_dict`` / ``load_state_dict`` (the reward
            normaliser, a stateful advantage estimator); objects without them are skipped.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], optimizers: Sequence[Any],
                 stateful: Sequence[Any] = ()) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimizers = [o for o in optimizers if o is not None]
        self.weights = [p.detach().clone() for p in self.parameters]
        self.states = [_copied(_raw_optimizer(o).state_dict()) for o in self.optimizers]
        self.stateful = [o for o in stateful if callable(getattr(o, "state_dict", None))
                         and callable(getattr(o, "load_state_dict", None))]
        self.others = [_copied(o.state_dict()) for o in self.stateful]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every parameter and optimiser state back as it was when the snapshot was taken."""
        for p, w in zip(self.parameters, self.weights):
            p.copy_(w)
            p.grad = None
        for o, s in zip(self.optimizers, self.states):
            _raw_optimizer(o).load_state_dict(s)
        for o, s in zip(self.stateful, self.others):
            o.load_state_dict(s)


def _copied(state: Any) -> Any:
    """A copy of a ``state_dict`` tree: tensors cloned, dicts / lists / tuples rebuilt, anything else (numbers,
    strings, ``None``) shared — ``copy.deepcopy`` without its bookkeeping, which cost ~0.1 s per toy iteration."""
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, dict):
        copied = state.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        copied.update((key, _copied(value)) for key, value in state.items())
        return copied
    if isinstance(state, list):
        return [_copied(value) for value in state]
    if isinstance(state, tuple):
        values = [_copied(value) for value in state]
        return type(state)(*values) if hasattr(state, "_fields") else tuple(values)
    return state


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser behind Lightning's ``LightningOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The run's checkpoint folder: the ModelCheckpoint's, else ``<log_dir or default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class GracefulStop(Checkpoint):
    """Stop at the end of an iteration with a resumable ``last.ckpt`` on SIGTERM, Ctrl-C or a module's halt.

    The handlers are installed when training starts (after Lightning's own) and removed when it ends.  The
    first SIGTERM / SIGINT only sets a flag; at the end of the current iteration (after the module's
    epoch-end work and any ModelCheckpoint) the checkpoint is written and the run stops (exit status 1, as
    after Ctrl-C).  A second Ctrl-C quits at once without saving.  The ``halt_reason`` of ``guard`` (set after
    too many non-finite iterations, or a reward that raised) stops the run the same way, raising
    :class:`~lit_diffac.errors.TrainingHalted`.

    With a ``ModelCheckpoint(save_last=True)`` among the callbacks (or ``"link"``: ``last.ckpt`` a link to the newest
    periodic checkpoint, one file written instead of two) it also keeps ``last.ckpt`` current: it rewrites it (a
    file, in place of a link) when training ends (the final state) and at the end of an iteration once
    ``every_minutes`` of wall time have passed since it last wrote one (a killed process loses at most that much
    work).

    Args:
        filename: checkpoint file name inside the run's checkpoint folder (``last.ckpt`` is what
            ``--ckpt_path last`` finds).
        guard: the module's :class:`NonFiniteGuard` (``None``: stop on signals only).
        every_minutes: wall time between two ``last.ckpt`` writes (``None``: only at the end).
    """

    def __init__(self, filename: str = "last.ckpt", guard: NonFiniteGuard | None = None,
                 every_minutes: float | None = 30.0) -> None:
        if not filename.endswith(".ckpt"):
            raise ValueError(f"filename must end in .ckpt, got {filename!r}")
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"every_minutes must be > 0 or None, got {every_minutes}")
        self.filename = filename
        self.guard = guard
        self.every_minutes = every_minutes
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._saved_at = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"GracefulStop[{self.filename}]"

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: quit now
        self.received = name
        tip = " (Ctrl-C again quits now, without saving)" if signum == signal.SIGINT else ""
        print(f"\n[{name}] stopping after this iteration to write a resumable checkpoint{tip}", file=sys.stderr,
              flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._saved_at = time.monotonic()
        if not _in_main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def _keeps_last(self, trainer: L.Trainer) -> bool:
        return any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in trainer.callbacks)

    def _save(self, trainer: L.Trainer) -> Path:
        path = checkpoint_dir(trainer) / self.filename
        for callback in trainer.callbacks:  # its next last.ckpt then replaces this one (no last-v1.ckpt)
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath == str(path.parent):
                callback.last_model_path = str(path)
        trainer.save_checkpoint(path, weights_only=False)  # the full resumable state (optimisers, loops, callbacks)
        self._saved_at = time.monotonic()
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._keeps_last(trainer):
            # last.ckpt is always the final state: ModelCheckpoint saves it only with a periodic checkpoint
            # (it lags when max_epochs is no multiple of the period) and versions it (last-v1.ckpt) when an
            # interrupted run's last.ckpt is already there.
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        halt = self.guard.halt_reason if self.guard is not None else None
        signalled = self.received is not None
        if trainer.world_size > 1:  # a signal or a failing reward may reach one process only: all stop together
            signalled = bool(trainer.strategy.reduce_boolean_decision(signalled, all=False))
            if bool(trainer.strategy.reduce_boolean_decision(halt is not None, all=False)):
                halt = halt or "another process stopped"
        if not signalled and not halt:
            due = self.every_minutes is not None and time.monotonic() - self._saved_at >= 60 * self.every_minutes
            if trainer.world_size > 1:
                due = bool(trainer.strategy.reduce_boolean_decision(due, all=False))
            if due and self._keeps_last(trainer):
                self._save(trainer)
            return
        self.received = self.received or "signal in another process"
        path = self._save(trainer)
        where = f"saved a resumable checkpoint to {path.resolve()} (resume with --ckpt_path {path.resolve()})"
        if halt:
            raise TrainingHalted(f"{halt}; {where}")
        print(f"[{self.received}] {where}", file=sys.stderr, flush=True)
        raise RunInterrupted(self.received)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class NonFiniteGuard:
    """Skips an RL update when anything in it is non-finite, and halts after too many in a row.

    A non-finite reward, log-prob or value skips the update before it starts; a non-finite loss or gradient
    found mid-update (:class:`NonFiniteUpdate`) rolls weights, optimiser states, reward statistics and
    estimator state back to a snapshot taken before it (``rollback``).  ``max_bad_iterations`` skips in a row
    set :attr:`halt_reason`, which :class:`GracefulStop` turns into a stop with a checkpoint.  Every process
    skips together (``everywhere`` agrees across processes).

    Args:
        max_bad_iterations: skipped iterations in a row that stop the run.
        rollback: keep a copy of the trainable weights and optimiser states during each update, so that a
            non-finite loss or gradient mid-update undoes the whole iteration (``False`` saves that memory:
            only the remaining minibatches are skipped).

    Attributes:
        skipped_iterations: iterations skipped so far (``fault/skipped_iterations``).
        consecutive_bad: skipped iterations in a row.
        halt_reason: why the run must stop, or ``None``.
    """

    def __init__(self, max_bad_iterations: int = 3, rollback: bool = True) -> None:
        if max_bad_iterations < 1:
            raise ValueError(f"max_bad_iterations must be >= 1 (got {max_bad_iterations})")
        self.max_bad_iterations = max_bad_iterations
        self.rollback = rollback
        self.skipped_iterations, self.consecutive_bad = 0, 0
        self.halt_reason: str | None = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped_iterations": int(self.skipped_iterations), "consecutive_bad": int(self.consecutive_bad)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_iterations, self.consecutive_bad = state["skipped_iterations"], state["consecutive_bad"]

    def call(self, fn: Callable[[], Any], what: str, iteration: int) -> tuple[Any, str | None]:
        """``(fn(), None)``, or ``(None, problem)`` when ``fn`` raised: the run then stops at the end of the
        iteration with a checkpoint (:attr:`halt_reason`), instead of with a traceback and no checkpoint."""
        try:
            return fn(), None
        except Exception as err:  # noqa: BLE001 - any failure of user code: stop cleanly with a checkpoint
            problem = f"{what} raised {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            self.halt_reason = f"iteration {iteration}: {problem}; fix it, then resume"
            return None, problem

    def run(self, update: Callable[[], dict[str, float]], problem: str | None,
            snapshot: Callable[[], TrainableSnapshot], everywhere: Callable[[bool], bool], iteration: int,
            log: Callable[[str], None] = print) -> dict[str, float]:
        """``update()`` unless ``problem`` (a description of non-finite inputs, see :func:`nonfinite_inputs`).

        Args:
            update: runs the update and returns its metrics; raises :class:`NonFiniteUpdate` mid-way.
            problem: why the inputs are unusable, or ``None``.
            snapshot: takes the snapshot to roll back to (called only with ``rollback``).
            everywhere: ``everywhere(ok)`` is whether ``ok`` holds in every process.
            iteration: the iteration's index, for the message.
            log: prints the skip message.

        Returns:
            the update's metrics plus ``fault/skipped`` and ``fault/skipped_iterations``.
        """
        if not everywhere(problem is None) and problem is None:
            problem = "another process had non-finite rewards, log-probs or values"
        untouched = True
        if problem is None:
            saved = snapshot() if self.rollback else None
            try:
                metrics = update()
                self.consecutive_bad = 0
                return {**metrics, "fault/skipped": 0.0, "fault/skipped_iterations": float(self.skipped_iterations)}
            except NonFiniteUpdate as err:
                if saved is not None:
                    saved.restore()
                untouched, problem = saved is not None, str(err)
        self.skipped_iterations += 1
        self.consecutive_bad += 1
        limit = self.max_bad_iterations
        kept = ", weights unchanged" if untouched else " (its earlier minibatch steps stand)"
        log(f"[iteration {iteration}] update skipped{kept}: {problem} "
            f"({self.consecutive_bad} in a row; the run stops at {limit})")
        if self.consecutive_bad >= limit:
            self.consecutive_bad = 0
            self.halt_reason = (f"{limit} consecutive iterations had non-finite values (last, iteration "
                                f"{iteration}: {problem}); fix the reward or lower the learning rates, then resume")
        return {"fault/skipped": 1.0, "fault/skipped_iterations": float(self.skipped_iterations)}
