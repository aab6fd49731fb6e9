"""Slow end-to-end checks (run with `python -m pytest -m slow`): the method actually learns on the toy."""

import json
from pathlib import Path

import pytest

from lit_diffac.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "toy"


@pytest.mark.slow
def test_actor_critic_dit_improves_heldout_alignment(tmp_path, monkeypatch, capsys):
    """60 iterations (~1-2 min on 2 cores) already lift held-out alignment clearly above the base model."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(RECIPES / "actor_critic_dit.yaml"), "--trainer.max_epochs=60",
                 "--trainer.enable_progress_bar=false", "--model.init_args.evaluation.init_args.every_n_iterations=0",
                 "--model.init_args.evaluation.init_args.samples_per_prompt=10"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")
    summary = json.loads(Path(path).read_text())
    base = summary["base"]["eval/digit_alignment_accuracy"]
    final = summary["final"]["eval/digit_alignment_accuracy"]
    assert final - base >= 0.05, (base, final)
    assert summary["final_train"]["train/onpolicy_max_abs_ratio_dev"] < 1e-5


@pytest.mark.slow
def test_extensions_benchmark_quick_mode(tmp_path, monkeypatch):
    """The extensions benchmark's pipeline end to end on tiny settings (numbers meaningless)."""
    import benchmarks.extensions as ext

    monkeypatch.setattr(ext, "RESULTS", tmp_path)
    assert ext.main(["--quick", "--threads", "1", "--scales", "0", "1"]) == 0
    text = (tmp_path / "extensions.md").read_text()
    for group in ("value_pretraining", "timestep_conditioning", "reward_hacking", "steering"):
        assert f"**{group}**" in text
    assert "independent_acc" in text  # the recipes' second judge reaches the table
    assert (tmp_path / "extensions_steering.png").is_file()


@pytest.mark.slow
def test_critic_probe_tiny(tmp_path, monkeypatch):
    import benchmarks.critic_probe as probe

    monkeypatch.setattr(probe, "RESULTS", tmp_path)
    assert probe.main(["--trajectories", "128", "--steps", "2", "--branches", "2"]) == 0
    text = (tmp_path / "critic_probe.md").read_text()
    assert "EV ceiling" in text and "fitted offline" in text


@pytest.mark.slow
def test_overhead_benchmark_quick(capsys):
    import benchmarks.overhead as overhead

    assert overhead.main(["--quick"]) == 0
    assert "update with / without critic" in capsys.readouterr().out


@pytest.mark.slow
def test_sample_efficiency_benchmark_quick(tmp_path):
    import benchmarks.sample_efficiency as se

    assert se.main(["--quick", "--jobs", "3", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "sample_efficiency.csv").read_text().splitlines()
    assert rows[0] == "backbone,method,seed,config,selected,iteration,samples,train_seconds,accuracy,reward"
    assert {r.split(",")[1] for r in rows[1:]} == {"actor_critic", "grpo", "ddpo"}
    assert (tmp_path / "sample_efficiency.png").is_file()
    assert "actor-critic samples to reach it" in (tmp_path / "sample_efficiency.md").read_text()


@pytest.mark.slow
def test_critic_capacity_quick(capsys):
    import benchmarks.critic_capacity as capacity

    assert capacity.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "pixel CNN on x_t" in out and "Linear probe" in out


@pytest.mark.slow
def test_critic_replay_quick(capsys):
    from benchmarks import critic_replay

    assert critic_replay.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "the main recipe: CriticReplay iterations 32, passes 2" in out and "Last-step / mean EV" in out


@pytest.mark.slow
def test_sample_efficiency_benchmark_quick_on_the_pair_task(tmp_path):
    import benchmarks.sample_efficiency as se

    assert se.main(["--task", "pairs", "--quick", "--methods", "actor_critic", "grpo", "--jobs", "2",
                    "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "sample_efficiency_pairs.csv").read_text().splitlines()
    assert rows[0] == ("backbone,method,seed,config,selected,iteration,samples,train_seconds,accuracy,reward,"
                       "accuracy_seen,accuracy_unseen")
    report = json.loads((tmp_path / "sample_efficiency_pairs.json").read_text())
    assert report["headline"][0]["backbone"] == "dit"
    assert "unseen pairs" in (tmp_path / "sample_efficiency_pairs.md").read_text()
