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
