"""A progress bar for RL runs: one tqdm bar over all iterations with the numbers that matter.

Lightning's default bar restarts every epoch, and for the RL modules an epoch is one iteration of one
batch, so it shows ``Epoch 17: 1/1`` with no sense of the run.  :class:`RLProgressBar` keeps a single bar
over ``trainer.max_epochs`` iterations and shows, from the module's latest iteration metrics
(``last_metrics``): the first reward's batch mean, the approximate KL of the update and the critic's
explained variance, e.g. ``iteration 118/300 [01:58<03:00] reward=0.62 approx_kl=3.1e-06 ev=0.14``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["RLProgressBar", "DEFAULT_METRICS", "format_metrics"]

#: Shown label → key of the module's iteration metrics; ``{reward}`` is the module's first reward name.
DEFAULT_METRICS: dict[str, str] = {
    "reward": "reward/{reward}_mean",
    "approx_kl": "train/approx_kl",
    "ev": "train/explained_variance",
}


def format_metrics(metrics: dict[str, float], shown: dict[str, str]) -> dict[str, str]:
    """``{label: "3 significant digits"}`` for each ``shown`` key present and finite in ``metrics``."""
    out = {}
    for label, key in shown.items():
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            out[label] = f"{value:.3g}"
    return out


class RLProgressBar(TQDMProgressBar):
    """A ``TQDMProgressBar`` with one bar over all RL iterations (see the module docstring).

    Args:
        metrics: shown label → metric key in the module's ``last_metrics`` (default :data:`DEFAULT_METRICS`;
            ``{reward}`` is replaced by the first reward's name).  Missing keys are left out (no critic: no
            ``ev``).
        refresh_rate: update the bar every N iterations.
        process_position: tqdm position (for several concurrent bars).
    """

    def __init__(self, metrics: dict[str, str] | None = None, refresh_rate: int = 1,
                 process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)

    def init_train_tqdm(self, total: float | None = None, initial: int = 0) -> Tqdm:
        return Tqdm(desc="iteration", total=total, initial=initial, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def total_iterations(self, trainer: L.Trainer) -> float | None:
        """Iterations (training steps) of the whole fit, or ``None`` when unbounded."""
        batches = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps if batches == 1 or not math.isfinite(batches) else None
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
            return trainer.max_epochs * batches
        return None

    def shown_metrics(self, pl_module: L.LightningModule) -> dict[str, str]:
        """The postfix: the configured metrics of the module's latest iteration."""
        names = [r.name for r in getattr(pl_module, "rewards", [])]
        shown = {label: key.replace("{reward}", names[0] if names else "reward") for label, key in self.metrics.items()}
        return format_metrics(getattr(pl_module, "last_metrics", None) or {}, shown)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # a resumed run starts where it stopped
        self.train_progress_bar = self.init_train_tqdm(total=self.total_iterations(trainer), initial=done)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing to reset per epoch (= per iteration)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        bar = self.train_progress_bar
        if self._should_update(done, bar.total or 0):
            bar.n = done
            bar.set_postfix(self.shown_metrics(pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the bar open across epochs (iterations)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        return dict(self.shown_metrics(pl_module))

    def open_bar(self) -> Tqdm | None:
        """The bar text should be written above: an open (not closed, not disabled) one, or ``None``."""
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar,
                    self._predict_progress_bar):
            if bar is not None and not bar.disable:  # tqdm.close() sets ``disable``
                return bar
        return None

    def print(self, *args: Any, sep: str = " ", end: str = "\n", file: Any = None, flush: bool = False) -> None:
        """What ``LightningModule.print`` calls: the text always reaches ``file`` (default: stdout), above the
        bar while one is open (``tqdm.write``, so the bar is redrawn underneath) and with ``print`` otherwise
        (Lightning's own bar drops it then: before training and after the bar is closed)."""
        text = sep.join(map(str, args))
        bar = self.open_bar()
        if bar is not None:
            bar.write(text, file=file, end=end)
            if flush:
                (file or sys.stdout).flush()
        else:
            print(text, end=end, file=file if file is not None else sys.stdout, flush=flush)
