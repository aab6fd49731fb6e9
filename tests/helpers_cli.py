"""A tiny LightningModule for the CLI tests (no datamodule: it supplies its own ``train_dataloader``)."""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyRegression(L.LightningModule):
    """Fit a linear layer to random data.

    Args:
        lr: SGD learning rate.
        hidden: input width of the linear layer.
        other: an unused integer (target of interpolation tests).
        write_summary: write ``summary.json`` into ``trainer.log_dir`` at the end of fit.
    """

    def __init__(self, lr: float = 0.1, hidden: int = 4, other: int = 0, write_summary: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, self.hparams.hidden, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.hparams.write_summary and self.trainer.log_dir is not None:
            os.makedirs(self.trainer.log_dir, exist_ok=True)
            with open(os.path.join(self.trainer.log_dir, "summary.json"), "w") as f:
                json.dump({"hidden": self.hparams.hidden, "other": self.hparams.other}, f)


def echo_command(argv: list[str]) -> int:
    """Print the arguments (an extra command for the CLI tests)."""
    print("echo:", " ".join(argv))
    return 0
