"""The torch.compile probe runs end to end (slow: compiling takes about a minute on 2 cores)."""

import json

import pytest


@pytest.mark.slow
def test_compile_probe_times_eager_and_compiled_passes(tmp_path):
    from benchmarks.compile_probe import main

    assert main(["--batch", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compile_probe.json").read_text())
    assert result["batch"] == 4 and result["compiled_ms"] > 0 and result["compile_s"] > 0
    assert len(result["eager_ms"]) == 2 and "compiled" in (tmp_path / "compile_probe.md").read_text()
