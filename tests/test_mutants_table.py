"""The mutation table of ``benchmarks.mutants`` stays importable and listable (the mutation check itself is
slow and is not run here: ``python -m benchmarks.mutants``)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mutants_list_runs():
    from benchmarks.mutants import MUTANTS

    out = subprocess.run([sys.executable, "-m", "benchmarks.mutants", "--list"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(MUTANTS) >= 12
    for mutant in MUTANTS:
        assert mutant.name in out.stdout
