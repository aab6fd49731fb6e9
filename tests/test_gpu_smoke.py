"""``benchmarks/gpu_smoke.py`` keeps working (on the CPU here, reduced) and fails loudly."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_smoke


def test_gpu_smoke_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--device", "cpu", "--families", "sd15", "--runs", "lora_bf16_ckpt", "--steps", "2",
                           "--batch-size", "2", "--sample-size", "8", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["iterations"] == 2 and len(result["seconds_per_iteration"]) == 2
    assert result["weights_dtype"] == "bfloat16" and result["policy_params"] > 0
    assert "1/1 runs passed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gpu_smoke_covers_sdxl_and_flux_on_cpu(family, tmp_path):
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--device", "cpu", "--families", family, "--runs", "lora_bf16_ckpt", "--steps", "2",
                           "--batch-size", "2", "--sample-size", "8", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["family"] == family and result["iterations"] == 2 and result["policy_params"] > 0


def test_gpu_smoke_exits_non_zero_on_a_failure(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_smoke, "run_once", broken)
    assert gpu_smoke.main(["--device", "cpu", "--families", "sd3", "--runs", "lora_bf16_ckpt",
                           "--sample-size", "8"]) == 1


def test_gpu_smoke_fails_when_an_update_is_skipped(monkeypatch, tmp_path, capsys):
    """The fault guard keeps a run with non-finite gradients alive; the smoke test must still call it a failure."""
    from lit_diffac.faults import NonFiniteUpdate
    from lit_diffac.modules import LatentActorCritic

    def non_finite(self, *args, **kwargs):
        raise NonFiniteUpdate("actor_grad_norm is not finite")

    monkeypatch.setattr(LatentActorCritic, "update", non_finite)
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--device", "cpu", "--families", "sd15", "--runs", "lora_bf16_ckpt", "--steps", "2",
                           "--batch-size", "2", "--sample-size", "8", "--out", str(out)]) == 1
    (result,) = json.loads(out.read_text())
    assert "2 of 2 updates skipped" in result["error"]
    assert "0/1 runs passed" in capsys.readouterr().out
