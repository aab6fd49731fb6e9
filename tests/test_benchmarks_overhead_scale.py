"""benchmarks.overhead_scale and benchmarks.sd_scaled: SD-shaped configuration, and its --quick run end to end (seconds)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks.overhead_scale as ovs
import benchmarks.sd_scaled as scaled


def test_recipe_taps_scale_with_depth():
    assert scaled.scaled_taps(24) == [7, 15, 23]  # recipes/sd35: blocks 7 / 15 / 23 of 24
    assert scaled.scaled_taps(3) == [0, 1, 2]
    assert scaled.scaled_taps(4) == [0, 2, 3]
    assert scaled.scaled_taps(2) == [0, 1]


def test_full_shapes_are_sd35m_and_sd15():
    shape = scaled.sd35m_shape(24, quick=False)
    t = shape["transformer"]
    assert t["num_attention_heads"] * t["attention_head_dim"] == t["caption_projection_dim"] == 1536
    assert t["num_attention_heads"] == 24 and t["in_channels"] == 16 and t["joint_attention_dim"] == 4096
    assert t["pooled_projection_dim"] == sum(shape["clip_projection_dims"]) == 2048
    assert shape["text_tokens"] == 333 and shape["image_tokens"] == 1024 and t["sample_size"] == 64
    assert t["dual_attention_layers"] == tuple(range(13)) and t["qk_norm"] == "rms_norm"
    unet = scaled.sd15_shape(1, quick=False)
    assert unet["unet"]["block_out_channels"] == (320, 640, 1280, 1280) and unet["unet"]["sample_size"] == 64
    assert unet["unet"]["layers_per_block"] == 1 and unet["unet"]["cross_attention_dim"] == 768
    assert unet["taps"] == ["down_blocks.1", "mid_block", "up_blocks.1"]


def test_defaults_per_accelerator_and_output_names():
    _, cpu, isolate, out = ovs.parse([])
    assert (cpu["steps"], cpu["batch"], cpu["blocks"], cpu["dtype"], isolate, out) == \
        (2, 1, 3, "float32", True, "overhead_scale")
    _, gpu, _, out = ovs.parse(["--accelerator", "gpu"])
    assert (gpu["blocks"], gpu["unet_layers"], gpu["dtype"], gpu["gradient_checkpointing"], out) == \
        (24, 2, "bfloat16", True, "overhead_scale_gpu")
    _, quick, isolate, _ = ovs.parse(["--quick", "--backbones", "sd15", "--steps", "3"])
    assert quick["backbones"] == ["sd15"] and quick["steps"] == 3 and quick["threads"] == 1 and not isolate
    assert ovs.output_path("x") == ovs.RESULTS / "x.json"
    assert ovs.output_path("/tmp/a/b.json") == Path("/tmp/a/b.json")


def _check(result: dict, backbones, repeats: int, steps: int) -> None:
    assert result["command"].startswith("python -m benchmarks.overhead_scale")
    assert {"platform", "cpu_count", "torch", "threads"} <= result["machine"].keys()
    assert set(ovs.RATIO_KEYS) <= result["comparisons"].keys()
    for name in backbones:
        r = result[name]
        for key in ovs.RATIO_KEYS:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        for phase in ovs.PHASES:
            t, m = r["timings_s"][phase], r["peak_memory_mb"][phase]
            assert len(t["repeats"]) == repeats and 0 < t["min"] <= t["median"] <= t["max"]
            assert m["peak"] > 0 and m["increase"] >= 0
        calls = r["denoiser_calls"]
        assert calls["rollout_with_logprob_value"] == calls["pipeline"] == steps
        assert calls["update_with_critic"] == calls["update_without_critic"] == r["update_minibatches"]


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "overhead_scale_test.json"
    assert ovs.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check(result, ("sd35m", "sd15"), repeats=2, steps=2)
    assert result["settings"]["quick"] and result["sd35m"]["shape"]["taps"] == [0, 1]
    assert out.with_suffix(".png").stat().st_size > 0 and "sd15" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_quick_run_one_process_per_backbone(tmp_path):
    out = tmp_path / "isolated.json"
    subprocess.run([sys.executable, "-m", "benchmarks.overhead_scale", "--quick", "--isolate", "--backbones", "sd15",
                    "--steps", "3", "--repeats", "1", "--out", str(out)],
                   cwd=Path(ovs.__file__).resolve().parent.parent, check=True, capture_output=True)
    result = json.loads(out.read_text())
    _check(result, ("sd15",), repeats=1, steps=3)
    assert result["isolation"] == "one process per backbone" and "sd35m" not in result
