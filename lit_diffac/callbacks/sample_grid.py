"""Sample grids: the same prompts and seeds every time, so a user sees the policy change.

Each tile is one sample (upscaled with nearest-neighbour to at least ``min_tile`` pixels wide), with its
prompt and rewards written underneath in PIL's default font.  The grid goes to every TensorBoard logger
(``add_image``, tag ``samples/grid``) and, with ``save_png``, to ``<png_dir>/iteration_<N>.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lit_diffac.callbacks.periodic import PeriodicCallback, policy_parts
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.evaluation import EVAL_SEED, expand_prompts, generate

__all__ = ["SampleGrid", "annotate_grid", "wrap_text"]

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
    """Draw a fixed set of prompts with fixed noise every N iterations and log the annotated grid.

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
        tag: TensorBoard tag.
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
    def draw(self, pl_module: L.LightningModule) -> Image.Image:
        """Generate the fixed samples with the current policy and return the annotated grid."""
        backbone, sampler = policy_parts(pl_module, type(self).__name__)
        rewards = self.resolve_rewards(pl_module)
        prompts = expand_prompts(self.resolve_prompts(pl_module), self.samples_per_prompt)
        images = generate(backbone, sampler, prompts, seed=self.seed, device=pl_module.device)
        captions = list(prompts)
        for reward in rewards:
            scores = reward(images, prompts).tolist()
            captions = [f"{c}\n{reward.name} {s:.3f}" for c, s in zip(captions, scores)]
        return annotate_grid(images, captions, columns=self.columns, min_tile=self.min_tile)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, label: str) -> None:
        if not trainer.is_global_zero:
            return
        grid = self.draw(pl_module)
        self.last_grid = grid
        array = np.asarray(grid)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(self.tag, array, global_step=step, dataformats="HWC")
                experiment.flush()
        if self.save_png:
            folder = Path(self.png_dir) if self.png_dir else Path(trainer.log_dir or ".") / "sample_grids"
            folder.mkdir(parents=True, exist_ok=True)
            grid.save(folder / f"iteration_{step:06d}.png")
