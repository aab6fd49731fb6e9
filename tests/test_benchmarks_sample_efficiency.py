"""The sample-efficiency benchmark's bookkeeping (its end-to-end --quick run is a slow test)."""

import json

import pytest

from benchmarks.sample_efficiency import headline, mean_curve, parse_log, samples_to_reach


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
    assert rows[1] == {"backbone": "dit", "method": "actor_critic", "seed": 0, "iteration": 2, "samples": 64,
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
    assert se.read_csv(path) == rows
    assert "seen pairs" not in se.report(_rows("grpo", [(0, 0.4), (640, 0.5)]), {}, ["dit"], ["grpo"], "c", "m")
