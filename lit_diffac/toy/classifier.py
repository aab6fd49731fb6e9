"""The toy world's judge: a small CNN that recognises 16×16 handwritten digits.

It is trained on the real digits' train split only and reported on the held-out split.  The toy
alignment reward (:class:`lit_diffac.rewards.toy.DigitAlignment`) is its probability of the prompted
digit, and *alignment accuracy* is whether its argmax equals the prompted digit (the GenEval analogue).

Reproduce the shipped weights with ``python -m lit_diffac.toy.classifier --out DIR`` (seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lit_diffac.toy.digits import load_digits

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitClassifier(nn.Module):
    """CNN on ``[B, 1, size, size]`` images in [-1, 1] → logits ``[B, 10]``."""

    def __init__(self, size: int = 16, width: int = 32) -> None:
        super().__init__()
        self.size = size
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * (size // 4) ** 2, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] (RGB or grey) → ``[B, 1, size, size]`` in [-1, 1]."""
        grey = images.float().mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (self.size, self.size):
            grey = F.interpolate(grey, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return grey * 2.0 - 1.0

    def save_pretrained(self, folder: str | Path, metrics: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        config = {"size": self.size, "width": self.width, **({"metrics": metrics} if metrics else {})}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DigitClassifier":
        folder = Path(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"no digit classifier at {folder} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); "
                "build one with `python -m lit_diffac.toy.classifier --out DIR`"
            )
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(size=config["size"], width=config["width"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.eval()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel and mild contrast jitter."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    out = torch.roll(images, shifts=shifts, dims=(-2, -1))
    gain = 1.0 + 0.2 * (torch.rand(images.shape[0], 1, 1, 1, generator=generator) - 0.5)
    return ((out + 1.0) * gain - 1.0).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


def train_digit_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3,
                           size: int = 16) -> tuple[DigitClassifier, dict]:
    """Train on the train split; return the model and ``{"heldout_accuracy", "train_accuracy", ...}``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, heldout = load_digits("train", size), load_digits("heldout", size)
    model = DigitClassifier(size=size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(_augment(train.images[idx], generator)), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    metrics = {
        "heldout_accuracy": accuracy(model, heldout.images, heldout.labels),
        "train_accuracy": accuracy(model, train.images, train.labels),
        "seed": seed, "epochs": epochs, "heldout_size": len(heldout),
    }
    return model.eval(), metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy digit classifier (the alignment judge).")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors + config.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    model, metrics = train_digit_classifier(seed=args.seed, epochs=args.epochs)
    model.save_pretrained(args.out, metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
