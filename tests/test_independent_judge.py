"""The independent SVM judge recognises real digits saved the way `lit-diffac sample` saves images."""

import json

import torch

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


def test_independent_judge_reward_scores_prompted_digits_and_agrees_with_the_folder_judge(tmp_path):
    from lit_diffac.rewards import IndependentDigitJudge

    judge = IndependentDigitJudge()
    data = load_digits("heldout")                       # 16x16 in [-1, 1]
    images = ((data.images[:60] + 1) / 2).expand(-1, 3, -1, -1)
    right = [f"a picture of the number {int(d)}" for d in data.labels[:60]]
    wrong = [f"a picture of the number {(int(d) + 1) % 10}" for d in data.labels[:60]]
    accuracy = judge.accuracy(images, right)
    assert accuracy.shape == (60,) and accuracy.dtype == torch.float32
    assert accuracy.mean() > 0.9 and judge.accuracy(images, wrong).mean() < 0.1
    assert torch.equal(judge(images, right), accuracy)                      # score is the binary accuracy
    # the same verdicts as the benchmark's judge on the PNGs `lit-diffac sample` writes (8-bit rounding aside)
    names = [f"{i:05d}.png" for i in range(60)]
    save_images(images, tmp_path, names)
    rows = [{"file": n, "prompt": p} for n, p in zip(names, right)]
    (tmp_path / "rewards.json").write_text(json.dumps({"images": rows, "mean": {"digit_alignment_accuracy": 1.0}}))
    assert abs(judge_folder(judge, tmp_path)["svm_accuracy"] - accuracy.mean().item()) <= 1 / 60


def test_evaluation_reports_the_independent_judge_beside_the_reward(dit_backbone, digit_reward):
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.rewards import IndependentDigitJudge
    from lit_diffac.samplers import FlowSDESampler

    evaluation = HeldOutEvaluation(prompts=["a picture of the number 3", "handwritten seven"], samples_per_prompt=2,
                                   rewards=[IndependentDigitJudge()], diversity=False)
    sampler = FlowSDESampler(num_steps=2)
    sampler.setup(dit_backbone.scheduler)
    metrics = evaluation.measure(dit_backbone, sampler, [digit_reward])
    assert {"eval/digit_alignment_accuracy", "eval/independent_judge", "eval/independent_judge_accuracy"} <= set(metrics)
    assert metrics["eval/independent_judge_accuracy"] in {0.0, 0.25, 0.5, 0.75, 1.0}


def test_shipped_svm_votes_exactly_as_scikit_learn_fitted_the_same_way():
    """The torch one-vs-one vote over the shipped support vectors = sklearn's SVC.predict, on real digits, noise
    and CNN-style artefacts (stripes); refitting reproduces the shipped asset's held-out accuracy."""
    from sklearn.svm import SVC

    from lit_diffac.toy.svm_judge import GAMMA, C, SVMJudge, features

    judge = SVMJudge()
    train, heldout = load_digits("train", 8), load_digits("heldout", 8)
    reference = SVC(gamma=GAMMA, C=C).fit(features(train.images).numpy(), train.labels.numpy())
    generator = torch.Generator().manual_seed(0)
    stripes = torch.zeros(50, 1, 8, 8)
    stripes[:, :, :, ::2] = torch.rand(50, 1, 8, 1, generator=generator) * 2 - 1
    probes = torch.cat([heldout.images, torch.rand(200, 1, 8, 8, generator=generator) * 2 - 1, stripes])
    assert torch.equal(judge.predict(probes), torch.as_tensor(reference.predict(features(probes).numpy())))
    assert judge.heldout_accuracy == float((reference.predict(features(heldout.images).numpy())
                                            == heldout.labels.numpy()).mean()) > 0.99
