"""Distributed data parallelism: a real 2-process DDP run (CPU, gloo) against the 1-process computation.

``tests/ddp_worker.py`` runs one actor-critic iteration on the toy DiT with ``Trainer(strategy="ddp", devices=2,
accelerator="cpu")`` and saves each rank's statistics.  Concatenated in rank order they form the global batch;
normalising and estimating on that batch in one process must give exactly what the ranks computed with their
cross-process gathers (global reward normalisation and advantage whitening).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_diffac.estimators import CriticGAE
from lit_diffac.normalization import RewardNormalizer

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(WORKER), str(out), "2"], env=env, capture_output=True, text=True,
                            timeout=240, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_processes_ran_and_drew_different_prompts(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # prompts are sharded: each rank draws its own
    assert all(r["raw_rewards"].shape == (4, 1) for r in ranks)


def test_global_statistics_equal_the_one_process_computation(ranks):
    raw = torch.cat([r["raw_rewards"] for r in ranks])
    normalized = RewardNormalizer(1, "running")(raw)  # one process, the same global batch, first iteration
    torch.testing.assert_close(torch.cat([r["normalized"] for r in ranks]), normalized, rtol=0, atol=1e-6)
    values = torch.cat([r["values"] for r in ranks])
    prompts = ranks[0]["prompts"] + ranks[1]["prompts"]
    est = CriticGAE()(normalized, values, prompts, torch.ones(1))
    torch.testing.assert_close(torch.cat([r["advantages"] for r in ranks]), est.advantages, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["targets"] for r in ranks]), est.targets, rtol=0, atol=1e-5)
    # and a per-rank (local) whitening would have differed: the statistics really are global
    local = CriticGAE()(RewardNormalizer(1, "running")(ranks[0]["raw_rewards"]), ranks[0]["values"],
                        ranks[0]["prompts"], torch.ones(1))
    assert (local.advantages - ranks[0]["advantages"]).abs().max() > 1e-3


def test_ddp_keeps_the_replicas_identical(ranks):
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
