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


def test_the_independent_judge_gets_its_columns_and_never_stands_in_for_the_reward():
    def judged(base, final, independent):
        s = _summary(base, final, 0.3)
        # the judge's key first: the reward's accuracy must still be the one reported as "final acc"
        s["base"] = {"eval/independent_judge_accuracy": 0.43, **s["base"]}
        s["final"] = {"eval/independent_judge_accuracy": independent, **s["final"]}
        return s

    rows = [row(0, judged(0.40, 0.80, 0.48)), row(1, judged(0.40, 0.70, 0.66))]
    assert rows[0]["final"] == 0.80 and rows[0]["independent"] == 0.48
    text = table(rows)
    assert "independent judge: base / final" in text.splitlines()[0]
    assert "| 0 | 0.400 | 0.800 | +40.0 | 0.430 / 0.480 | 0.30 |" in text
    assert "| mean | 0.400 | 0.750 | +35.0 | 0.430 / 0.570 | 0.30 |" in text
    # a run without the judge (an older recipe) leaves the columns out for the whole table
    assert "independent" not in table([rows[0], row(2, _summary(0.4, 0.6, 0.2))])
