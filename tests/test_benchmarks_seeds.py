"""The seed-sweep benchmark's summary parsing and table (the subprocess runs are exercised by test_recipes)."""

from benchmarks.seeds import row, table


def _summary(base, final, ev):
    return {"base": {"eval/digit_alignment": 0.4, "eval/digit_alignment_accuracy": base},
            "final": {"eval/digit_alignment": 0.7, "eval/digit_alignment_accuracy": final},
            "final_explained_variance": ev, "samples_seen": 320, "wall_time_s": 10.0, "process_wall_time_s": 12.0,
            "final_train": {"train/explained_variance_early": ev - 0.1, "train/explained_variance_late": ev + 0.1}}


def test_rows_and_table():
    rows = [row(0, _summary(0.40, 0.70, 0.3)), row(1, _summary(0.42, 0.66, 0.5))]
    assert abs(rows[0]["gain"] - 0.30) < 1e-9
    text = table(rows)
    assert "| 0 | 0.400 | 0.700 | +30.0 | 0.30 |" in text
    assert "| mean | 0.410 | 0.680 | +27.0 | 0.40 |" in text
    assert "| min | 0.400 | 0.660 | +24.0 |" in text
