"""The toy task's independent judge: an RBF support-vector classifier on the original 8×8 digits.

It is fitted once with scikit-learn (``python -m lit_diffac.toy.svm_judge``, writes
``lit_diffac/toy/assets/svm-judge.safetensors``) and shipped as its support vectors, dual coefficients and
intercepts; :class:`SVMJudge` predicts with them in torch, so runs need no scikit-learn. Prediction is libsvm's
one-vs-one vote, exactly (float64): for each pair of classes ``i < j``

    d_ij(x) = Σ_{s ∈ SV_i} α^{(j-1)}_s K(x, s) + Σ_{s ∈ SV_j} α^{(i)}_s K(x, s) + b_ij,    K(x, s) = exp(−γ‖x − s‖²)

votes for ``i`` when ``d_ij > 0``, else for ``j``; the class with the most votes wins (ties: the lowest class), as
``sklearn.svm.SVC.predict`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parent / "assets" / "svm-judge.safetensors"
GAMMA, C = 0.001, 10.0


def features(grey: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 8, 8]`` grey digits in [-1, 1] → ``[N, 64]`` float64 on scikit-learn's 0..16 scale."""
    return ((grey[:, 0].reshape(len(grey), -1).double() + 1) / 2 * 16)


class SVMJudge:
    """The shipped SVM (:data:`ASSET`); :meth:`predict` gives its digit for 8×8 grey digits in [-1, 1]."""

    def __init__(self, path: str | Path = ASSET) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        self.support_vectors = tensors["support_vectors"].double()        # [S, 64]
        self.dual_coef = tensors["dual_coef"].double()                    # [classes - 1, S]
        self.intercept = tensors["intercept"].double()                    # [classes·(classes − 1)/2]
        self.n_support = tensors["n_support"].long()                      # [classes]
        self.gamma = float(meta["gamma"])
        self.heldout_accuracy = float(meta["heldout_accuracy"])

    @torch.no_grad()
    def predict(self, grey: torch.Tensor) -> torch.Tensor:
        """``[N, 1, 8, 8]`` in [-1, 1] → ``[N]`` long, libsvm's one-vs-one vote (see the module docstring)."""
        x = features(grey.cpu())
        kernel = torch.exp(-self.gamma * torch.cdist(x, self.support_vectors).square())   # [N, S]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), self.n_support.cumsum(0)])
        classes = len(self.n_support)
        votes = torch.zeros(len(x), classes, dtype=torch.long)
        pair = 0
        for i in range(classes):
            for j in range(i + 1, classes):
                si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                d = kernel[:, si] @ self.dual_coef[j - 1, si] + kernel[:, sj] @ self.dual_coef[i, sj] \
                    + self.intercept[pair]
                votes[:, i] += d > 0
                votes[:, j] += d <= 0
                pair += 1
        return votes.argmax(1)  # the first maximum: ties go to the lowest class, as in libsvm


def fit_and_save(path: Path = ASSET) -> dict:
    """Fit the SVM on the train split of the 8×8 digits (needs scikit-learn) and write :data:`ASSET`."""
    from safetensors.torch import save_file
    from sklearn.svm import SVC

    from lit_diffac.toy.digits import load_digits

    train, heldout = load_digits("train", 8), load_digits("heldout", 8)
    svm = SVC(gamma=GAMMA, C=C).fit(features(train.images).numpy(), train.labels.numpy())
    accuracy = float((svm.predict(features(heldout.images).numpy()) == heldout.labels.numpy()).mean())
    save_file({"support_vectors": torch.as_tensor(svm.support_vectors_),
               "dual_coef": torch.as_tensor(svm.dual_coef_),
               "intercept": torch.as_tensor(svm.intercept_),
               "n_support": torch.as_tensor(svm.n_support_).int()},
              str(path), metadata={"gamma": str(GAMMA), "C": str(C), "heldout_accuracy": str(accuracy)})
    return {"path": str(path), "support_vectors": int(len(svm.support_vectors_)), "heldout_accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit the toy task's independent SVM judge and ship it")
    parser.add_argument("--out", type=Path, default=ASSET)
    print(json.dumps(fit_and_save(parser.parse_args(argv).out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
