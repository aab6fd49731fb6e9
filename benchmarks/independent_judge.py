"""Check toy alignment gains with a second, independent judge (guards against hacking the reward's classifier).

    lit-diffac sample --config recipes/toy/actor_critic_dit.yaml --samples-per-prompt 5 --out base/
    lit-diffac sample --config recipes/toy/actor_critic_dit.yaml --ckpt runs/.../last.ckpt --samples-per-prompt 5 --out trained/
    python -m benchmarks.independent_judge base/ trained/

The second judge is an RBF support-vector classifier on the original 8×8 digits (train split; shipped as
``lit_diffac/toy/assets/svm-judge.safetensors``, refitted by ``python -m lit_diffac.toy.svm_judge``; a different
model family, resolution and training procedure than the CNN the policy was optimised against).  For each
folder written by ``lit-diffac sample`` it prints the CNN's and the SVM's alignment accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def svm_judge():
    """``(judge, held-out accuracy on real digits)``: the toy recipes' evaluation judge,
    :class:`lit_diffac.rewards.IndependentDigitJudge` (the shipped SVM)."""
    from lit_diffac.rewards import IndependentDigitJudge

    judge = IndependentDigitJudge()
    return judge, judge.svm.heldout_accuracy


def judge_folder(judge, folder: Path) -> dict:
    """The CNN's accuracy (from ``rewards.json``) and the SVM judge's on the PNGs of a ``lit-diffac sample`` folder."""
    import torch

    report = json.loads((folder / "rewards.json").read_text())
    images = torch.from_numpy(np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB"), dtype=np.float32)
                                        for r in report["images"]])).permute(0, 3, 1, 2) / 255.0   # [N, 3, H, W]
    correct = judge.accuracy(images, [r["prompt"] for r in report["images"]])
    return {"folder": str(folder), "samples": len(correct), "cnn_accuracy": report["mean"]["digit_alignment_accuracy"],
            "svm_accuracy": float(correct.double().mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders written by lit-diffac sample")
    args = parser.parse_args(argv)
    svm, heldout = svm_judge()
    print(json.dumps({"svm_heldout_accuracy_on_real_digits": heldout}))
    for folder in args.folders:
        print(json.dumps(judge_folder(svm, folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
