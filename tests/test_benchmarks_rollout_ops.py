"""``benchmarks/rollout_ops.py``: the critic's operators in a rollout do not grow with the number of steps."""

from __future__ import annotations

import json

from benchmarks import rollout_ops


def test_critic_operators_are_paid_once_per_rollout():
    added = {}
    for steps in (2, 6):
        counts = rollout_ops.count("sd15", steps=steps, batch=2, quick=True)
        assert counts["pipeline"]["operators"] > 0
        added[steps] = counts["rollout"]["operators"] - counts["rollout_without_critic"]["operators"]
    # One value-head call per rollout: what the critic adds grows only by its per-step feature pooling and the
    # values' concatenation; with a call per step it would triple from 2 to 6 steps.
    assert 0 < added[2] and added[6] < 1.5 * added[2], added


def test_cli_writes_the_table(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert rollout_ops.main(["--quick", "--backbones", "sd35m", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    phases = report["backbones"]["sd35m"]
    assert set(phases) == set(rollout_ops.PHASES) and phases["rollout"]["over_pipeline"] > 1.0
    assert "| sd35m |" in capsys.readouterr().out
