"""Pretraining of the embedded toy text-to-image models (the RL starting points).

``lit-diffac run recipes/toy/pretrain_unet.yaml`` (or ``pretrain_dit.yaml``) trains a toy backbone and its
tiny CLIP text encoder from scratch on the digits' train split with prompts from the training templates,
then writes a diffusers pipeline folder to ``output_dir``.  A held-out alignment evaluation (the digit
classifier judging samples for held-out prompt templates, CFG off, RL sampler settings) runs every
``eval_every_n_steps`` and at the end; its figures go to TensorBoard and to ``lit_diffac.json``.

The base models are meant to *leave room for RL*: the recipes stop early, at a held-out alignment
between 20 % and 75 % (the two-digit task's, ``task="pairs"``: 10–30 % of samples with both digits right,
on seen and on unseen pairs alike; ``recipes/toy_pairs/pretrain_*.yaml``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_diffac.toy import pairs
from lit_diffac.toy.digits import DigitsSplit, load_digits
from lit_diffac.toy.evaluation import evaluate_pair_alignment, evaluate_toy_alignment
from lit_diffac.toy.models import build_toy_backbone, save_pipeline
from lit_diffac.toy.prompts import TRAIN_TEMPLATES, make_prompt


@dataclass(frozen=True)
class ToyTask:
    """What pretraining needs to know about a toy task: its training images and prompts, and its evaluation.

    Attributes:
        templates: the training prompt templates.
        make_prompt: ``(label, template) → prompt``, a label being a digit or a ``[left, right]`` pair.
        evaluate: the held-out evaluation (:mod:`lit_diffac.toy.evaluation`).
        logged: the evaluation's keys logged to TensorBoard (as ``eval/<key>``).
        composed: images are composed afresh every step (:func:`lit_diffac.toy.pairs.sample_canvases`, seen
            pairs only) instead of read from the data set.
    """

    templates: tuple[str, ...]
    make_prompt: Callable[[object, str], str]
    evaluate: Callable[..., dict[str, float]]
    logged: tuple[str, ...]
    composed: bool = False

    def dataloader(self, data: DigitsSplit, batch_size: int) -> DataLoader:
        if self.composed:  # canvases are composed in training_step; an epoch has as many steps as the digits'
            return DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch_size, shuffle=False,
                              drop_last=True)
        return DataLoader(TensorDataset(data.images, data.labels), batch_size=batch_size, shuffle=True,
                          drop_last=True)

    def images_and_labels(self, batch, data: DigitsSplit, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's images ``[N, 3, H, W]`` and labels (``[N]`` digits or ``[N, 2]`` pairs)."""
        if self.composed:
            images, labels = pairs.sample_canvases(data, batch[0].shape[0], pairs.SEEN_PAIRS)
            return images.to(device), labels
        return batch

    def prompts(self, labels: torch.Tensor, cond_dropout: float) -> list[str]:
        """A random training prompt per label, ``""`` with probability ``cond_dropout`` (for CFG)."""
        templates = torch.randint(len(self.templates), (labels.shape[0],), device="cpu").tolist()
        drop = (torch.rand(labels.shape[0], device="cpu") < cond_dropout).tolist()
        return ["" if d else self.make_prompt(label, self.templates[k])
                for label, k, d in zip(labels.tolist(), templates, drop)]

    def describe(self, metrics: dict) -> str:
        """The console line's figures of an evaluation."""
        line = f"held-out alignment {metrics['alignment_accuracy']:.3f}"
        if "alignment_accuracy_seen" in self.logged:
            line += (f" (seen pairs {metrics['alignment_accuracy_seen']:.3f}, unseen pairs "
                     f"{metrics['alignment_accuracy_unseen']:.3f})")
        return line


TASKS = {
    "digits": ToyTask(TRAIN_TEMPLATES, lambda digit, template: make_prompt(int(digit), template),
                      evaluate_toy_alignment, ("alignment_accuracy", "digit_probability")),
    "pairs": ToyTask(pairs.TRAIN_TEMPLATES, lambda pair, template: pairs.make_pair_prompt(*pair, template),
                     evaluate_pair_alignment,
                     ("alignment_accuracy", "alignment_accuracy_seen", "alignment_accuracy_unseen", "pair_probability"),
                     composed=True),
}


class ToyBasePretraining(L.LightningModule):
    """Denoising pretraining of a toy UNet (ε-prediction, DDPM noise) or DiT (flow matching, v = ε − x₀).

    Args:
        family: ``"unet"`` (DDIM family) or ``"dit"`` (flow family).
        task: ``"digits"`` (one 16×16 digit per image) or ``"pairs"`` (two-digit 16×32 canvases composed afresh
            every step from the train split's digits, for the seen pairs only, with the pair training templates;
            :mod:`lit_diffac.toy.pairs`).
        output_dir: where the pipeline folder is written at the end of training.
        lr: AdamW learning rate (denoiser and text encoder).
        batch_size: images per step.
        cond_dropout: probability of replacing a prompt by ``""`` (enables classifier-free guidance).
        eval_every_n_steps: held-out alignment evaluation period (0: only at the end).
        eval_samples_per_prompt: samples per held-out prompt in each evaluation.
        eval_steps: sampler steps for evaluation (match the RL recipes).
    """

    def __init__(
        self,
        family: Literal["unet", "dit"] = "unet",
        task: Literal["digits", "pairs"] = "digits",
        output_dir: str = "runs/toy-unet",
        lr: float = 1e-3,
        batch_size: int = 64,
        cond_dropout: float = 0.1,
        eval_every_n_steps: int = 250,
        eval_samples_per_prompt: int = 10,
        eval_steps: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.save_hyperparameters()
        self.task = TASKS[task]
        self.backbone = build_toy_backbone(family, task=task)
        # The toy text encoder is trained jointly with the denoiser (it is frozen later, in RL).
        self.backbone.text_encoder.requires_grad_(True).train()
        self._data = load_digits("train")
        self._started = time.time()
        self.eval_history: list[dict] = []

    def train_dataloader(self) -> DataLoader:
        return self.task.dataloader(self._data, self.hparams.batch_size)

    def configure_optimizers(self):
        params = list(self.backbone.denoiser.parameters()) + list(self.backbone.text_encoder.parameters())
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=1e-4)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self.task.images_and_labels(batch, self._data, self.device)
        prompts = self.task.prompts(labels, self.hparams.cond_dropout)
        embeds = self.backbone._encode(prompts)  # with grad: the text encoder trains
        noise = torch.randn_like(images)
        if self.hparams.family == "unet":
            scheduler = self.backbone.scheduler
            t = torch.randint(scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
            noisy = scheduler.add_noise(images, noise, t)
            target, model_t = noise, t
        else:
            sigma = torch.rand(images.shape[0], device=images.device)
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1.0 - s) * images + s * noise
            target, model_t = noise - images, sigma * self.backbone.scheduler.config.num_train_timesteps
        prediction = self.backbone(noisy, model_t, embeds).prediction
        loss = F.mse_loss(prediction.float(), target.float())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.hparams.eval_every_n_steps
        if every and self.global_step % every == 0:
            self._evaluate()

    def _evaluate(self) -> dict:
        self.backbone.clear_prompt_cache()
        metrics = self.task.evaluate(
            self.backbone, samples_per_prompt=self.hparams.eval_samples_per_prompt, num_steps=self.hparams.eval_steps)
        self.backbone.clear_prompt_cache()
        metrics = {"step": self.global_step, "minutes": (time.time() - self._started) / 60, **metrics}
        self.eval_history.append(metrics)
        if self.logger is not None:
            for key in self.task.logged:
                self.logger.log_metrics({f"eval/{key}": metrics[key]}, step=self.global_step)
        self.print(f"step {self.global_step}: {self.task.describe(metrics)}")
        return metrics

    def on_train_end(self) -> None:
        final = self._evaluate() if not self.eval_history or self.eval_history[-1]["step"] != self.global_step \
            else self.eval_history[-1]
        out = save_pipeline(self.backbone, self.hparams.output_dir, task=self.hparams.task, provenance={
            "trained_by": "lit_diffac.modules.toy_pretrain.ToyBasePretraining",
            "hparams": dict(self.hparams), "steps": self.global_step, "final_eval": final,
            "eval_history": self.eval_history,
        })
        self.print(f"saved toy {self.hparams.family} pipeline to {Path(out).resolve()}")
