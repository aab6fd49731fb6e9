"""Check toy alignment gains with a second, independent judge (guards against hacking the reward's classifier).

    lit-diffac sample --config recipes/toy/actor_critic_dit.yaml --samples-per-prompt 5 --out base/
    lit-diffac sample --config recipes/toy/actor_critic_dit.yaml --ckpt runs/.../last.ckpt --samples-per-prompt 5 --out trained/
    python -m benchmarks.independent_judge base/ trained/

The second judge is an RBF support-vector classifier on the original 8×8 digits (train split; a different
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
    """``(svm, held-out accuracy on real digits)``: :func:`lit_diffac.rewards.toy.fit_independent_judge`."""
    from lit_diffac.rewards.toy import fit_independent_judge

    return fit_independent_judge()


def judge_folder(svm, folder: Path) -> dict:
    from lit_diffac.toy.prompts import digit_of

    report = json.loads((folder / "rewards.json").read_text())
    grey = np.stack([np.asarray(Image.open(folder / r["file"]), dtype=np.float32).mean(-1) / 255.0
                     for r in report["images"]])                       # [N, 16, 16] in [0, 1]
    small = grey.reshape(len(grey), 8, 2, 8, 2).mean(axis=(2, 4)).reshape(len(grey), -1) * 16
    digits = np.array([digit_of(r["prompt"]) for r in report["images"]])
    return {"folder": str(folder), "samples": len(digits), "cnn_accuracy": report["mean"]["digit_alignment_accuracy"],
            "svm_accuracy": float((svm.predict(small) == digits).mean())}


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
