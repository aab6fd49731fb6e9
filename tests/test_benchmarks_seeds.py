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


def test_overrides_after_double_dash_reach_every_run(tmp_path, monkeypatch):
    import benchmarks.seeds as seeds

    calls = []

    def fake_run_seed(recipe, seed, threads, overrides, out):
        calls.append((recipe, seed, threads, list(overrides)))
        return _summary(0.4, 0.6, 0.2)

    monkeypatch.setattr(seeds, "run_seed", fake_run_seed)
    monkeypatch.setattr(seeds, "RESULTS", tmp_path)
    assert seeds.main(["recipes/toy/actor_critic_dit.yaml", "--seeds", "0", "1", "--threads", "1", "--out", "x", "--",
                       "--model.init_args.actor_lr=1e-4", "--model.init_args.timestep_fraction=0.5"]) == 0
    assert sorted(calls) == [("recipes/toy/actor_critic_dit.yaml", s, 1,
                              ["--model.init_args.actor_lr=1e-4", "--model.init_args.timestep_fraction=0.5"])
                             for s in (0, 1)]
    assert "-- --model.init_args.actor_lr=1e-4" in (tmp_path / "x_seeds.md").read_text()
