"""benchmarks.gradient_snr: the signal / noise estimator against known statistics, and the benchmark's output."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gradient_snr


def test_signal_noise_recovers_known_signal_and_noise():
    gen = torch.Generator().manual_seed(0)
    signal = torch.zeros(50)
    signal[:5] = 1.0  # ‖E g‖² = 5
    g = signal + 2.0 * torch.randn(4000, 50, generator=gen)  # noise per batch: 50 · 2² = 200
    stats = gradient_snr.signal_noise(g)
    assert stats["noise2"] == pytest.approx(200.0, rel=0.03)
    assert stats["signal2"] == pytest.approx(5.0, abs=0.3)
    assert stats["snr"] == pytest.approx(5.0 / 200.0, abs=0.002)
    # a pure-noise estimate is centred on 0 (the naive ‖mean‖² would be noise2 / B > 0)
    pure = gradient_snr.signal_noise(torch.randn(6, 1000, generator=gen))
    assert abs(pure["signal2"]) < 3 * (2 * 1000) ** 0.5 / 6 and pure["signal2"] < (pure["noise2"] / 6)
    with pytest.raises(ValueError, match="at least 2 batches"):
        gradient_snr.signal_noise(g[:1])


def test_benchmark_writes_per_step_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(gradient_snr, "RESULTS", tmp_path)
    assert gradient_snr.main(["--models", "toy-pairs-unet", "--batches", "2", "--prompts", "2", "--group", "2",
                              "--out", "snr"]) == 0
    result = json.loads((tmp_path / "snr.json").read_text())
    model = result["models"]["toy-pairs-unet"]
    assert [s["step"] for s in model["steps"]] == list(range(10))
    assert all(s["norm"] > 0 and s["noise2"] > 0 for s in model["steps"])
    assert set(model["windows"]) == {"all", "first 3", "first 5", "last 5", "last 2"}
    assert 0.1 <= model["largest_step_share"] <= 1.0
    assert (tmp_path / "snr.md").read_text().count("\n| ") >= 15
