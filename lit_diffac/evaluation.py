"""Held-out evaluation: fixed prompts, fixed seeds, the policy's own CFG, every reward's mean, diversity, CLIP score.

:class:`HeldOutEvaluation` is the RL modules' one evaluation path (before training, every
``every_n_iterations`` and at the end; the results go to the run's :class:`~lit_diffac.history.RunHistory`
and ``summary.json``).  Its functions (:func:`generate`, :func:`score_images`) also serve toy base-model
pretraining, ``lit-diffac toy-eval`` and the sample grids, so all their figures are comparable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from lit_diffac.backbones.base import DiffusionBackbone
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.resume import capture_rng_state, restore_rng_state
from lit_diffac.rewards.base import Reward
from lit_diffac.rollout import collect_rollout
from lit_diffac.samplers import DDIMSampler, FlowSDESampler
from lit_diffac.samplers.base import Sampler

__all__ = ["EVAL_SEED", "HeldOutEvaluation", "default_sampler", "evaluate", "expand_prompts", "generate",
           "mean_pairwise_distance", "score_images"]

#: Seed of the held-out evaluation noise (fixed across runs so figures compare).
EVAL_SEED = 12345


def default_sampler(backbone: DiffusionBackbone, num_steps: int = 10) -> Sampler:
    """The RL sampler of a backbone's family: DDIM with η = 1, or the flow SDE with noise level 0.7."""
    sampler = DDIMSampler(num_steps=num_steps, eta=1.0) if backbone.sampler_family == "ddim" \
        else FlowSDESampler(num_steps=num_steps, noise_level=0.7)
    sampler.setup(backbone.scheduler)
    return sampler


@torch.no_grad()
def generate(backbone: DiffusionBackbone, sampler: Sampler, prompts: Sequence[str], seed: int = EVAL_SEED,
             batch_size: int = 256, cfg_scale: float | None = None, device: torch.device | str | None = None
             ) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] for ``prompts``, reproducible from ``seed`` (chunks of ``batch_size``),
    with the backbone's ``cfg_scale`` unless ``cfg_scale`` is given."""
    device = torch.device(device) if device is not None else next(backbone.denoiser.parameters()).device
    was_training = backbone.training
    backbone.eval()
    images = []
    try:
        for start in range(0, len(prompts), batch_size):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
            chunk = list(prompts[start:start + batch_size])
            images.append(collect_rollout(backbone, sampler, chunk, generator=generator, cfg_scale=cfg_scale,
                                          device=device).images)
    finally:
        backbone.train(was_training)
    return torch.cat(images)


@torch.no_grad()
def evaluate(backbone: DiffusionBackbone, sampler: Sampler, prompts: Sequence[str], rewards: Sequence,
             samples_per_prompt: int = 25, seed: int = EVAL_SEED, cfg_scale: float | None = None,
             device: torch.device | str | None = None) -> dict[str, float]:
    """``{"eval/<reward>": mean, "eval/<reward>_accuracy": ...}`` over ``prompts × samples_per_prompt``.

    A reward with an ``accuracy(images, prompts)`` method (e.g. the toy digit alignment) also reports it, and one
    with ``accuracy_by_group`` its accuracy per group (:func:`score_images`).
    """
    expanded = expand_prompts(prompts, samples_per_prompt)
    images = generate(backbone, sampler, expanded, seed=seed, cfg_scale=cfg_scale, device=device)
    return score_images(images, expanded, rewards)


def expand_prompts(prompts: Sequence[str], samples_per_prompt: int) -> list[str]:
    """Each prompt repeated ``samples_per_prompt`` times in a row (the held-out evaluation's order)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1 (got {samples_per_prompt})")
    return [p for p in prompts for _ in range(samples_per_prompt)]


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: Sequence[str], rewards: Sequence,
                 prefix: str = "eval/") -> dict[str, float]:
    """``{prefix + reward.name: mean score}`` of ``images [N, 3, H, W]`` for ``prompts``, plus
    ``{prefix + reward.name + "_accuracy": ...}`` for rewards with an ``accuracy(images, prompts)`` method and
    ``{prefix + reward.name + "_accuracy_" + group: ...}`` for each non-empty group of a reward with an
    ``accuracy_by_group(images, prompts) -> {group: accuracies of its samples}`` method (e.g. the two-digit task's
    seen and unseen pairs)."""
    prompts = list(prompts)
    out = {}
    for reward in rewards:
        out[f"{prefix}{reward.name}"] = reward(images, prompts).mean().item()
        for key, values in accuracies(reward, images, prompts).items():
            out[prefix + key] = values.float().mean().item()
    return out


def accuracies(reward, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """A reward's per-sample accuracies by name: ``{name + "_accuracy": [N]}`` when it has an ``accuracy(images,
    prompts)`` method, and ``{name + "_accuracy_" + group: [n_group]}`` for each non-empty group of its
    ``accuracy_by_group`` (e.g. the two-digit task's seen and unseen pairs); ``{}`` for a reward with neither."""
    out = {}
    if hasattr(reward, "accuracy"):
        out[f"{reward.name}_accuracy"] = reward.accuracy(images, prompts)
    if hasattr(reward, "accuracy_by_group"):
        out.update({f"{reward.name}_accuracy_{group}": values
                    for group, values in reward.accuracy_by_group(images, prompts).items() if values.numel()})
    return out


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


class HeldOutEvaluation:
    """The held-out evaluation of an RL module's policy (its ``evaluation`` component).

    Images are drawn with the module's backbone and sampler from fixed prompts and seeds, with the backbone's
    ``cfg_scale`` (the guidance it trains with; 1.0, off, in the toy and SD recipes), and scored with every
    training reward plus ``rewards``; :meth:`measure` returns ``{"eval/<reward>": mean,
    "eval/<reward>_accuracy": …, "eval/diversity": …, "eval/clip_score": …, "eval/clip_diversity": …}``:

    * ``eval/diversity`` — mean pairwise RMS pixel distance between the samples of the same prompt (0 = all
      samples of a prompt identical: mode collapse; reported when ``samples_per_prompt >= 2``);
    * ``eval/clip_score`` (torchmetrics ``CLIPScore``, 100·cos) and ``eval/clip_diversity`` (the pairwise
      distance between unit CLIP image embeddings) when ``clip_model`` names a local CLIP folder.

    The module evaluates before training, every ``every_n_iterations`` and after the last iteration.

    Args:
        prompts: prompt source (``"toy:heldout"``, a text file, or a list).
        samples_per_prompt: samples per prompt.
        every_n_iterations: period of the evaluations during training (0: only before and after).
        rewards: rewards measured in evaluation only (e.g. the alignment judge while training on a hackable
            reward); one whose name a training reward already has is skipped.
        seed: seed of the evaluation noise (the same every time, so points compare).
        diversity: also report ``eval/diversity``.
        clip_model: a local folder with a ``transformers`` CLIPModel, its tokenizer and
            ``preprocessor_config.json`` (e.g. a download of ``openai/clip-vit-large-patch14``).  Nothing is
            downloaded.
        batch_size: images generated per chunk.
    """

    def __init__(self, prompts: PromptSource = "toy:heldout", samples_per_prompt: int = 25,
                 every_n_iterations: int = 0, rewards: Sequence[Reward] = (), seed: int = EVAL_SEED,
                 diversity: bool = True, clip_model: str | None = None, batch_size: int = 256) -> None:
        problems = [f"{name} must be >= {low} (got {value})" for name, value, low in
                    (("samples_per_prompt", samples_per_prompt, 1), ("every_n_iterations", every_n_iterations, 0),
                     ("batch_size", batch_size, 1)) if value < low]
        if problems:
            from lit_diffac.errors import ConfigError

            raise ConfigError("invalid HeldOutEvaluation: " + "; ".join(problems))
        self.prompts = load_prompts(prompts)
        self.samples_per_prompt = samples_per_prompt
        self.every_n_iterations = every_n_iterations
        self.rewards = list(rewards)
        self.seed = seed
        self.diversity = diversity
        self.clip_model = clip_model
        self.batch_size = batch_size
        if clip_model is not None:
            from lit_diffac.rewards.clip import check_weights

            check_weights(clip_model, what="HeldOutEvaluation clip_model", kind="folder",
                          files=("config.json", "preprocessor_config.json"),
                          get="Pass a local folder holding a transformers CLIPModel, its tokenizer and "
                              "preprocessor_config.json (e.g. a download of openai/clip-vit-large-patch14).")
        self._clip = None

    def run(self, module, label: str, iteration: int) -> dict[str, float]:
        """Evaluate an RL module's policy after ``iteration`` completed iterations; record the result in its
        ``history``, log it to every logger and print one line."""
        metrics = self.measure(module.backbone, module.sampler, list(module.rewards), module.device)
        module.history.record_evaluation(label, iteration, metrics)
        for logger in module.loggers:
            logger.log_metrics(finite(metrics), step=iteration)
        module.print(format_evaluation(label, iteration, module.history.samples_seen, metrics))
        return metrics

    def is_due(self, iterations_done: int, last: bool) -> bool:
        """Whether a periodic evaluation falls after ``iterations_done`` iterations (the last one is the final's)."""
        every = self.every_n_iterations
        return bool(every) and iterations_done % every == 0 and not last

    def all_rewards(self, training_rewards: Sequence) -> list:
        """The training rewards, then the evaluation-only ones whose names are new."""
        names = {r.name for r in training_rewards}
        return [*training_rewards, *(r for r in self.rewards if r.name not in names)]

    @torch.no_grad()
    def measure(self, backbone: DiffusionBackbone, sampler: Sampler, training_rewards: Sequence,
                device: torch.device | str | None = None) -> dict[str, float]:
        """Generate the evaluation images with the policy and return every ``eval/…`` metric.

        The global random number generators are left as they were (a reward may draw from them), so when and
        how often a run evaluates changes nothing in its training.
        """
        state = capture_rng_state()
        try:
            return self._measure(backbone, sampler, training_rewards, device)
        finally:
            restore_rng_state(state)

    def _measure(self, backbone, sampler, training_rewards, device) -> dict[str, float]:
        expanded = expand_prompts(self.prompts, self.samples_per_prompt)
        images = generate(backbone, sampler, expanded, seed=self.seed, batch_size=self.batch_size, device=device)
        rewards = self.all_rewards(training_rewards)
        if device is not None:
            for reward in rewards:
                reward.to(device)
        metrics = score_images(images, expanded, rewards)
        if self.diversity and self.samples_per_prompt >= 2:
            metrics["eval/diversity"] = mean_pairwise_distance(pixel_features(images), expanded)
        if self.clip_model is not None:
            metrics.update(self._clip_metrics(images, expanded))
        return metrics

    def _clip_metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        from lit_diffac.rewards.clip import quantize

        metric, preprocess = self._clip_scorer(images.device)
        metric.reset()
        for start in range(0, len(prompts), self.batch_size):
            metric.update(quantize(images[start:start + self.batch_size]), prompts[start:start + self.batch_size])
        embeds = metric.model.get_image_features(preprocess(images)).float()
        return {"eval/clip_score": float(metric.compute()),
                "eval/clip_diversity": mean_pairwise_distance(embeds / embeds.norm(dim=-1, keepdim=True), prompts)}

    def _clip_scorer(self, device: torch.device):
        """torchmetrics ``CLIPScore`` on :attr:`clip_model` (loaded once, offline) and the matching preprocessing."""
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


def format_evaluation(label: str, iteration: int, samples_seen: int, metrics: dict[str, float]) -> str:
    """The console line of an evaluation: ``[eval base @ iteration 0, 0 samples] digit_alignment 0.406, …``."""
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
    return f"[eval {label} @ iteration {iteration}, {samples_seen} samples] {shown}"


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` that a logger can plot (NaN / inf dropped)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
