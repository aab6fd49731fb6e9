"""The schedule shared by the monitoring callbacks: every N training steps, optionally at start and end.

For the RL modules one training step is one RL iteration (one Lightning epoch of one batch), so
``every_n_steps=50`` means every 50 iterations.  Output is logged at the number of iterations completed
(0 before training, 50 after the 50th iteration, ...): the step axis of the module's own ``train/…``
metrics, whose iteration ``k`` rolls out the policy after ``k`` updates.
"""

from __future__ import annotations

import abc
from typing import Any

import lightning as L

__all__ = ["PeriodicCallback", "log_step", "policy_parts"]


def log_step(trainer: L.Trainer) -> int:
    """The logger step of a callback's output: training steps completed (RL iterations for the RL modules,
    whose ``train/…`` metrics of iteration ``k`` — rollouts of the policy after ``k`` updates — are logged
    at ``k``; so a point at step ``k`` always describes the policy after ``k`` updates)."""
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


def policy_parts(pl_module: L.LightningModule, who: str) -> tuple[Any, Any]:
    """``(backbone, sampler)`` of a policy module; a clear error for a module that has none."""
    backbone, sampler = getattr(pl_module, "backbone", None), getattr(pl_module, "sampler", None)
    if backbone is None or sampler is None:
        raise TypeError(f"{who} needs a module with a `backbone` and a `sampler` (LatentActorCritic, GRPO, DDPO, "
                        f"...), got {type(pl_module).__name__}; remove it from trainer.callbacks")
    return backbone, sampler


class PeriodicCallback(L.Callback, abc.ABC):
    """Runs :meth:`run` every ``every_n_steps`` training steps, and optionally before and after training.

    Periodic runs never include the final step: the end of training is ``at_end``'s (with the RL modules'
    own final evaluation, a periodic run there would only repeat it).

    Args:
        every_n_steps: period in training steps (RL iterations); 0 disables the periodic runs.
        at_start: also run before the first step (the base policy).
        at_end: also run after the last step.
    """

    def __init__(self, every_n_steps: int = 50, at_start: bool = False, at_end: bool = False) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 = never; got {every_n_steps})")
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.at_end = at_end

    @abc.abstractmethod
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, label: str) -> None:
        """Do the work; ``step`` is the logger step, ``label`` one of ``"start"``, ``"periodic"``, ``"end"``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and log_step(trainer) == 0:  # not on a resumed run
            self.run(trainer, pl_module, log_step(trainer), "start")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        done = log_step(trainer)  # training steps completed, resumes included
        if not self.every_n_steps or done % self.every_n_steps:
            return
        if _is_last_step(trainer, batch_idx):
            return
        self.run(trainer, pl_module, done, "periodic")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.run(trainer, pl_module, log_step(trainer), "end")


def _is_last_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended is the last one of the fit (by ``max_epochs`` or ``max_steps``)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_batch = batch_idx + 1 >= trainer.num_training_batches
    return bool(last_batch and trainer.max_epochs is not None and trainer.max_epochs > 0
                and trainer.current_epoch + 1 >= trainer.max_epochs)
