"""Fully sharded data parallelism: real 2-process FSDP runs (CPU, gloo) of the actor-critic with LoRA.

``tests/fsdp_worker.py`` trains the toy DiT with a rank-2 LoRA policy, feature taps feeding the value head and
the two optimisers (manual optimisation) under Lightning's ``FSDPStrategy`` (the denoiser one unit per block, the
value head its own unit: :func:`lit_diffac.distributed.shard_module`): with ``SHARD_GRAD_OP`` 2 iterations and a
sharded checkpoint, a resume from it for 2 more and 4 iterations in one go; with ``FULL_SHARD`` 2 iterations; and
the same 2 iterations under DDP.
Gradient clipping is active in every minibatch, so a norm taken over one process's shards only would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
RUNS = ("first", "resumed", "whole", "full_shard", "ddp")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    env.pop("LOCAL_RANK", None)
    # the worker's own deadline (180 s) ends both processes, so a hang cannot outlive the test
    result = subprocess.run([sys.executable, str(WORKER), str(out), "180"], env=env, capture_output=True, text=True,
                            timeout=240, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(out) -> dict[str, list[dict]]:
    return {run: [torch.load(out / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1)] for run in RUNS}


def trainable(state: dict[str, torch.Tensor], part: str) -> list[str]:
    return [k for k in state if (".lora_" in k if part == "lora" else k.startswith("value_head."))]


def test_two_processes_trained_the_lora_policy_and_the_value_head_under_fsdp(runs):
    first = runs["first"]
    assert [r["rank"] for r in first] == [0, 1] and all(r["world_size"] == 2 for r in first)
    assert all(r["strategy"] == "CPUFSDPStrategy" and r["denoiser"] == r["value_head"] == "FullyShardedDataParallel"
               for r in first)
    before, after = first[0]["before"], first[0]["after"]
    lora, head = trainable(after, "lora"), trainable(after, "value_head")
    assert len(lora) == 32 and len(head) > 10  # rank-2 LoRA on to_q/k/v/out of 4 blocks; the whole head
    assert not [k for k in lora + head if torch.equal(before[k], after[k])]  # every one of them changed
    assert all(torch.isfinite(torch.tensor(m["train/value_loss"])) for m in first[0]["metrics"])  # taps → head


def test_both_optimisers_stepped_and_each_process_keeps_only_its_shard_of_their_states(runs):
    after = runs["first"][0]["after"]
    sizes = [sum(after[k].numel() for k in trainable(after, part)) for part in ("lora", "value_head")]
    for index, size in enumerate(sizes):  # optimiser 0: actor (LoRA), 1: critic (value head)
        states = [r["optimizers"][index]["state"] for r in runs["first"]]
        assert all(states) and all(float(s["step"]) == 4 for st in states for s in st.values())  # 2 iterations x 2
        held = [sum(s["exp_avg"].numel() for s in st.values()) for st in states]
        assert sum(held) == size and all(0 < h < size for h in held), (held, size)  # split, not replicated


def test_the_processes_agree_on_the_weights_and_on_one_clipping_norm(runs):
    for run in RUNS:
        a, b = runs[run]
        assert a["after"].keys() == b["after"].keys()
        assert all(torch.equal(a["after"][k], b["after"][k]) for k in a["after"]), run  # gathered whole weights
        for ma, mb in zip(a["metrics"], b["metrics"]):  # the whole gradient's norm, not each process's shard's
            assert ma["train/actor_grad_norm"] == mb["train/actor_grad_norm"]
            assert ma["train/critic_grad_norm"] == mb["train/critic_grad_norm"]


@pytest.mark.parametrize("run", ["first", "full_shard"])
def test_fsdp_computes_what_ddp_computes(runs, run):
    """Same 2 iterations, same seeds: the updates differ only by the order of floating-point sums (reduce-scatter
    against all-reduce), far below what one update changes."""
    fsdp, ddp = runs[run][0], runs["ddp"][0]
    assert fsdp["sharding"].endswith("SHARD_GRAD_OP" if run == "first" else "FULL_SHARD")
    for mf, md in zip(fsdp["metrics"], ddp["metrics"], strict=True):
        for key in ("train/actor_grad_norm", "train/critic_grad_norm"):
            assert mf[key] > fsdp["max_grad_norm"]  # clipping acted
            assert mf[key] == pytest.approx(md[key], rel=1e-5), key
    weights = trainable(fsdp["after"], "lora") + trainable(fsdp["after"], "value_head")
    assert sorted(weights) == sorted(trainable(ddp["after"], "lora") + trainable(ddp["after"], "value_head"))
    for key in weights:
        torch.testing.assert_close(fsdp["after"][key], ddp["after"][key], rtol=0, atol=2e-5)
    assert max((fsdp["after"][k] - fsdp["before"][k]).abs().max().item() for k in weights) > 1e-2


def test_the_checkpoint_is_sharded_on_disk(out):
    from torch.distributed.checkpoint import FileSystemReader

    folder = out / "first" / "last.ckpt"
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    meta = torch.load(folder / "meta.pt", weights_only=True)  # the rest of the checkpoint: plain, weights-only
    assert "state_dict" not in meta and "optimizer_states" not in meta
    assert meta["lit_diffac"]["samples_seen"] == 16 and meta["epoch"] == 2
    storage = FileSystemReader(str(folder)).read_metadata().storage_data
    files = {}
    for index, info in storage.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    assert {"model.backbone.denoiser.transformer_blocks.0.attn.to_q.lora_B.policy.weight",
            "model.backbone.denoiser.transformer_blocks.0.attn.to_q.base_layer.weight",  # frozen weights too
            "model.value_head.branches.0.proj.weight"} <= files.keys()
    assert any(k.startswith("optimizer_0.") for k in files) and any(k.startswith("optimizer_1.") for k in files)
    assert files["model.value_head.branches.0.proj.weight"] == {"__0_0.distcp", "__1_0.distcp"}  # one half each


def test_resume_from_the_sharded_checkpoint_is_exact(runs):
    """4 iterations in one go = 2 + resume + 2, bit for bit: metrics, whole weights, each process's optimiser
    shards."""
    for rank in (0, 1):
        whole, first, resumed = (runs[run][rank] for run in ("whole", "first", "resumed"))
        assert len(whole["metrics"]) == 4 and len(resumed["metrics"]) == 2
        assert first["metrics"] + resumed["metrics"] == whole["metrics"]  # floats compared with ==
        assert whole["after"].keys() == resumed["after"].keys()
        assert all(torch.equal(whole["after"][k], resumed["after"][k]) for k in whole["after"])
        for opt_w, opt_r in zip(whole["optimizers"], resumed["optimizers"], strict=True):
            assert opt_w["state"].keys() == opt_r["state"].keys()
            for i in opt_w["state"]:
                assert all(torch.equal(opt_w["state"][i][k], opt_r["state"][i][k]) for k in opt_w["state"][i])


def test_the_consolidated_checkpoint_loads_into_an_unsharded_module(out, runs):
    """Lightning's consolidation turns the sharded folder into one file (what `lit-diffac sample / export` read):
    weights-only, and a plain module takes it strictly, with the trained weights."""
    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.checkpoints import load_checkpoint
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards import DigitAlignment

    single = out / "consolidated.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint",
                           str(out / "first" / "last.ckpt"), "--output_file", str(single)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_checkpoint(single)  # weights-only
    module = LatentActorCritic(backbone=DiTBackbone("toy-dit", feature_taps=[1, 3], lora_rank=2),
                               rewards=[DigitAlignment()])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    state = dict(module.named_parameters())
    after = runs["first"][0]["after"]
    assert all(torch.equal(state[k], after[k]) for k in trainable(after, "lora") + trainable(after, "value_head"))


def test_clipping_unsharded_parameters_is_torchs_clip_grad_norm():
    """Without FSDP (no parameter marked by shard_module) clip_grad_norm is torch's, bit for bit."""
    from lit_diffac.distributed import clip_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    params[2].grad = twins[2].grad = None
    expected = float(torch.nn.utils.clip_grad_norm_(twins[:2], 0.5))
    assert clip_grad_norm(params, 0.5) == expected
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params[:2], twins[:2]))
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0  # no gradient: 0, as before


def test_shard_module_changes_nothing_outside_fsdp():
    from torch import nn

    from lit_diffac.distributed import is_sharded, shard_module

    module = nn.Module()
    module.backbone, module.value_head = nn.Module(), nn.Linear(2, 1)
    module.backbone.denoiser = denoiser = nn.Linear(2, 2)
    shard_module(module)  # no FSDPStrategy.model_sharded_context around it (DDP, one device)
    assert module.backbone.denoiser is denoiser and isinstance(module.value_head, nn.Linear)
    assert not is_sharded(module)
