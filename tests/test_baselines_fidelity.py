"""The baselines compute what their reference implementations compute (issue 16, "faithful baselines").

* DDPO (github.com/kvablack/ddpo-pytorch): ``ddpo_pytorch/stat_tracking.py`` ``PerPromptStatTracker`` on the raw
  rewards and prompts gathered from every process (``scripts/train.py``), advantages clipped at ``adv_clip_max``.
* GRPO (github.com/yifan123/flow_grpo): ``flow_grpo/stat_tracking.py`` ``PerPromptStatTracker`` (population std,
  ε = 1e-4; ``global_std`` False and True).
* The KL to the reference: flow_grpo's ``scripts/train_sd3.py`` term and its ``sde_step_with_logprob`` std.

Each reference is re-implemented naively below in numpy, after the original's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_diffac.estimators import GroupRelative, PerPromptStatTracker, PerPromptStats, gather_strings
from lit_diffac.losses import KL_FORMS, flow_grpo_kl, gaussian_kl, reference_kl

K = 3  # denoising steps of the fake rollouts


# ---------------------------------------------------------------------------------------------------------
# Naive references
# ---------------------------------------------------------------------------------------------------------
class DDPOTracker:
    """ddpo-pytorch's ``PerPromptStatTracker`` (``ddpo_pytorch/stat_tracking.py``), as written there."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(self.stats[prompt]), np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


def ddpo_advantages(tracker: DDPOTracker, prompts: list[str], rewards: np.ndarray, adv_clip_max: float = 5.0):
    """ddpo-pytorch's ``scripts/train.py``: the tracker on the (gathered) raw rewards, then the loss's clamp."""
    return np.clip(tracker.update(np.array(prompts), rewards.astype(np.float32)), -adv_clip_max, adv_clip_max)


def flow_grpo_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """flow_grpo's ``PerPromptStatTracker.update(prompts, rewards, type='grpo')`` after ``clear()`` (one epoch)."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    stats = {}
    for prompt in np.unique(prompts):
        stats[prompt] = list(rewards[prompts == prompt])
    for prompt in np.unique(prompts):
        group = np.stack(stats[prompt])
        mean = np.mean(group, axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(group, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (rewards[prompts == prompt] - mean) / std
    return advantages


def draw(generator: torch.Generator, batch: int, names: str = "abcd") -> tuple[list[str], torch.Tensor]:
    """Random prompts (some repeated within the batch) and raw rewards far from standardised (mean 3, std 2)."""
    prompts = [names[i] for i in torch.randint(len(names), (batch,), generator=generator).tolist()]
    return prompts, 3.0 + 2.0 * torch.randn(batch, generator=generator)


class FakeProcesses:
    """``world`` threads that call a gather together, like ``all_gather`` + ``flatten(0, 1)`` across processes."""

    def __init__(self, world: int, flatten: bool = False) -> None:
        self.world, self.flatten = world, flatten
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = 0

    def gather_for(self, rank: int):
        def gather(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            out = torch.cat(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read
            if rank == 0:
                self.calls += 1
            return out.flatten() if self.flatten else out
        return gather

    def run(self, fn) -> list:
        """``fn(rank, gather)`` in every fake process; their results in rank order."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.gather_for(rank))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


# ---------------------------------------------------------------------------------------------------------
# 1. DDPO
# ---------------------------------------------------------------------------------------------------------
def test_tracker_equals_ddpo_pytorch_over_iterations():
    """Six iterations, buffer 5, min count 3: prompts below and above min_count, buffers that overflow."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = PerPromptStatTracker(buffer_size=5, min_count=3), DDPOTracker(5, 3)
    used_batch = used_own = overflowed = False
    for _ in range(6):
        prompts, rewards = draw(g, 6, "xyz")
        counts_before = {p: len(theirs.stats.get(p, ())) for p in set(prompts)}
        want = theirs.update(np.array(prompts), rewards.numpy())
        got = ours.update(prompts, rewards)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
        for p in set(prompts):
            total = counts_before[p] + prompts.count(p)
            used_batch |= total < 3
            used_own |= total >= 3
            overflowed |= total > 5
        assert {p: list(v) for p, v in theirs.stats.items()} == \
            {p: pytest.approx(v) for p, v in ours.buffers.items()}  # same buffers, same order
    assert used_batch and used_own and overflowed  # both branches and the buffer limit were exercised


def test_per_prompt_stats_are_ddpo_on_the_raw_weighted_reward():
    """The estimator: one scalar reward Σ w_i r_i per sample, the tracker on it, clipped (adv_clip_max), every step."""
    g = torch.Generator().manual_seed(1)
    est, reference = PerPromptStats(buffer_size=4, min_count=2, advantage_clip=1.5), DDPOTracker(4, 2)
    assert est.reward_normalization == "none"  # the module hands the tracker raw rewards (DDPO)
    weights = torch.tensor([1.0, 0.5])
    clipped = 0
    for _ in range(4):
        prompts, r0 = draw(g, 8)
        rewards = torch.stack([r0, 10.0 * torch.randn(8, generator=g)], -1)  # second reward on another scale
        out = est(rewards, torch.zeros(8, K, 2), prompts, weights)
        want = ddpo_advantages(reference, prompts, (rewards * weights).sum(-1).numpy(), adv_clip_max=1.5)
        assert out.targets is None and out.advantages.shape == (8, K) and out.per_reward.shape == (8, K, 1)
        np.testing.assert_allclose(out.advantages[:, 0].numpy(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.advantages, out.advantages[:, :1].expand(-1, K))
        clipped += int((out.per_reward.abs() > 1.5).sum()) // K
    assert clipped  # the clip bit


def test_ddpo_module_feeds_the_tracker_raw_rewards(dit_backbone):
    """DDPO's estimate(): no reward normalisation before the tracker (before issue 16: running-normalised)."""
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import DDPO
    from lit_diffac.rewards.base import CallableReward

    module = DDPO(backbone=dit_backbone, rewards=[CallableReward(lambda images, prompts, **_: images.mean((1, 2, 3)),
                                                                 name="b")],
                  batch_size=4, minibatch_size=20,
                  evaluation=HeldOutEvaluation(prompts=["the digit 1"], samples_per_prompt=1))
    g, reference = torch.Generator().manual_seed(2), DDPOTracker(32, 16)
    for _ in range(2):
        prompts, rewards = draw(g, 4)
        out = module.estimate(SimpleNamespace(rewards=rewards[:, None], values=torch.zeros(4, K, 1), prompts=prompts))
        np.testing.assert_allclose(out.advantages[:, 0].numpy(), ddpo_advantages(reference, prompts, rewards.numpy()),
                                   rtol=1e-5, atol=1e-5)
    assert module.reward_normalizer.mode == "none"
    assert {p: list(v) for p, v in reference.stats.items()} == \
        {p: pytest.approx(v) for p, v in module.estimator.tracker.buffers.items()}  # the raw rewards, buffered


def test_gather_strings_returns_every_process_strings_in_order():
    procs = FakeProcesses(2)
    local = [["a handwritten 7", "", "ü-ünïcode ✓"], ["x", "a much longer prompt than the others", "7"]]
    out = procs.run(lambda rank, gather: gather_strings(local[rank], gather))
    assert out[0] == out[1] == local[0] + local[1]


@pytest.mark.parametrize("flatten", [False, True], ids=["all_gather_flatten01", "all_gather_flatten"])
def test_gathered_per_prompt_stats_equal_one_process_on_the_whole_batch(flatten):
    """Two processes, four iterations: each gets exactly its slice of the one-process result on the concatenated
    batch, and all buffers are the same; a process alone would have got other advantages."""
    g = torch.Generator().manual_seed(3)
    batches = [[draw(g, 6) for _ in range(2)] for _ in range(4)]  # [iteration][rank] -> (prompts, rewards)
    procs = FakeProcesses(2, flatten=flatten)
    estimators = [PerPromptStats(buffer_size=6, min_count=3, advantage_clip=1.5) for _ in range(2)]
    single, alone = PerPromptStats(buffer_size=6, min_count=3, advantage_clip=1.5), PerPromptStats(6, 3, 1.5)
    weights = torch.ones(1)
    differs = False
    for it, batch in enumerate(batches):
        outs = procs.run(lambda rank, gather: estimators[rank](batch[rank][1][:, None], torch.zeros(6, K, 1),
                                                                 batch[rank][0], weights, gather=gather))
        prompts = batch[0][0] + batch[1][0]
        whole = single(torch.cat([batch[0][1], batch[1][1]])[:, None], torch.zeros(12, K, 1), prompts, weights)
        torch.testing.assert_close(torch.cat([o.advantages for o in outs]), whole.advantages, rtol=0, atol=0)
        assert estimators[0].state_dict() == estimators[1].state_dict() == single.state_dict()
        local = alone(batch[0][1][:, None], torch.zeros(6, K, 1), batch[0][0], weights)
        differs |= bool((local.advantages - outs[0].advantages).abs().max() > 1e-3)
    assert differs
    assert procs.calls == 3 * len(batches)  # per iteration: prompt lengths, prompt bytes, rewards


def test_per_prompt_stats_resume_exactly_and_weights_only(tmp_path):
    g = torch.Generator().manual_seed(4)
    est = PerPromptStats(buffer_size=4, min_count=2)
    batches = [draw(g, 6) for _ in range(4)]
    for prompts, rewards in batches[:2]:
        est(rewards[:, None], torch.zeros(6, K, 1), prompts, torch.ones(1))
    torch.save(est.state_dict(), tmp_path / "state.pt")
    resumed = PerPromptStats(buffer_size=4, min_count=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.state_dict() == est.state_dict()
    for prompts, rewards in batches[2:]:
        a = est(rewards[:, None], torch.zeros(6, K, 1), prompts, torch.ones(1))
        b = resumed(rewards[:, None], torch.zeros(6, K, 1), prompts, torch.ones(1))
        assert torch.equal(a.advantages, b.advantages)
    assert resumed.state_dict() == est.state_dict() and resumed.trackers[0] is resumed.tracker


def test_per_prompt_stats_refuses_buffers_of_another_normalisation_and_resets_old_ones():
    est = PerPromptStats(buffer_size=4, min_count=2)
    est(torch.tensor([[1.0], [2.0]]), torch.zeros(2, K, 1), ["a", "a"], torch.ones(1))
    with pytest.raises(ValueError, match="reward_normalization='none'"):
        PerPromptStats(buffer_size=4, min_count=2, reward_normalization="running").load_state_dict(est.state_dict())
    legacy = {"trackers": [{"buffers": {"a": [0.1, -0.2]}}]}  # before issue 16: running-normalised by default
    old_behaviour = PerPromptStats(buffer_size=4, min_count=2, reward_normalization="running")
    old_behaviour.load_state_dict(legacy)
    assert old_behaviour.tracker.buffers == {"a": [0.1, -0.2]}
    fresh = PerPromptStats(buffer_size=4, min_count=2)
    with pytest.warns(UserWarning, match="start empty"):
        fresh.load_state_dict(legacy)
    assert fresh.tracker.buffers == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PerPromptStats().load_state_dict({"trackers": []})  # an estimator that never ran: nothing to warn about


def test_per_prompt_stats_validation():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStats(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="advantage_clip"):
        PerPromptStats(advantage_clip=0.0)
    with pytest.raises(ValueError, match="rewards \\[B\\] for B prompts"):
        PerPromptStatTracker(4, 2).update(["a"], torch.zeros(2))


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from lit_diffac.estimators import PerPromptStats
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    def gather(x):
        out = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)
    g = torch.Generator().manual_seed(10 + rank)
    est, results = PerPromptStats(buffer_size=4, min_count=2), []
    for it in range(3):
        prompts = [["the digit 1", "ünïcode 2", "7"][i] for i in torch.randint(3, (4,), generator=g).tolist()]
        rewards = torch.randn(4, generator=g)
        out = est(rewards[:, None], torch.zeros(4, 2, 1), prompts, torch.ones(1), gather=gather)
        results.append((prompts, rewards, out.advantages))
    torch.save({"results": results, "state": est.state_dict()}, store + f".rank{rank}")
    dist.destroy_process_group()
""")


def test_per_prompt_stats_over_two_real_processes(tmp_path):
    """gloo ``all_gather`` of the prompts' bytes and lengths and of the rewards: the one-process result."""
    store = tmp_path / "store"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("LOCAL_RANK", None)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(store)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    for p in procs:
        output = p.communicate(timeout=120)[0]
        assert p.returncode == 0, output.decode()[-2000:]
    ranks = [torch.load(f"{store}.rank{r}", weights_only=False) for r in (0, 1)]
    single = PerPromptStats(buffer_size=4, min_count=2)
    for it in range(3):
        (p0, r0, a0), (p1, r1, a1) = ranks[0]["results"][it], ranks[1]["results"][it]
        whole = single(torch.cat([r0, r1])[:, None], torch.zeros(8, 2, 1), p0 + p1, torch.ones(1))
        assert torch.equal(torch.cat([a0, a1]), whole.advantages)
    assert ranks[0]["state"] == ranks[1]["state"] == single.state_dict()


# ---------------------------------------------------------------------------------------------------------
# 2. GRPO: flow_grpo's group statistics
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_std", [False, True])
def test_group_relative_equals_flow_grpo_tracker(global_std):
    """Population std (np.std, ddof 0), ε = 1e-4; std per group (default) or of the whole batch."""
    g = torch.Generator().manual_seed(5)
    prompts = [p for p in "abcdef" for _ in range(4)]  # six groups of G = 4
    rewards = (3.0 + 2.0 * torch.randn(24, generator=g)).double()
    rewards[8:12] = 1.5  # a group with equal rewards: advantage 0
    est = GroupRelative(std="global" if global_std else "group", advantage_clip=5.0)
    out = est(rewards[:, None].float(), torch.zeros(24, K, 1), prompts, torch.ones(1))
    want = flow_grpo_advantages(prompts, rewards.numpy(), global_std)
    np.testing.assert_allclose(out.advantages[:, 0].numpy(), np.clip(want, -5, 5), rtol=1e-5, atol=1e-5)
    assert (out.advantages[8:12] == 0).all()
    if not global_std:  # Bessel's correction (torch's default std) would differ by √(G/(G−1)) ≈ 1.15
        bessel = torch.cat([(rewards[i:i + 4] - rewards[i:i + 4].mean()) / (rewards[i:i + 4].std() + 1e-4)
                            for i in range(0, 24, 4)])
        assert not np.allclose(bessel.numpy(), want, rtol=1e-3, atol=1e-3)


def test_group_relative_global_std_is_gathered_across_processes():
    g = torch.Generator().manual_seed(6)
    prompts = [[p for p in "ab" for _ in range(3)], [p for p in "cd" for _ in range(3)]]
    rewards = [torch.randn(6, generator=g), 5.0 * torch.randn(6, generator=g)]
    outs = FakeProcesses(2).run(lambda rank, gather: GroupRelative(std="global")(
        rewards[rank][:, None], torch.zeros(6, K, 1), prompts[rank], torch.ones(1), gather=gather))
    want = flow_grpo_advantages(prompts[0] + prompts[1], torch.cat(rewards).double().numpy(), global_std=True)
    np.testing.assert_allclose(torch.cat([o.advantages[:, 0] for o in outs]).numpy(), want, rtol=1e-5, atol=1e-5)


def test_group_relative_validation():
    with pytest.raises(ValueError, match="std must be 'group' or 'global'"):
        GroupRelative(std="batch")


# ---------------------------------------------------------------------------------------------------------
# 3. The KL to the reference: exact vs flow_grpo's form
# ---------------------------------------------------------------------------------------------------------
def flow_grpo_step(model_output, sample, sigma, sigma_prev, sigma_max, noise_level):
    """flow_grpo's ``sde_step_with_logprob`` (``diffusers_patch/sd3_sde_with_logprob.py``): mean and std_dev_t."""
    sigma, sigma_prev = sigma.view(-1, 1, 1, 1), sigma_prev.view(-1, 1, 1, 1)
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) \
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return prev_sample_mean, std_dev_t


def test_flow_grpo_kl_is_flow_grpo_term_and_exact_kl_times_dt():
    """On SD3's shift-3 schedule, 10 steps, a = 0.7: ``reference_kl(..., "flow_grpo", dt)`` is flow_grpo's
    ``((μ − μ_ref)² ).mean(dim=(1,2,3), keepdim=True) / (2 std_dev_t²)`` and the exact KL times ``|dt|``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lit_diffac.samplers import FlowSDESampler

    sampler = FlowSDESampler(num_steps=10, noise_level=0.7)
    sampler.setup(FlowMatchEulerDiscreteScheduler(shift=3.0))
    sigmas = sampler.sigmas
    g = torch.Generator().manual_seed(7)
    k = torch.arange(10)
    x = torch.randn(10, 4, 8, 8, generator=g)
    v, v_ref = torch.randn(10, 4, 8, 8, generator=g), torch.randn(10, 4, 8, 8, generator=g)
    step, ref = sampler.step(v, k, x), sampler.step(v_ref, k, x)
    dt = sigmas[k + 1] - sigmas[k]

    mean, std_dev_t = flow_grpo_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], 0.7)
    mean_ref, _ = flow_grpo_step(v_ref, x, sigmas[k], sigmas[k + 1], sigmas[1], 0.7)
    torch.testing.assert_close(step.mean, mean)  # the same SDE step (DESIGN §2)
    theirs = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)

    got = reference_kl(step.mean, ref.mean, step.std, "flow_grpo", dt=dt)
    torch.testing.assert_close(got, theirs.flatten(), rtol=1e-5, atol=0)
    torch.testing.assert_close(flow_grpo_kl(step.mean, ref.mean, std_dev_t.flatten()), theirs.flatten())
    exact = reference_kl(step.mean, ref.mean, step.std)
    torch.testing.assert_close(exact, gaussian_kl(step.mean, ref.mean, step.std))
    torch.testing.assert_close(got, exact * -dt, rtol=1e-5, atol=0)
    ratio = exact / got  # 1/|dt|: 3.7 … 112 on this schedule
    assert 3.5 < ratio.min() < 4.0 and 100 < ratio.max() < 120
    assert abs(float((-dt).sum()) - 1.0) < 1e-6  # Σ|dt| = 1: the mean factor over the chain is 1/K
    # the mean over the batch, as flow_grpo's torch.mean(kl_loss) and our minibatch loss take it
    torch.testing.assert_close(got.mean(), torch.mean(theirs))


def test_reference_kl_validation():
    mean, std = torch.zeros(2, 3), torch.ones(2)
    assert KL_FORMS == ("exact", "flow_grpo")
    with pytest.raises(ValueError, match="form must be one of"):
        reference_kl(mean, mean, std, "flowgrpo")
    with pytest.raises(ValueError, match="needs the steps' dt"):
        reference_kl(mean, mean, std, "flow_grpo")
    with pytest.raises(ValueError, match="must be < 0"):
        reference_kl(mean, mean, std, "flow_grpo", dt=torch.tensor([-0.1, 0.0]))
    with pytest.raises(ValueError, match="dt must have shape"):
        reference_kl(mean, mean, std, "flow_grpo", dt=torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="diffusion_std must have shape"):
        flow_grpo_kl(mean, mean, torch.ones(3))
