"""Held-out evaluation as a callback: the configurable, richer form of the modules' built-in evaluation.

**Which to use.** :class:`~lit_diffac.modules.LatentActorCritic` (and GRPO, DDPO, ...) always evaluates
before and after training (``eval_every_n_iterations`` adds periodic points); those figures go to
``summary.json``.  This callback draws the images the same way — :func:`lit_diffac.evaluation.generate`
with the same default prompts, samples per prompt, seed and sampler, CFG off — and scores them with the
same :func:`~lit_diffac.evaluation.score_images`, so at equal settings its ``eval/<reward>`` values are the
built-in ones (a test checks this).  On top it logs a diversity measure, torchmetrics' CLIP score and
extra rewards, on other prompts or seeds if configured.  Use the built-in evaluation for the base / final
figures and the callback for periodic monitoring (set ``eval_every_n_iterations: 0`` so the two do not
evaluate the same iterations twice, as the toy recipes do).

Logged at the number of iterations completed (see :mod:`lit_diffac.callbacks.periodic`):

* ``eval/<reward>`` and ``eval/<reward>_accuracy`` — every reward's mean (the module's rewards and
  ``eval_rewards``, plus the callback's ``rewards``);
* ``eval/diversity`` — mean pairwise RMS pixel distance between the samples of the same prompt (0 = all
  samples of a prompt identical: mode collapse);
* ``eval/clip_score`` (torchmetrics ``CLIPScore``, 100·cos) and ``eval/clip_diversity`` (the same pairwise
  distance between unit CLIP image embeddings) when ``clip_model`` names a local CLIP folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from lit_diffac.callbacks.periodic import PeriodicCallback, policy_parts
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.evaluation import EVAL_SEED, expand_prompts, generate, score_images
from lit_diffac.rewards.base import Reward

__all__ = ["HeldOutEvaluation", "mean_pairwise_distance"]


def mean_pairwise_distance(features: torch.Tensor, groups: Sequence[str]) -> float:
    """Mean Euclidean distance between the rows of ``features [N, D]`` that share a group label,
    averaged first over the pairs of each group, then over the groups that have at least two rows.

    Returns NaN when no group has two rows.
    """
    if features.shape[0] != len(groups):
        raise ValueError(f"{features.shape[0]} feature rows for {len(groups)} group labels")
    features = features.detach().float().flatten(1)
    index: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        index.setdefault(group, []).append(i)
    per_group = []
    for rows in index.values():
        if len(rows) < 2:
            continue
        distances = torch.cdist(features[rows], features[rows])
        upper = torch.triu_indices(len(rows), len(rows), offset=1)
        per_group.append(distances[upper[0], upper[1]].mean())
    return torch.stack(per_group).mean().item() if per_group else math.nan


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` → ``[N, 3HW] / sqrt(3HW)``: Euclidean distances become RMS per-pixel differences."""
    flat = images.detach().float().flatten(1)
    return flat / math.sqrt(flat.shape[1])


class ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors, as torchmetrics' ``CLIPScore`` expects (recent ``transformers`` return output objects)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from lit_diffac.rewards.clip import clip_image_embeds

        return clip_image_embeds(self.model, pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.model.text_projection(pooled)


class HeldOutEvaluation(PeriodicCallback):
    """Periodic held-out evaluation of the policy, logged under ``eval/…`` (see the module docstring).

    Args:
        every_n_steps: evaluate every N RL iterations (0: only ``at_start`` / ``at_end``).
        prompts: prompt source (default: the module's ``eval_prompts``).
        samples_per_prompt: samples per prompt (default: the module's ``eval_samples_per_prompt``); at least
            2 for the diversity measure.
        seed: seed of the evaluation noise (the same every time, so points compare).
        rewards: extra rewards measured here only (e.g. a held-out judge).
        module_rewards: also measure the module's training and ``eval_rewards``.
        clip_model: a local folder with a ``transformers`` CLIPModel, its tokenizer and
            ``preprocessor_config.json`` (e.g. a download of ``openai/clip-vit-large-patch14``): adds
            ``eval/clip_score`` and ``eval/clip_diversity``.  Nothing is downloaded.
        diversity: log ``eval/diversity``.
        at_start, at_end: also evaluate before / after training (the module already does both by default).
        batch_size: images generated per chunk.
        verbose: print one line per evaluation.
        record_history: append each result to the module's ``eval_history`` (so ``summary.json`` lists it).
    """

    def __init__(self, every_n_steps: int = 50, prompts: PromptSource | None = None,
                 samples_per_prompt: int | None = None, seed: int = EVAL_SEED, rewards: Sequence[Reward] = (),
                 module_rewards: bool = True, clip_model: str | None = None, diversity: bool = True,
                 at_start: bool = False, at_end: bool = False, batch_size: int = 256, verbose: bool = True,
                 record_history: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, at_start=at_start, at_end=at_end)
        if samples_per_prompt is not None and samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1 (got {samples_per_prompt})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.prompts = load_prompts(prompts) if prompts is not None else None
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.rewards = list(rewards)
        self.module_rewards = module_rewards
        self.clip_model = clip_model
        if clip_model is not None:
            from lit_diffac.rewards.clip import check_weights

            check_weights(clip_model, what="HeldOutEvaluation clip_model", kind="folder",
                          files=("config.json", "preprocessor_config.json"),
                          get="Pass a local folder holding a transformers CLIPModel, its tokenizer and "
                              "preprocessor_config.json (e.g. a download of openai/clip-vit-large-patch14).")
        self.diversity = diversity
        self.batch_size = batch_size
        self.verbose = verbose
        self.record_history = record_history
        self._clip = None

    # ------------------------------------------------------------------ pieces
    def resolve(self, pl_module: L.LightningModule) -> tuple[list[str], int, list]:
        """``(prompts, samples_per_prompt, rewards)`` after filling the defaults from the module."""
        prompts = self.prompts if self.prompts is not None else list(getattr(pl_module, "eval_prompt_list", []))
        if not prompts:
            raise ValueError("HeldOutEvaluation: no prompts (set its `prompts`, or use a module with eval_prompts)")
        samples = self.samples_per_prompt or getattr(getattr(pl_module, "hparams", {}), "eval_samples_per_prompt",
                                                     None) or 25
        rewards = [*pl_module.rewards, *getattr(pl_module, "eval_rewards", [])] if self.module_rewards else []
        names = {r.name for r in rewards}
        rewards += [r for r in self.rewards if r.name not in names]
        if not rewards and not self.diversity and self.clip_model is None:
            raise ValueError("HeldOutEvaluation measures nothing: give it rewards, diversity or a clip_model")
        return prompts, samples, rewards

    def clip_metric(self, device: torch.device):
        """torchmetrics ``CLIPScore`` on :attr:`clip_model` (loaded once, offline) and the image preprocessing
        that matches its processor config."""
        if self._clip is None:
            from torchmetrics.multimodal import CLIPScore
            from transformers import CLIPModel, CLIPProcessor

            from lit_diffac.rewards.clip import ClipImagePreprocess

            folder = str(Path(self.clip_model))

            def load():
                return (ClipFeatures(CLIPModel.from_pretrained(folder, local_files_only=True).eval()),
                        CLIPProcessor.from_pretrained(folder, local_files_only=True))

            self._clip = (CLIPScore(model_name_or_path=load), ClipImagePreprocess.from_processor_config(folder))
        metric, preprocess = self._clip
        return metric.to(device), preprocess.to(device)

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate the evaluation images with the module's policy and return every ``eval/…`` metric."""
        backbone, sampler = policy_parts(pl_module, type(self).__name__)
        prompts, samples, rewards = self.resolve(pl_module)
        expanded = expand_prompts(prompts, samples)
        images = generate(backbone, sampler, expanded, seed=self.seed, batch_size=self.batch_size,
                          device=pl_module.device)
        metrics = score_images(images, expanded, rewards)
        if self.diversity:
            metrics["eval/diversity"] = mean_pairwise_distance(pixel_features(images), expanded)
        if self.clip_model is not None:
            from lit_diffac.rewards.clip import quantize

            metric, preprocess = self.clip_metric(images.device)
            metric.reset()
            for start in range(0, len(expanded), self.batch_size):
                metric.update(quantize(images[start:start + self.batch_size]),
                              expanded[start:start + self.batch_size])
            metrics["eval/clip_score"] = float(metric.compute())
            embeds = metric.model.get_image_features(preprocess(images)).float()
            metrics["eval/clip_diversity"] = mean_pairwise_distance(
                embeds / embeds.norm(dim=-1, keepdim=True), expanded)
        return metrics

    # ------------------------------------------------------------------ the callback
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, label: str) -> None:
        metrics = self.measure(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
        history = getattr(pl_module, "eval_history", None)
        if self.record_history and isinstance(history, list):
            history.append({"iteration": step, "label": f"callback-{label}",
                            "samples_seen": getattr(pl_module, "samples_seen", None), **metrics})
        if self.verbose:
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
            samples = getattr(pl_module, "samples_seen", None)
            where = f"iteration {step}" + ("" if samples is None else f", {samples} samples")
            pl_module.print(f"[eval {label} @ {where}] {shown}")
