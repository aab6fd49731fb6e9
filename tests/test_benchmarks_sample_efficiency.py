"""The sample-efficiency benchmark's bookkeeping (its end-to-end --quick run is a slow test)."""

import json
import math
from pathlib import Path

import pytest

from benchmarks.curves import headline, mean_curve, samples_to_reach
from benchmarks.sample_efficiency import parse_log


def test_parse_log_reads_eval_lines_and_summary(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"samples_seen": 64}))
    log = ("noise\n[eval base @ iteration 0, 0 samples] digit_alignment 0.400, digit_alignment_accuracy 0.410\n"
           "[eval periodic @ iteration 2, 64 samples] digit_alignment 0.500, digit_alignment_accuracy 0.520\n"
           "[eval periodic @ iteration 2, 64 samples] digit_alignment 0.500, digit_alignment_accuracy 0.520, "
           "diversity 3.000\n"  # the callback's evaluation at the same point is dropped
           f"summary: {summary}\n")
    evals, parsed = parse_log(log)
    assert evals == [{"label": "base", "iteration": 0, "samples": 0, "eval/digit_alignment": 0.4,
                      "eval/digit_alignment_accuracy": 0.41},
                     {"label": "periodic", "iteration": 2, "samples": 64, "eval/digit_alignment": 0.5,
                      "eval/digit_alignment_accuracy": 0.52}]
    assert parsed == {"samples_seen": 64}
    assert parse_log(log.split("summary: ")[0])[1] is None  # a run stopped early has no summary


def _rows(method, points, seeds=(0, 1)):
    return [{"backbone": "dit", "method": method, "seed": s, "iteration": x // 32, "samples": x,
             "accuracy": a + 0.01 * (1 if s else -1), "reward": a} for s in seeds for x, a in points]


def test_mean_curve_and_interpolated_crossing():
    rows = _rows("actor_critic", [(0, 0.4), (320, 0.6), (640, 0.8)]) + _rows("grpo", [(0, 0.4), (640, 0.5)])
    curve = mean_curve(rows, "dit", "actor_critic")
    assert curve == [(0, pytest.approx(0.4), pytest.approx(0.39), pytest.approx(0.41)),
                     (320, pytest.approx(0.6), pytest.approx(0.59), pytest.approx(0.61)),
                     (640, pytest.approx(0.8), pytest.approx(0.79), pytest.approx(0.81))]
    assert samples_to_reach(curve, 0.5) == pytest.approx(160.0)  # halfway between 0 and 320 samples
    assert samples_to_reach(curve, 0.9) is None
    h = headline(rows, "dit")
    assert h["grpo_final"] == pytest.approx(0.5) and h["grpo_samples"] == 640
    assert h["grpo_gain"] == pytest.approx(0.1)  # from 0.4 at 0 samples
    assert h["actor_critic_samples"] == pytest.approx(160.0) and h["fraction"] == pytest.approx(0.25)


def test_pairs_task_uses_its_recipes_metrics_and_result_name(tmp_path):
    import argparse
    import csv

    import benchmarks.sample_efficiency as se

    args = argparse.Namespace(task="pairs", iterations=2, accelerator="cpu", eval_every=1, eval_samples=10,
                              overrides=[])
    cmd = se.command("dit", "grpo", 0, args, tmp_path)
    assert cmd[4].endswith("recipes/toy_pairs/grpo_dit.yaml") and se.TASKS["pairs"].name == "sample_efficiency_pairs"
    evals = [{"label": "base", "iteration": i, "samples": 32 * i, "eval/pair_alignment": 0.1 + i / 10,
              "eval/pair_alignment_accuracy": 0.2 + i / 10, "eval/pair_alignment_accuracy_seen": 0.3 + i / 10,
              "eval/pair_alignment_accuracy_unseen": 0.1 + i / 10} for i in (0, 2)]
    rows = [row for method in ("actor_critic", "grpo")
            for row in se.curve_rows("dit", method, 0, {"evals": evals}, task="pairs")]
    assert rows[1] == {"backbone": "dit", "method": "actor_critic", "seed": 0, "config": "", "iteration": 2,
                       "samples": 64, "train_seconds": pytest.approx(float("nan"), nan_ok=True),
                       "accuracy": pytest.approx(0.4), "reward": pytest.approx(0.3),
                       "accuracy_seen": pytest.approx(0.5), "accuracy_unseen": pytest.approx(0.3)}
    table = se.report(rows, {}, ["dit"], ["actor_critic", "grpo"], "cmd", "machine")
    assert "seen pairs: base → at budget | unseen pairs: base → at budget |" in table
    assert "| 0.300 → 0.500 | 0.100 → 0.300 |" in table
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert [{k: v for k, v in r.items() if k != "train_seconds"} for r in se.read_csv(path)] == \
        [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]
    assert "seen pairs" not in se.report(_rows("grpo", [(0, 0.4), (640, 0.5)]), {}, ["dit"], ["grpo"], "c", "m")


def _timed(method, points, seeds=(0, 1)):
    """Rows with training times: ``points`` are (samples, accuracy, seconds)."""
    return [{"backbone": "dit", "method": method, "seed": s, "config": "", "iteration": x // 32, "samples": x,
             "train_seconds": sec + s, "accuracy": a, "reward": a} for s in seeds for x, a, sec in points]


def test_headline_in_training_time_uses_each_method_s_own_seconds():
    from benchmarks.curves import headline, time_curve

    # the actor-critic reaches GRPO's 0.5 at 320 samples (fraction 0.5) but its iterations cost twice as much
    rows = _timed("actor_critic", [(0, 0.4, 0), (320, 0.5, 200), (640, 0.7, 400)]) + \
        _timed("grpo", [(0, 0.4, 0), (320, 0.45, 100), (640, 0.5, 200)])
    assert time_curve(rows, "dit", "grpo") == [(0.5, 0.4), (100.5, 0.45), (200.5, 0.5)]
    h = headline(rows, "dit")
    assert h["fraction"] == pytest.approx(0.5)
    assert h["grpo_train_seconds"] == pytest.approx(200.5) and h["actor_critic_train_seconds"] == pytest.approx(200.5)
    assert h["time_fraction"] == pytest.approx(1.0)  # no faster at equal wall-clock
    stopped = [dict(r, train_seconds=float("nan")) if r["method"] == "grpo" and r["seed"] == 1 and r["samples"] == 640
               else r for r in rows]  # a GRPO run stopped early has no times: no time headline, samples still count
    assert headline(stopped, "dit")["time_fraction"] is None and headline(stopped, "dit")["fraction"] == 0.5


def test_grid_labels_and_overrides():
    from benchmarks.sample_efficiency import config_overrides, parse_grid, run_name

    assert parse_grid([]) == [""]
    configs = parse_grid(["actor_lr=1e-4,2e-4", "model.init_args.estimator.init_args.lam=0.9"])
    assert configs == ["actor_lr=1e-4 model.init_args.estimator.init_args.lam=0.9",
                       "actor_lr=2e-4 model.init_args.estimator.init_args.lam=0.9"]
    assert config_overrides(configs[1]) == ["--model.init_args.actor_lr=2e-4",
                                            "--model.init_args.estimator.init_args.lam=0.9"]
    assert run_name("dit", "grpo", 1, "actor_lr=2e-4") == "grpo_dit_seed1_actor_lr=2e-4"
    for bad in (["actor_lr"], ["actor_lr="], ["=1"], ["actor_lr=1,,2"]):
        with pytest.raises(SystemExit):
            parse_grid(bad)


def test_tuned_protocol_picks_each_method_s_best_on_one_seed_then_runs_it_on_every_seed(tmp_path, monkeypatch):
    import benchmarks.sample_efficiency as se

    # each configuration's final accuracy: the actor-critic is best at 1e-4, GRPO at 2e-4
    best = {("actor_critic", "actor_lr=1e-4"): 0.8, ("actor_critic", "actor_lr=2e-4"): 0.6,
            ("grpo", "actor_lr=1e-4"): 0.5, ("grpo", "actor_lr=2e-4"): 0.7}
    calls = []

    def fake_run_all(jobs, args, out_dir, start=None):
        calls.append(list(jobs))
        return {job: {"evals": [{"label": "base", "iteration": 0, "samples": 0, "train_seconds": 0.0,
                                 "eval/digit_alignment": 0.3, "eval/digit_alignment_accuracy": 0.3},
                                {"label": "final", "iteration": 2, "samples": 64, "train_seconds": 10.0 + job[2],
                                 "eval/digit_alignment": 0.5,
                                 "eval/digit_alignment_accuracy": best[job[1], job[3]] + 0.01 * job[2]}],
                      "summary": None, "wall_s": 1.0, "complete": True} for job in jobs}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    monkeypatch.setattr(se, "plot", lambda *a, **k: None)
    assert se.main(["--backbones", "dit", "--methods", "actor_critic", "grpo", "--seeds", "0", "1", "2",
                    "--grid", "actor_lr=1e-4,2e-4", "--out", str(tmp_path), "--name", "t"]) == 0
    assert sorted(calls[0]) == sorted((b, m, 0, c) for b in ["dit"] for m in ["actor_critic", "grpo"]
                                      for c in ["actor_lr=1e-4", "actor_lr=2e-4"])  # the grid, on the tune seed
    assert sorted(calls[1]) == [("dit", "actor_critic", s, "actor_lr=1e-4") for s in (1, 2)] + \
        [("dit", "grpo", s, "actor_lr=2e-4") for s in (1, 2)]  # then each method's best on the other seeds
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["protocol"]["selected"] == {"dit/actor_critic": "actor_lr=1e-4", "dit/grpo": "actor_lr=2e-4"}
    assert result["headline"][0]["grpo_final"] == pytest.approx(0.71)  # mean of 0.70 / 0.71 / 0.72
    text = (tmp_path / "t.md").read_text()
    assert "| dit | actor-critic (ours) | **actor_lr=1e-4** | 64 | 0.800 |" in text
    assert "| dit | GRPO | actor_lr=1e-4 | 64 | 0.500 |" in text
    redone = se.read_csv(tmp_path / "t.csv")
    assert len(redone) == 2 * (4 + 4)  # every run is in the CSV, the unselected grid runs too
    assert se.main(["--backbones", "dit", "--methods", "actor_critic", "grpo", "--report-from",
                    str(tmp_path / "t.csv"), "--out", str(tmp_path), "--name", "t"]) == 0
    assert json.loads((tmp_path / "t_report.json").read_text())["headline"] == result["headline"]
    assert "**actor_lr=1e-4**" in (tmp_path / "t.md").read_text()  # the grid table comes back from the JSON


def _timed_csv(path, backbones=("dit",)):
    """A CSV of two methods' curves on each of ``backbones``: the actor-critic reaches GRPO's final 0.5 at 320 of
    640 samples."""
    import csv

    rows = [dict(r, backbone=b) for b in backbones
            for r in _timed("actor_critic", [(0, 0.4, 0), (320, 0.5, 7), (640, 0.7, 9)])
            + _timed("grpo", [(0, 0.4, 0), (320, 0.45, 3), (640, 0.5, 5)])]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_time_curves_from_separately_measured_seconds_per_iteration(tmp_path):
    import benchmarks.sample_efficiency as se

    path = _timed_csv(tmp_path / "t.csv")
    assert se.main(["--backbones", "dit", "--methods", "actor_critic", "grpo", "--report-from", str(path), "--out",
                    str(tmp_path), "--name", "t", "--seconds-per-iteration", "actor_critic=2", "grpo=1"]) == 0
    h = json.loads((tmp_path / "t_report.json").read_text())["headline"][0]
    assert h["fraction"] == pytest.approx(0.5)  # 320 of 640 samples
    assert h["grpo_train_seconds"] == pytest.approx(20.0) and h["actor_critic_train_seconds"] == pytest.approx(20.0)
    assert h["time_fraction"] == pytest.approx(1.0)  # half the samples at twice the cost per iteration


def test_seconds_per_iteration_per_backbone_in_a_merged_report(tmp_path):
    import benchmarks.sample_efficiency as se

    path = _timed_csv(tmp_path / "t.csv", ("dit", "unet"))
    assert se.main(["--backbones", "dit", "unet", "--methods", "actor_critic", "grpo", "--report-from", str(path),
                    "--out", str(tmp_path), "--name", "t", "--seconds-per-iteration", "actor_critic=2", "grpo=1",
                    "unet/actor_critic=4"]) == 0
    dit, unet = json.loads((tmp_path / "t_report.json").read_text())["headline"]
    assert (dit["backbone"], unet["backbone"]) == ("dit", "unet")
    assert dit["time_fraction"] == pytest.approx(1.0)  # the method's figure where no backbone's is given
    assert unet["time_fraction"] == pytest.approx(2.0) and unet["grpo_train_seconds"] == pytest.approx(20.0)


def test_time_iterations_times_each_chosen_configuration_alone(tmp_path, monkeypatch):
    import argparse

    import benchmarks.sample_efficiency as se

    seen = []

    def fake_run_all(jobs, args, out_dir, start=None):
        seen.append((jobs, args.iterations, args.jobs, args.overrides[-1]))
        (backbone, method, seed, config), = jobs
        return {jobs[0]: {"summary": {"train_seconds": 30.0 if method == "actor_critic" else 10.0, "iterations": 10},
                          "evals": [], "wall_s": 0.0, "complete": True}}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    rows = [dict(r, config="actor_lr=1e-4" if r["method"] == "actor_critic" else "actor_lr=2e-4")
            for r in _rows("actor_critic", [(0, 0.4)]) + _rows("grpo", [(0, 0.4)])]
    rows += [dict(r, backbone=b) for b in ("unet", "other") for r in rows]
    args = argparse.Namespace(task="pairs", methods=["actor_critic", "grpo"], backbones=["dit", "unet"],
                              time_iterations=10, jobs=2, iterations=150, time_limit=5.0, eval_every=25,
                              eval_samples=10, overrides=["--x=1"])
    assert se.time_methods(rows, args, tmp_path) == {"dit/actor_critic": 3.0, "dit/grpo": 1.0,
                                                     "unet/actor_critic": 3.0, "unet/grpo": 1.0}
    assert [s[0] for s in seen] == [[(b, m, 0, "actor_lr=1e-4" if m == "actor_critic" else "actor_lr=2e-4")]
                                    for b in ("dit", "unet") for m in ("actor_critic", "grpo")]
    assert all(s[1:] == (10, 1, "--model.init_args.evaluation.init_args.prompts=[3 and 7]") for s in seen)


def test_selected_from_runs_each_method_s_earlier_choice_on_every_seed(tmp_path, monkeypatch):
    import benchmarks.sample_efficiency as se

    earlier = tmp_path / "dense.json"
    earlier.write_text(json.dumps({"protocol": {"selected": {"dit/actor_critic": "actor_lr=1e-4",
                                                             "dit/grpo": "actor_lr=2e-4"}}}))
    calls = []

    def fake_run_all(jobs, args, out_dir, start=None):
        calls.append(list(jobs))
        return {job: {"evals": [{"label": "final", "iteration": 2, "samples": 64, "train_seconds": 1.0,
                                 "eval/digit_alignment": 0.5, "eval/digit_alignment_accuracy": 0.5}],
                      "summary": None, "wall_s": 1.0, "complete": True} for job in jobs}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    monkeypatch.setattr(se, "plot", lambda *a, **k: None)
    assert se.main(["--backbones", "dit", "unet", "--methods", "actor_critic", "grpo", "--seeds", "0", "1",
                    "--selected-from", str(earlier), "--out", str(tmp_path), "--name", "t"]) == 0
    # the UNet, which the earlier run did not tune, takes each method's choice on the DiT
    assert sorted(calls[0]) == sorted((b, m, s, "actor_lr=1e-4" if m == "actor_critic" else "actor_lr=2e-4")
                                      for b in ("dit", "unet") for m in ("actor_critic", "grpo") for s in (0, 1))
    protocol = json.loads((tmp_path / "t.json").read_text())["protocol"]
    assert protocol["transferred_from"] == str(earlier) and protocol["selected"]["unet/grpo"] == "actor_lr=2e-4"
    assert "transferred from" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):  # a choice and a grid at once
        se.main(["--selected-from", str(earlier), "--grid", "actor_lr=1e-4,2e-4", "--out", str(tmp_path)])
    earlier.write_text(json.dumps({"protocol": None}))
    with pytest.raises(SystemExit, match="no tuned protocol"):
        se.main(["--selected-from", str(earlier), "--out", str(tmp_path), "--name", "t"])


def test_reuse_takes_complete_earlier_runs_instead_of_running_them(tmp_path, monkeypatch):
    import benchmarks.sample_efficiency as se

    def result(job, iterations=2):
        accuracy = {"actor_lr=1e-4": 0.8, "actor_lr=2e-4": 0.6}[job[3]]
        return {"evals": [{"label": "base", "iteration": 0, "samples": 0, "train_seconds": 0.0,
                           "eval/digit_alignment": 0.3, "eval/digit_alignment_accuracy": 0.3},
                          {"label": "final", "iteration": iterations, "samples": 32 * iterations, "train_seconds": 5.0,
                           "eval/digit_alignment": 0.5, "eval/digit_alignment_accuracy": accuracy}],
                "summary": None, "wall_s": 1.0, "complete": True}

    calls = []

    def fake_run_all(jobs, args, out_dir, start=None):
        calls.append(list(jobs))
        return {job: result(job) for job in jobs}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    monkeypatch.setattr(se, "plot", lambda *a, **k: None)
    common = ["--backbones", "dit", "--methods", "actor_critic", "--iterations", "2", "--out", str(tmp_path)]
    # an earlier run: the 1e-4 configuration on seeds 0 and 1
    assert se.main([*common, "--seeds", "0", "1", "--grid", "actor_lr=1e-4", "--name", "earlier"]) == 0
    calls.clear()
    assert se.main([*common, "--seeds", "0", "1", "--grid", "actor_lr=1e-4,2e-4", "--name", "t",
                    "--reuse", str(tmp_path / "earlier.csv")]) == 0
    assert calls == [[("dit", "actor_critic", 0, "actor_lr=2e-4")]]  # only the grid run not done before
    full = json.loads((tmp_path / "t.json").read_text())
    assert full["protocol"]["selected"] == {"dit/actor_critic": "actor_lr=1e-4"}
    assert full["headline"] == [] and len(se.read_csv(tmp_path / "t.csv")) == 3 * 2  # seeds 0, 1 and the grid run
    calls.clear()  # a longer budget: nothing of the earlier CSV is complete, everything runs
    assert se.main([*common[:-4], "--iterations", "3", "--out", str(tmp_path), "--seeds", "0", "--grid",
                    "actor_lr=1e-4", "--name", "u", "--reuse", str(tmp_path / "earlier.csv")]) == 0
    assert calls == [[("dit", "actor_critic", 0, "actor_lr=1e-4")]]


def test_reuse_of_a_grid_and_its_seeds_run_apart_makes_one_tuned_result(tmp_path, monkeypatch):
    import benchmarks.sample_efficiency as se

    def fake_run_all(jobs, args, out_dir, start=None):
        return {job: {"evals": [{"label": "base", "iteration": 0, "samples": 0, "train_seconds": 0.0,
                                 "eval/digit_alignment": 0.3, "eval/digit_alignment_accuracy": 0.3},
                                {"label": "final", "iteration": 2, "samples": 64, "train_seconds": 5.0,
                                 "eval/digit_alignment": 0.5,
                                 "eval/digit_alignment_accuracy": {"actor_lr=1e-4": 0.8, "actor_lr=2e-4": 0.6}[job[3]]
                                 + 0.01 * job[2]}],
                      "summary": {"final_explained_variance": 0.1 * (job[2] + 1)}, "wall_s": 3.0 + job[2],
                      "complete": True} for job in jobs}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    monkeypatch.setattr(se, "plot", lambda *a, **k: None)
    common = ["--backbones", "dit", "--methods", "grpo", "--iterations", "2", "--out", str(tmp_path)]
    assert se.main([*common, "--seeds", "0", "--grid", "actor_lr=1e-4,2e-4", "--name", "grid"]) == 0
    assert se.main([*common, "--seeds", "1", "2", "--selected-from", str(tmp_path / "grid.json"),
                    "--name", "seeds"]) == 0

    def nothing_to_run(jobs, args, out_dir, start=None):
        raise AssertionError(f"every run was reused, yet {jobs} ran")

    monkeypatch.setattr(se, "run_all", nothing_to_run)
    assert se.main([*common, "--seeds", "0", "1", "2", "--grid", "actor_lr=1e-4,2e-4", "--name", "tuned",
                    "--reuse", str(tmp_path / "grid.csv"), str(tmp_path / "seeds.csv")]) == 0
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["protocol"]["selected"] == {"dit/grpo": "actor_lr=1e-4"}
    assert sorted(tuned["runs"]) == [f"dit/grpo/{seed}/actor_lr={lr}" for seed, lr in
                                     [(0, "1e-4"), (0, "2e-4"), (1, "1e-4"), (2, "1e-4")]]
    run = tuned["runs"]["dit/grpo/2/actor_lr=1e-4"]  # diagnostics from the JSON beside the seeds' CSV
    assert run["final_explained_variance"] == pytest.approx(0.3) and run["wall_s"] == 5.0
    assert run["evals"][-1]["eval/digit_alignment_accuracy"] == pytest.approx(0.82)
    rows = [r for r in se.read_csv(tmp_path / "tuned.csv") if r["selected"] and r["iteration"] == 2]
    assert sorted((r["seed"], round(r["accuracy"], 6)) for r in rows) == [(0, 0.8), (1, 0.81), (2, 0.82)]


def test_each_finished_run_is_kept_at_once_so_an_interrupted_benchmark_can_be_reused(tmp_path, monkeypatch):
    import argparse
    import sys

    import benchmarks.sample_efficiency as se

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"eval_history": [{"samples_seen": 0}, {"samples_seen": 64}],
                                   "eval_train_seconds": [0.0, 7.5]}))

    def fake_command(backbone, method, seed, args, out_dir, config=""):
        log = ("[eval base @ iteration 0, 0 samples] digit_alignment 0.400, digit_alignment_accuracy 0.410\n"
               f"[eval final @ iteration 2, 64 samples] digit_alignment 0.500, digit_alignment_accuracy 0.{seed}5\n"
               + (f"summary: {summary}\n" if seed == 0 else ""))  # seed 1 is stopped before it ends
        return [sys.executable, "-c", f"import sys; sys.stdout.write({log!r})" + ("; sys.exit(1)" if seed else "")]

    monkeypatch.setattr(se, "command", fake_command)
    args = argparse.Namespace(threads=1, jobs=2, time_limit=0, task="digits", name="t")
    jobs = [("dit", "grpo", 0, "actor_lr=1e-4"), ("dit", "grpo", 1, "actor_lr=1e-4")]
    with pytest.raises(RuntimeError, match="failed"):  # the second run fails: the benchmark stops there
        se.run_all(jobs, args, tmp_path)
    progress = tmp_path / "runs" / "t_progress.csv"
    reused = se.reused_results(progress, "digits", 2)
    assert list(reused) == [("dit", "grpo", 0, "actor_lr=1e-4")]  # the complete run survived, the failed one not
    assert [e["eval/digit_alignment_accuracy"] for e in reused[jobs[0]]["evals"]] == [0.41, 0.05]
    assert [e["train_seconds"] for e in reused[jobs[0]]["evals"]] == [0.0, 7.5]
    se.append_progress(progress, "digits", se.curve_rows("dit", "grpo", 0, reused[jobs[0]], "digits", jobs[0][3]))
    assert len(se.reused_results(progress, "digits", 2)[jobs[0]]["evals"]) == 2  # a run kept twice is read once


def test_runs_write_no_checkpoint_unless_kept():
    import argparse

    import yaml

    from benchmarks.sample_efficiency import command

    args = argparse.Namespace(task="digits", iterations=150, accelerator="cpu", eval_every=25, eval_samples=1,
                              overrides=[])
    plain = command("unet", "actor_critic", 0, args, Path("out"))
    assert "--trainer.callbacks=[]" in plain and "--trainer.enable_checkpointing=false" in plain
    kept = command("unet", "actor_critic", 0, argparse.Namespace(**vars(args), keep_checkpoints=True), Path("out"))
    (callbacks,) = [a for a in kept if a.startswith("--trainer.callbacks=")]
    assert "--trainer.enable_checkpointing=false" not in kept
    assert yaml.safe_load(callbacks.split("=", 1)[1]) == [  # one write, at the end, named last.ckpt
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_epochs": 150, "filename": "last", "enable_version_counter": False}}]


@pytest.mark.slow
def test_a_kept_checkpoint_is_the_run_s_final_state(tmp_path):
    import argparse
    import os
    import subprocess

    import torch

    from benchmarks.sample_efficiency import command

    args = argparse.Namespace(task="digits", iterations=2, accelerator="cpu", eval_every=2, eval_samples=1,
                              overrides=[], keep_checkpoints=True)
    done = subprocess.run(command("dit", "grpo", 0, args, tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (ckpt,) = (tmp_path / "runs").glob("grpo_dit_seed0/version_0/checkpoints/*.ckpt")
    assert ckpt.name == "last.ckpt" and torch.load(ckpt, weights_only=False)["epoch"] == 1  # after iteration 2


def test_report_from_several_csvs_merges_them_into_one_result(tmp_path, monkeypatch):
    import benchmarks.sample_efficiency as se

    def fake_run_all(jobs, args, out_dir, start=None):
        return {job: {"evals": [{"label": "base", "iteration": 0, "samples": 0, "train_seconds": 0.0,
                                 "eval/digit_alignment": 0.3, "eval/digit_alignment_accuracy": 0.3},
                                {"label": "final", "iteration": 2, "samples": 64, "train_seconds": 10.0,
                                 "eval/digit_alignment": 0.5, "eval/digit_alignment_accuracy":
                                     0.5 + 0.1 * (job[3] == "actor_lr=1e-4") + 0.01 * job[2]}],
                      "summary": {"final_explained_variance": 0.4 if job[1] == "actor_critic" else None},
                      "wall_s": 100.0 + job[2], "complete": True}
                for job in jobs}

    monkeypatch.setattr(se, "run_all", fake_run_all)
    monkeypatch.setattr(se, "plot", lambda *a, **k: None)
    common = ["--methods", "actor_critic", "grpo", "--seeds", "0", "1", "--iterations", "2", "--out", str(tmp_path)]
    for backbone in ("dit", "unet"):  # one tuned run per backbone, as a long benchmark is split
        assert se.main([*common, "--backbones", backbone, "--grid", "actor_lr=1e-4,2e-4", "--name", backbone]) == 0
    dit_csv = (tmp_path / "dit.csv").read_text()
    with pytest.raises(SystemExit):  # without a --name the merged CSV would overwrite dit.csv, an input
        se.main([*common, "--report-from", str(tmp_path / "dit.csv"), str(tmp_path / "unet.csv")])
    assert (tmp_path / "dit.csv").read_text() == dit_csv
    assert se.main([*common, "--report-from", str(tmp_path / "dit.csv"), str(tmp_path / "unet.csv"),
                    "--name", "both"]) == 0
    merged = json.loads((tmp_path / "both.json").read_text())
    assert [h["backbone"] for h in merged["headline"]] == ["dit", "unet"]
    assert merged["protocol"]["selected"] == {f"{b}/{m}": "actor_lr=1e-4" for b in ("dit", "unet")
                                              for m in ("actor_critic", "grpo")}
    assert len(merged["runs"]) == 2 * 2 * (2 + 1)  # per backbone and method: the grid on seed 0, the best on seed 1
    assert len(se.read_csv(tmp_path / "both.csv")) == 2 * len(se.read_csv(tmp_path / "dit.csv"))
    text = (tmp_path / "both.md").read_text()
    assert "| unet | GRPO | 0.300 | 64 | 0.605 | 0.600–0.610 | 2 (2) | 2 | — | 100 |" in text  # runs from the JSONs
    assert "| dit | actor-critic (ours) | 0.300 | 64 | 0.605 | 0.600–0.610 | 2 (2) | 2 | 0.40 | 100 |" in text
    # a variant of one method, run apart, replaces that method's runs when it comes later
    assert se.main([*common[3:], "--methods", "grpo", "--backbones", "dit", "--grid", "actor_lr=1e-4,2e-4",
                    "--name", "variant"]) == 0
    assert se.main([*common, "--report-from", str(tmp_path / "dit.csv"), str(tmp_path / "variant.csv"),
                    "--name", "swapped"]) == 0
    swapped = se.read_csv(tmp_path / "swapped.csv")
    assert len(swapped) == len(se.read_csv(tmp_path / "dit.csv"))  # GRPO's rows swapped, not added
    assert {k.split("/")[1] for k in json.loads((tmp_path / "swapped.json").read_text())["runs"]} == {
        "actor_critic", "grpo"}
    assert se.main([*common, "--backbones", "unet", "--grid", "actor_lr=1e-4,3e-4", "--name", "other"]) == 0
    with pytest.raises(SystemExit, match="only runs of the same protocol merge"):  # one backbone, two grids
        se.main([*common, "--report-from", str(tmp_path / "unet.csv"), str(tmp_path / "other.csv"), "--name", "x"])
    # each backbone with its own grid merges, and the protocol says which grid each backbone had
    assert se.main([*common, "--report-from", str(tmp_path / "dit.csv"), str(tmp_path / "other.csv"),
                    "--name", "own_grids"]) == 0
    own = json.loads((tmp_path / "own_grids.json").read_text())
    assert [h["backbone"] for h in own["headline"]] == ["dit", "unet"]
    assert {b: e["grid"] for b, e in own["protocol"]["per_backbone"].items()} == {
        "dit": ["actor_lr=1e-4,2e-4"], "unet": ["actor_lr=1e-4,3e-4"]}
    assert "grid" not in own["protocol"] and set(own["protocol"]["selected"]) == {
        f"{b}/{m}" for b in ("dit", "unet") for m in ("actor_critic", "grpo")}
    assert "per_backbone" not in merged["protocol"]  # one grid for both: the protocol as before


def test_digit_runs_record_the_independent_judge_and_older_csvs_without_it_still_merge(tmp_path):
    import csv

    import benchmarks.sample_efficiency as se

    log = ("[eval base @ iteration 0, 0 samples] digit_alignment 0.400, digit_alignment_accuracy 0.410, "
           "independent_judge 0.350, independent_judge_accuracy 0.380\n"
           "[eval final @ iteration 2, 64 samples] digit_alignment 0.600, digit_alignment_accuracy 0.700, "
           "independent_judge 0.450, independent_judge_accuracy 0.480\n")
    evals, _ = se.parse_log(log)
    new = [r for m in ("actor_critic", "grpo") for r in se.curve_rows("dit", m, 0, {"evals": evals})]
    assert [r["independent_accuracy"] for r in new] == pytest.approx([0.38, 0.48, 0.38, 0.48])
    table = se.report(new, {}, ["dit"], ["actor_critic", "grpo"], "cmd", "machine")
    assert "independent judge: base → at budget |" in table and "| 0.380 → 0.480 |" in table
    # a CSV from before the judge (no column) and one with it: merged, the older runs read NaN and show "—"
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f for f in se.csv_fields("digits") if f != "independent_accuracy"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**r, "backbone": "unet", "selected": 1} for r in new])
    se.write_csv(tmp_path / "new.csv", "digits", [{**r, "selected": 1} for r in new])
    se.write_csv(tmp_path / "both.csv", "digits", se.read_csv(old) + se.read_csv(tmp_path / "new.csv"))
    both = se.read_csv(tmp_path / "both.csv")
    assert all(math.isnan(r["independent_accuracy"]) for r in both if r["backbone"] == "unet")
    table = se.report(both, {}, ["dit", "unet"], ["actor_critic", "grpo"], "cmd", "machine")
    assert "| unet | GRPO | 0.410 | 64 | 0.700 | 0.700–0.700 | — → — |" in table
    reused = se.reused_results(old, "digits", 2)
    assert math.isnan(reused["unet", "grpo", 0, ""]["evals"][-1]["eval/independent_judge_accuracy"])
