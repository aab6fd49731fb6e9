"""The independent SVM judge recognises real digits saved the way `lit-diffac sample` saves images."""

import json

from benchmarks.independent_judge import judge_folder, svm_judge
from lit_diffac.sampling import save_images
from lit_diffac.toy.digits import load_digits


def test_svm_judge_on_real_heldout_digits(tmp_path):
    svm, heldout_accuracy = svm_judge()
    assert heldout_accuracy > 0.97
    data = load_digits("heldout")
    images = ((data.images[:40] + 1) / 2).expand(-1, 3, -1, -1)
    names = [f"{i:05d}.png" for i in range(40)]
    save_images(images, tmp_path, names)
    rows = [{"file": n, "prompt": f"the digit {int(d)}"} for n, d in zip(names, data.labels[:40])]
    (tmp_path / "rewards.json").write_text(json.dumps({"images": rows, "mean": {"digit_alignment_accuracy": 1.0}}))
    assert judge_folder(svm, tmp_path)["svm_accuracy"] > 0.9
