"""The extensions benchmark's table writer (its end-to-end --quick run is a slow test)."""

import argparse

import benchmarks.extensions as ext


def test_several_seeds_get_a_mean_row_per_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(ext, "RESULTS", tmp_path)
    rows = [{"group": "timestep_conditioning", "variant": variant, "seed": seed, "alignment_acc": acc,
             "brightness": None, "ev": ev, "fit_s": 100.0}
            for seed, (acc, ev) in enumerate([(0.6, 0.2), (0.7, 0.4), (0.8, 0.3)])
            for variant in ("with (default)", "without")]
    ext.write(rows, argparse.Namespace(out="ext_test", threads=1), 60.0)
    table = (tmp_path / "ext_test.md").read_text()
    assert "| with (default) | mean | 0.700 | 0.300 | 100.000 |" in table
    assert "| without | mean | 0.700 | 0.300 | 100.000 |" in table
    assert "brightness" not in table  # a column no row fills is left out
    assert (tmp_path / "ext_test.csv").is_file() and not (tmp_path / "extensions_steering.png").exists()


def test_reward_hacking_sweeps_the_weights_for_every_head_form(tmp_path, monkeypatch):
    monkeypatch.setattr(ext, "RESULTS", tmp_path)
    calls = []

    def fake_run(recipe, overrides, cfg):
        calls.append((recipe, overrides))
        return {"final": {"eval/digit_alignment_accuracy": 0.5, "eval/brightness": 0.5}, "final_train": {},
                "final_explained_variance": 0.1, "wall_time_s": 1.0, "log_dir": str(tmp_path)}

    monkeypatch.setattr(ext, "run", fake_run)
    assert ext.main(["--groups", "reward_hacking", "--weights", "1", "3", "--iters", "2", "--out", "rh"]) == 0
    multi = [o for r, o in calls if r == ext.MULTI]
    weights = [next(a for a in o if a.startswith("--model.init_args.reward_weights=")) for o in multi]
    assert weights == ["--model.init_args.reward_weights=[1.0, 1.0]"] * 3 + [
        "--model.init_args.reward_weights=[1.0, 3.0]"] * 3
    assert ["--model.init_args.value_per_reward=false" in o for o in multi] == [False, True, False] * 2
    combined = "--model.init_args.estimator.init_args.whitening=combined"
    assert [combined in o for o in multi] == [False, False, True] * 2
    table = (tmp_path / "rh.md").read_text()
    assert "1:3, one head on the sum" in table and "brightness only" in table
    assert "1:3, one head per reward, whitened together" in table
    # --hacking runs only the named variants (e.g. a new one beside earlier runs of the others)
    calls.clear()
    assert ext.main(["--groups", "reward_hacking", "--weights", "3", "--hacking", "combined", "--iters", "2",
                     "--out", "rh2"]) == 0
    assert len(calls) == 1 and calls[0][0] == ext.MULTI and combined in calls[0][1]


def test_report_from_merges_per_seed_csvs_into_one_table(tmp_path, monkeypatch):
    monkeypatch.setattr(ext, "RESULTS", tmp_path)
    for seed, acc in ((0, 0.6), (1, 0.8)):
        rows = [{"group": "timestep_conditioning", "variant": "without", "seed": seed, "alignment_acc": acc,
                 "brightness": None, "ev": 0.5, "fit_s": 10.0}]
        ext.write(rows, argparse.Namespace(out=f"seed{seed}", threads=1), 1.0)
    assert ext.main(["--report-from", str(tmp_path / "seed0.csv"), str(tmp_path / "seed1.csv"), "--out", "both"]) == 0
    table = (tmp_path / "both.md").read_text()
    assert "| without | 0 | 0.600 |" in table and "| without | 1 | 0.800 |" in table
    assert "| without | mean | 0.700 | 0.500 | 10.000 |" in table
    # a run repeated in a later CSV (the same group, variant and seed) counts once, as that CSV has it
    assert ext.main(["--report-from", str(tmp_path / "seed0.csv"), str(tmp_path / "seed1.csv"), str(tmp_path / "seed1.csv"),
                     "--out", "again"]) == 0
    assert (tmp_path / "again.md").read_text().count("| without | 1 | 0.800 |") == 1
