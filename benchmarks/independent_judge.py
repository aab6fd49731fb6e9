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
    """``(judge, held-out accuracy on real digits)``: the shipped :class:`lit_diffac.toy.svm_judge.SVMJudge`."""
    from lit_diffac.toy.svm_judge import SVMJudge

    judge = SVMJudge()
    return judge, judge.heldout_accuracy


def judge_folder(svm, folder: Path) -> dict:
    """The CNN's accuracy (from ``rewards.json``) and the SVM's on the PNGs of a ``lit-diffac sample`` folder."""
    import torch

    from lit_diffac.toy.prompts import digit_of

    report = json.loads((folder / "rewards.json").read_text())
    grey = np.stack([np.asarray(Image.open(folder / r["file"]), dtype=np.float32).mean(-1) / 255.0
                     for r in report["images"]])                       # [N, 16, 16] in [0, 1]
    small = grey.reshape(len(grey), 1, 8, 2, 8, 2).mean(axis=(3, 5)) * 2 - 1     # [N, 1, 8, 8] in [-1, 1]
    digits = torch.tensor([digit_of(r["prompt"]) for r in report["images"]])
    return {"folder": str(folder), "samples": len(digits), "cnn_accuracy": report["mean"]["digit_alignment_accuracy"],
            "svm_accuracy": float((svm.predict(torch.from_numpy(small)) == digits).double().mean())}


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
