"""The steering benchmark's bookkeeping: equal compute for best-of-N, both judges, the steering.json keys."""

import argparse
import json

import pytest


def test_best_of_n_matches_the_steered_compute_and_both_judges_score_every_variant(tmp_path, monkeypatch):
    import benchmarks.independent_judge as judge
    import benchmarks.steering as steering

    calls = []

    def fake_sample(run, out, args, extra):
        calls.append(extra)
        steered = "--scale" in extra and extra[extra.index("--scale") + 1] != "0"
        best = int(extra[extra.index("--best-of") + 1]) if "--best-of" in extra else 1
        accuracy = 0.9 if steered else (0.8 if best > 1 else 0.7)
        return {"compute_forward_equivalents": 4 * (30 if steered else 10 * best), "images": [{}] * 4,
                "mean": {"digit_alignment_accuracy": accuracy}}

    monkeypatch.setattr(steering, "sample", fake_sample)
    monkeypatch.setattr(judge, "judge_folder", lambda svm, folder: {"svm_accuracy": 0.5 + 0.01 * len(str(folder))})
    args = argparse.Namespace(scale=4.0, sweep_scales=[16.0], sweep_steps=["last:5"], seed=4242)
    result = steering.measure("dit", tmp_path / "run", args, tmp_path / "out", svm=None)
    assert result["best_of_n"] == 3  # 30 forward-equivalents per steered sample / 10 per plain one
    assert ["--best-of", "3", "--rank-by", "value"] in calls and ["--best-of", "3", "--rank-by", "digit_alignment"] in calls
    assert result["compute_per_sample"] == {"plain": 10, "steered": 30, "best_of_n_value": 30, "best_of_n_reward": 30}
    assert (result["plain_accuracy"], result["steered_accuracy"], result["best_of_n_value_accuracy"]) == (0.7, 0.9, 0.8)
    assert set(result["independent_judge"]) == {"plain_accuracy", "steered_accuracy", "best_of_n_value_accuracy",
                                                "best_of_n_reward_accuracy"}
    assert [s["variant"] for s in result["sweep"]] == ["steer scale 16 all", "steer scale 4 last:5"]
    assert (result["seed"], result["sampling_seed"]) == (None, 4242)  # no config.yaml in the fake run folder
    text = steering.table({"dit": steering.combine([result])})
    assert "| dit (None) | best-of-3 by the critic's value | 30 | 0.800 |" in text
    json.dumps(result)  # the JSON is plain data


def test_runs_of_several_training_seeds_are_averaged_and_kept(tmp_path):
    import benchmarks.steering as steering

    def run(seed: int, plain: float, steered: float) -> dict:
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "config.yaml").write_text(f"seed_everything: {seed}\nmodel: {{}}\n")
        accuracies = {"plain_accuracy": plain, "steered_accuracy": steered, "best_of_n_value_accuracy": 0.5,
                      "best_of_n_reward_accuracy": 0.9}
        return {"run": str(folder), "seed": steering.training_seed(folder), "scale": 4.0, "best_of_n": 3,
                "sampling_seed": 4242, "samples": 500, **accuracies,
                "independent_judge": {k: v - 0.1 for k, v in accuracies.items()},
                "compute_per_sample": {"plain": 10, "steered": 30, "best_of_n_value": 30, "best_of_n_reward": 30},
                "sweep": [{"variant": "steer scale 16 all", "accuracy": steered + 0.1, "independent_accuracy": 0.2,
                           "compute_per_sample": 30}]}

    combined = steering.combine([run(0, 0.6, 0.8), run(1, 0.7, 0.7), run(2, 0.8, 0.9)])
    assert combined["seeds"] == [0, 1, 2]
    assert combined["plain_accuracy"] == pytest.approx(0.7) and combined["steered_accuracy"] == pytest.approx(0.8)
    assert combined["independent_judge"]["steered_accuracy"] == pytest.approx(0.7)
    assert combined["sweep"][0]["accuracy"] == pytest.approx(0.9)
    assert [r["plain_accuracy"] for r in combined["runs"]] == [0.6, 0.7, 0.8]
    text = steering.table({"dit": combined})
    assert "| dit (0, 1, 2) | steered, scale 4, all steps | 30 | 0.800 (0.800 / 0.700 / 0.900) |" in text
    json.dumps(combined)


def test_reports_of_each_backbone_merge_into_one(tmp_path, monkeypatch):
    import benchmarks.steering as steering

    def report(backbone: str, plain: float) -> dict:
        accuracies = {f"{name}_accuracy": plain for name in steering.MAIN}
        return {"command": f"python -m benchmarks.steering --run {backbone}=RUN", "machine": "vm", "minutes": 5.0,
                "independent_judge_accuracy_on_real_digits": 0.99,
                backbone: {**accuracies, "independent_judge": accuracies, "scale": 4.0, "best_of_n": 3,
                           "seeds": [0, 1, 2], "compute_per_sample": dict.fromkeys(steering.MAIN, 30), "sweep": []}}

    (tmp_path / "dit.json").write_text(json.dumps(report("dit", 0.7)))
    (tmp_path / "unet_old.json").write_text(json.dumps(report("unet", 0.5)))
    (tmp_path / "unet.json").write_text(json.dumps(report("unet", 0.6)))
    monkeypatch.setattr(steering, "RESULTS", tmp_path / "out")
    files = [str(tmp_path / f) for f in ("dit.json", "unet_old.json", "unet.json")]
    assert steering.main(["--report-from", *files, "--name", "both"]) == 0
    merged = json.loads((tmp_path / "out" / "both.json").read_text())
    assert (merged["dit"]["plain_accuracy"], merged["unet"]["plain_accuracy"]) == (0.7, 0.6)  # the later unet wins
    assert [s["file"] for s in merged["sources"]] == files and merged["command"].startswith("python -m")
    assert steering.main(["--report-from", str(tmp_path / "out" / "both.json"), "--name", "again"]) == 0
    again = json.loads((tmp_path / "out" / "again.json").read_text())
    assert again["sources"] == merged["sources"]  # a merged report passes its sources on
    assert "| unet (0, 1, 2) | plain |" in (tmp_path / "out" / "again.md").read_text()


def test_a_run_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    import benchmarks.steering as steering

    with pytest.raises(SystemExit):
        steering.main(["--run", f"dit={tmp_path}"])
    assert "checkpoints/last.ckpt" in capsys.readouterr().err
