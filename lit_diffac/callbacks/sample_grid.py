"""Sample grids: the same prompts and seeds every time, so a user sees the policy change.

Each tile is one sample (upscaled with nearest-neighbour to at least ``min_tile`` pixels wide), with its
prompt and rewards written underneath in PIL's default font.  The grid (tag ``samples/grid``) goes to every
logger of the trainer through that logger's own image API (:func:`log_grid`):

* TensorBoard (and any logger whose ``experiment`` has ``add_image``): ``experiment.add_image``;
* loggers with a ``log_image(key, images, step, caption=...)`` method (``WandbLogger``, and other loggers
  offering the same API): the grid with a caption naming the iteration and each tile's text;
* ``MLFlowLogger``: ``experiment.log_image(run_id, image, key=..., step=...)`` (an artifact file
  ``<tag>/iteration_<N>.png`` with MLflow versions before 2.12);
* ``CometLogger``: ``experiment.log_image(image, name=..., step=...)``;
* ``CSVLogger`` (scalars only) is skipped; any other logger too, with a one-time warning.

With ``save_png`` it is also written to ``<png_dir>/iteration_<N>.png``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lit_diffac.callbacks.periodic import PeriodicCallback, policy_parts
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.evaluation import EVAL_SEED, expand_prompts, generate

__all__ = ["SampleGrid", "annotate_grid", "grid_caption", "log_grid", "wrap_text"]

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def wrap_text(text: str, width: int, measure) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` (by ``measure(str) -> pixels``): at newlines, then at
    spaces, and inside a single word wider than ``width``."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        start = len(lines)
        for word in paragraph.split():
            if len(lines) > start and measure(f"{lines[-1]} {word}") <= width:
                lines[-1] = f"{lines[-1]} {word}"
                continue
            while len(word) > 1 and measure(word) > width:
                cut = 1
                while cut < len(word) - 1 and measure(word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
        if len(lines) == start:
            lines.append("")
    return lines


def annotate_grid(images: torch.Tensor, captions: Sequence[str], columns: int = 8,
                  min_tile: int = 128, gap: int = 4) -> Image.Image:
    """An RGB grid of ``images [N, 3, H, W]`` in [0, 1], each tile with its caption written underneath.

    Tiles are upscaled by an integer factor (nearest) to at least ``min_tile`` pixels wide and separated
    by ``gap`` white pixels; captions wrap to the tile width; every caption area has the height of the
    longest caption.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
    if columns < 1 or min_tile < 1 or gap < 0:
        raise ValueError(f"columns and min_tile must be >= 1 and gap >= 0 (got {columns}, {min_tile}, {gap})")
    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_tile / w))
    tile_w, tile_h = w * scale, h * scale
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_text(c, tile_w - 4, lambda t: scratch.textlength(t, font=font)) for c in captions]
    line_h = int(math.ceil(font.getbbox("Ag")[3])) + 2
    caption_h = max(len(lines) for lines in wrapped) * line_h + 4
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pitch_x, pitch_y = tile_w + gap, tile_h + caption_h + gap
    grid = Image.new("RGB", (cols * pitch_x - gap, rows * pitch_y - gap), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (array, lines) in enumerate(zip(pixels, wrapped)):
        x, y = (i % cols) * pitch_x, (i // cols) * pitch_y
        grid.paste(Image.fromarray(array).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + tile_h + 2 + j * line_h), line, fill=TEXT, font=font)
    return grid


class SampleGrid(PeriodicCallback):
    """Draw a fixed set of prompts with fixed noise every N iterations and log the annotated grid to every
    logger (each through its own image API: :func:`log_grid`).

    Args:
        every_n_steps: period in RL iterations (0: only ``at_start`` / ``at_end``).
        prompts: prompt source (default: ``num_prompts`` of the module's held-out evaluation prompts, evenly spaced).
        num_prompts: how many default prompts to take.
        samples_per_prompt: samples of each prompt (one row-major run of tiles each).
        seed: seed of the noise (the same every time).
        rewards: names of the rewards written under each image, one line each (default: the module's
            training rewards; ``[]``: only the prompt).  The module's evaluation-only rewards may be named too.
        columns: tiles per row.
        min_tile: tiles are upscaled to at least this many pixels wide.
        tag: the grid's tag / key in every logger.
        save_png: also write ``iteration_<N>.png`` files.
        png_dir: where (default: ``<trainer.log_dir>/sample_grids``).
        at_start, at_end: also draw before and after training (the base policy and the final one).
    """

    def __init__(self, every_n_steps: int = 50, prompts: PromptSource | None = None, num_prompts: int = 8,
                 samples_per_prompt: int = 1, seed: int = EVAL_SEED, rewards: Sequence[str] | None = None,
                 columns: int = 8,
                 min_tile: int = 128, tag: str = "samples/grid", save_png: bool = False, png_dir: str | None = None,
                 at_start: bool = True, at_end: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, at_start=at_start, at_end=at_end)
        if num_prompts < 1 or samples_per_prompt < 1:
            raise ValueError(f"num_prompts and samples_per_prompt must be >= 1 (got {num_prompts}, "
                             f"{samples_per_prompt})")
        if columns < 1 or min_tile < 1:
            raise ValueError(f"columns and min_tile must be >= 1 (got {columns}, {min_tile})")
        self.prompts = load_prompts(prompts) if prompts is not None else None
        self.num_prompts = num_prompts
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.rewards = list(rewards) if rewards is not None else None
        self.columns = columns
        self.min_tile = min_tile
        self.tag = tag
        self.save_png = save_png
        self.png_dir = png_dir
        self.last_grid: Image.Image | None = None
        self._noted: set[str] = set()  # logger classes already warned about (no image API)

    def resolve_prompts(self, pl_module: L.LightningModule) -> list[str]:
        """The grid's prompts: the configured ones, or ``num_prompts`` evenly spaced held-out prompts."""
        if self.prompts is not None:
            return self.prompts
        evaluation = getattr(pl_module, "evaluation", None)
        pool = list(evaluation.prompts) if evaluation is not None else []
        if not pool:
            raise ValueError("SampleGrid: no prompts (set its `prompts`, or use an RL module, whose held-out "
                             "evaluation prompts it then draws)")
        count = min(self.num_prompts, len(pool))
        return [pool[i * len(pool) // count] for i in range(count)]

    def resolve_rewards(self, pl_module: L.LightningModule) -> list:
        """The rewards written under each image."""
        if self.rewards is None:
            return list(getattr(pl_module, "rewards", []))
        evaluation = getattr(pl_module, "evaluation", None)
        extra = evaluation.rewards if evaluation is not None else []
        available = {r.name: r for r in [*getattr(pl_module, "rewards", []), *extra]}
        unknown = [name for name in self.rewards if name not in available]
        if unknown:
            raise ValueError(f"SampleGrid: rewards {unknown} are not among the module's rewards {sorted(available)}")
        return [available[name] for name in self.rewards]

    @torch.no_grad()
    def render(self, pl_module: L.LightningModule) -> tuple[Image.Image, list[str]]:
        """Generate the fixed samples with the current policy: ``(annotated grid, each tile's caption)``."""
        backbone, sampler = policy_parts(pl_module, type(self).__name__)
        rewards = self.resolve_rewards(pl_module)
        prompts = expand_prompts(self.resolve_prompts(pl_module), self.samples_per_prompt)
        images = generate(backbone, sampler, prompts, seed=self.seed, device=pl_module.device)
        captions = list(prompts)
        for reward in rewards:
            scores = reward(images, prompts).tolist()
            captions = [f"{c}\n{reward.name} {s:.3f}" for c, s in zip(captions, scores)]
        return annotate_grid(images, captions, columns=self.columns, min_tile=self.min_tile), captions

    def draw(self, pl_module: L.LightningModule) -> Image.Image:
        """Generate the fixed samples with the current policy and return the annotated grid."""
        return self.render(pl_module)[0]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, label: str) -> None:
        if not trainer.is_global_zero:
            return
        grid, captions = self.render(pl_module)
        self.last_grid = grid
        log_grid(trainer.loggers, grid, self.tag, step, grid_caption(step, captions), noted=self._noted)
        if self.save_png:
            folder = Path(self.png_dir) if self.png_dir else Path(trainer.log_dir or ".") / "sample_grids"
            folder.mkdir(parents=True, exist_ok=True)
            grid.save(folder / f"iteration_{step:06d}.png")


def grid_caption(step: int, captions: Sequence[str]) -> str:
    """The caption of a whole grid for loggers that show one: the iteration, then each tile's text in order
    (``iteration 50: a handwritten 3, digit_alignment 0.912 | seven, digit_alignment 0.430``)."""
    return f"iteration {step}: " + " | ".join(", ".join(c.split("\n")) for c in captions)


def log_grid(loggers: Sequence[Any], grid: Image.Image, tag: str, step: int, caption: str,
             noted: set[str] | None = None) -> list[str]:
    """Send ``grid`` to each logger through its image API (see the module docstring); return, per logger, how
    (``"add_image"``, ``"log_image"``, ``"mlflow"``, ``"comet"`` or ``"skipped"``).  A logger with no known
    image API is warned about once per class (``noted`` holds the class names already warned about)."""
    from lightning.pytorch.loggers import CometLogger, CSVLogger, MLFlowLogger

    noted = set() if noted is None else noted
    array = np.asarray(grid)
    how = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):  # scalars only; its folder gets the PNGs with save_png
            how.append("skipped")
            continue
        if callable(getattr(logger, "log_image", None)):  # WandbLogger's API (and loggers copying it)
            logger.log_image(key=tag, images=[grid], step=step, caption=[caption])
            how.append("log_image")
            continue
        if isinstance(logger, MLFlowLogger):
            log_image = logger.experiment.log_image  # MlflowClient.log_image
            if "key" in inspect.signature(log_image).parameters:  # MLflow >= 2.12: images with keys and steps
                log_image(logger.run_id, grid, key=tag, step=step)
            else:  # older MLflow: an artifact file per step
                log_image(logger.run_id, grid, f"{tag}/iteration_{step:06d}.png")
            how.append("mlflow")
            continue
        if isinstance(logger, CometLogger):
            logger.experiment.log_image(grid, name=tag, step=step)
            how.append("comet")
            continue
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_image", None)):  # TensorBoard's SummaryWriter
            experiment.add_image(tag, array, global_step=step, dataformats="HWC")
            if callable(getattr(experiment, "flush", None)):
                experiment.flush()
            how.append("add_image")
            continue
        name = type(logger).__name__
        if name not in noted:
            noted.add(name)
            warnings.warn(f"SampleGrid: {name} has no image API SampleGrid knows (TensorBoard add_image, "
                          f"log_image like WandbLogger, MLflow, Comet); the sample grids are not sent to it "
                          f"(SampleGrid(save_png=True) writes them as PNG files)", stacklevel=2)
        how.append("skipped")
    return how
