"""Fault handling: non-finite iterations are skipped with weights untouched; SIGTERM saves a resumable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.errors import TrainingHalted
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.faults import GracefulStop, NonFiniteGuard, NonFiniteUpdate, TrainableSnapshot, nonfinite_inputs
from lit_diffac.modules import LatentActorCritic
from lit_diffac.rewards.base import CallableReward
from lit_diffac.samplers import FlowSDESampler

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from helpers_faults import write_tiny_recipe  # noqa: E402
REPO = TESTS_DIR.parent


def nan_at(iteration: int, samples=slice(1, 2)):
    """Brightness, NaN for ``samples`` of training iteration ``iteration`` (training calls have 4 images)."""
    calls = {"n": 0}

    def reward(images, prompts, **_):
        out = images.mean(dim=(1, 2, 3))
        if len(prompts) == 4:
            if calls["n"] == iteration:
                out[samples] = float("nan")
            calls["n"] += 1
        return out
    return reward


def make(pipeline, reward, **kw):
    L.seed_everything(0)
    return LatentActorCritic(backbone=DiTBackbone(str(pipeline)), rewards=[CallableReward(reward, name="r")],
                             sampler=FlowSDESampler(num_steps=4), batch_size=4, minibatch_size=8,
                             evaluation=HeldOutEvaluation(samples_per_prompt=1,
                                                          prompts=["the digit 1", "the number two"]),
                             train_prompts=["a 1", "a 2"], clip_range=1e-2, actor_lr=1e-3, **kw)


class StateLog(Callback):
    """Weights and optimiser states at the start and end of every iteration, and the logged metrics."""

    def __init__(self) -> None:
        self.start, self.end, self.metrics = [], [], []

    @staticmethod
    def _state(module):
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        opts = [{i: {k: t.clone() for k, t in s.items()} for i, s in o.state_dict()["state"].items()}
                for o in module.trainer.optimizers]
        return weights, opts

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start.append(self._state(module))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.end.append(self._state(module))
        self.metrics.append(dict(module.last_metrics))


def same(a, b) -> bool:
    (wa, oa), (wb, ob) = a, b
    return all(torch.equal(wa[k], wb[k]) for k in wa) and all(
        torch.equal(x[i][k], y[i][k]) for x, y in zip(oa, ob) for i in x for k in x[i])


def trainer_for(tmp_path, epochs, *callbacks):
    return L.Trainer(max_epochs=epochs, logger=False, accelerator="cpu", enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks])


def test_nan_reward_skips_the_iteration_and_the_run_goes_on(toy_pipelines, tmp_path, capsys):
    module = make(toy_pipelines["dit"], nan_at(1, samples=slice(None)))
    log = StateLog()
    trainer_for(tmp_path, 3, log).fit(module)
    assert same(log.start[1], log.end[1])          # iteration 1 (every reward NaN): weights and Adam state untouched
    assert not same(log.start[0], log.end[0]) and not same(log.start[2], log.end[2])  # the others update
    assert [m["fault/skipped"] for m in log.metrics] == [0.0, 1.0, 0.0]
    assert log.metrics[-1]["fault/skipped_iterations"] == 1.0
    assert module.reward_normalizer.stats.count.item() == 8  # the NaN batch never reached the statistics
    assert (module.faults.skipped_iterations, module.faults.consecutive_bad, module.faults.halt_reason) == (1, 0, None)
    assert "[iteration 1] update skipped, weights unchanged: reward 'r' is not finite for 4/4 samples" \
        in capsys.readouterr().out


def test_nan_reward_for_some_samples_drops_their_trajectories(toy_pipelines, tmp_path, capsys):
    module = make(toy_pipelines["dit"], nan_at(1))
    log = StateLog()
    seen = []
    original = module.update
    module.update = lambda rollout, *opts: seen.append(rollout.batch_size) or original(rollout, *opts)
    trainer_for(tmp_path, 3, log).fit(module)
    assert seen == [4, 3, 4]                          # the NaN sample's trajectory left iteration 1's update
    assert not same(log.start[1], log.end[1])         # which still trained on the other three
    assert [m["fault/dropped_samples"] for m in log.metrics] == [0.0, 1.0, 0.0]
    assert [m["fault/skipped"] for m in log.metrics] == [0.0, 0.0, 0.0]
    assert module.reward_normalizer.stats.count.item() == 11
    assert "[iteration 1] dropped 1/4 trajectories from the update: reward 'r' is not finite for them" \
        in capsys.readouterr().out


def test_rollout_select_cuts_every_field():
    from lit_diffac.backbones.base import PromptEmbeds
    from lit_diffac.rollout import Rollout

    r = Rollout(prompts=["a", "b", "c"], embeds=PromptEmbeds(hidden=torch.arange(6.).view(3, 2, 1),
                                                              pooled=torch.arange(3.)[:, None]),
                latents=torch.arange(3.).view(3, 1, 1, 1, 1).expand(3, 5, 1, 1, 1), log_probs=torch.arange(12.).view(3, 4),
                values=torch.zeros(3, 4, 1), images=torch.arange(3.).view(3, 1, 1, 1), rewards=torch.arange(3.)[:, None],
                features=[torch.arange(3.).view(3, 1)])
    s = r.select(torch.tensor([True, False, True]))
    assert s.prompts == ["a", "c"] and s.batch_size == 2 and s.num_steps == 4
    for tensor in (s.embeds.pooled, s.latents[:, 0], s.images, s.rewards, s.features[0]):
        assert tensor.flatten().tolist() == [0.0, 2.0]
    assert s.log_probs.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]


@pytest.mark.parametrize("rollback", [True, False])
def test_nonfinite_loss_mid_update_rolls_the_whole_iteration_back(toy_pipelines, tmp_path, rollback):
    module = make(toy_pipelines["dit"], nan_at(-1), faults=NonFiniteGuard(rollback=rollback))
    log = StateLog()
    original = module.forward_step
    calls = {"n": 0}

    def second_minibatch_nan(*args, **kwargs):  # the first minibatch steps, the second has a NaN log-prob
        log_prob, values, kl = original(*args, **kwargs)
        calls["n"] += 1
        return (log_prob * float("nan"), values, kl) if calls["n"] == 2 else (log_prob, values, kl)

    module.forward_step = second_minibatch_nan
    trainer_for(tmp_path, 1, log).fit(module)
    assert calls["n"] == 2                         # the update stopped at the bad minibatch...
    assert log.metrics[0]["fault/skipped"] == 1.0
    if rollback:                                   # ...and the first minibatch's step was undone
        assert same(log.start[0], log.end[0])
        assert module.reward_normalizer.stats.count.item() == 0
    else:                                          # without the copy, only the rest of the update is skipped
        assert not same(log.start[0], log.end[0])


def test_consecutive_bad_iterations_stop_with_a_checkpoint(toy_pipelines, tmp_path):
    module = make(toy_pipelines["dit"], lambda images, prompts, **_: torch.full((len(prompts),), float("nan")),
                  faults=NonFiniteGuard(max_bad_iterations=2))
    assert any(isinstance(c, GracefulStop) and c.guard is module.faults for c in module.configure_callbacks())
    with pytest.raises(TrainingHalted, match=r"2 consecutive iterations had non-finite values .*reward 'r' is not "
                                             r"finite for 4/4 samples.*saved a resumable checkpoint to .*last.ckpt"):
        trainer_for(tmp_path, 5).fit(module)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["lit_diffac"]["skipped_iterations"] == 2
    assert module.faults.skipped_iterations == 2 and "2 consecutive iterations" in module.faults.halt_reason


def test_nonfinite_inputs_and_snapshot_units():
    assert nonfinite_inputs(torch.ones(2, 1), torch.zeros(2, 3), None, ["a"]) is None
    message = nonfinite_inputs(torch.tensor([[1.0], [float("inf")]]), torch.tensor([[float("nan"), 0.0]]),
                               torch.zeros(1, 2, 1), ["a"])
    assert message == "reward 'a' is not finite for 1/2 samples; log-prob is not finite for 1/2 entries"
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    before = [p.clone() for p in layer.parameters()], {k: v.clone() for k, v in opt.state[layer.weight].items()}
    snapshot = TrainableSnapshot(layer.parameters(), [opt])
    layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    snapshot.restore()
    assert all(torch.equal(a, b) for a, b in zip(before[0], layer.parameters()))
    assert all(torch.equal(before[1][k], opt.state[layer.weight][k]) for k in before[1])
    assert issubclass(NonFiniteUpdate, Exception)


def test_max_bad_iterations_is_validated():
    with pytest.raises(ValueError, match=r"max_bad_iterations must be >= 1 \(got 0\)"):
        NonFiniteGuard(max_bad_iterations=0)


def test_guard_counts_skips_rolls_back_and_halts():
    """:meth:`NonFiniteGuard.run` on its own: skip before the update, roll back mid-update, halt, and its state."""
    guard = NonFiniteGuard(max_bad_iterations=2)
    layer = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    ran, messages = [], []

    def update_then_fail():
        ran.append(True)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        raise NonFiniteUpdate("loss is not finite (inner epoch 0, minibatch 1)")

    run = dict(snapshot=lambda: TrainableSnapshot(layer.parameters(), []), everywhere=lambda ok: ok,
               log=messages.append)
    assert guard.run(lambda: {"x": 1.0}, None, iteration=0, **run) == \
        {"x": 1.0, "fault/skipped": 0.0, "fault/skipped_iterations": 0.0}
    out = guard.run(lambda: ran.append(True), "reward 'r' is not finite for 1/4 samples", iteration=1, **run)
    assert out == {"fault/skipped": 1.0, "fault/skipped_iterations": 1.0} and not ran  # skipped before it starts
    assert guard.consecutive_bad == 1 and guard.halt_reason is None
    out = guard.run(update_then_fail, None, iteration=2, **run)
    assert ran and out["fault/skipped_iterations"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # rolled back
    assert messages[-1].startswith("[iteration 2] update skipped, weights unchanged: loss is not finite")
    assert guard.halt_reason.startswith("2 consecutive iterations had non-finite values (last, iteration 2: loss")
    assert guard.state_dict() == {"skipped_iterations": 2, "consecutive_bad": 0}
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
    # another process's bad inputs skip this one too
    assert guard.run(lambda: {"x": 1.0}, None, iteration=3, **{**run, "everywhere": lambda ok: False}) == \
        {"fault/skipped": 1.0, "fault/skipped_iterations": 3.0}
    assert "another process had non-finite" in messages[-1]


# ------------------------------------------------------------------------------------- SIGTERM, end to end

def run_cli(cwd: Path, args: list[str], sigterm_at: int | None = None,
            signal_name: str = "SIGTERM") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "LIT_DIFFAC_TEST_SIGNAL": signal_name}
    env.pop("LIT_DIFFAC_TEST_SIGTERM_AT", None)
    if sigterm_at is not None:
        env["LIT_DIFFAC_TEST_SIGTERM_AT"] = str(sigterm_at)
    return subprocess.run([sys.executable, "-m", "lit_diffac", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_sigterm_mid_run_saves_a_checkpoint_that_resumes_to_the_same_result(toy_pipelines, tmp_path, monkeypatch,
                                                                            capsys):
    from lit_diffac.cli import main

    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.delenv("LIT_DIFFAC_TEST_SIGTERM_AT", raising=False)
    recipe = write_tiny_recipe(tmp_path, toy_pipelines)
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    monkeypatch.chdir(whole)
    assert main(["run", str(recipe)]) == 0  # the uninterrupted reference, in this process (1 thread, as below)

    killed = run_cli(split, ["run", str(recipe)], sigterm_at=1)  # a process: SIGTERM while scoring iteration 1
    ckpt = split / "runs" / "tiny_rl" / "version_0" / "checkpoints" / "last.ckpt"
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert f"[SIGTERM] saved a resumable checkpoint to {ckpt.resolve()}" in killed.stderr
    assert not (split / "runs" / "tiny_rl" / "version_0" / "summary.json").exists()  # it did stop early
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # iteration 1 was finished, then saved

    monkeypatch.chdir(split)
    capsys.readouterr()
    assert main(["run", str(recipe), "--ckpt_path", "last"]) == 0
    assert f"resume: continuing {ckpt.resolve()}" in capsys.readouterr().err
    assert not (split / "runs" / "tiny_rl" / "version_1").exists()  # same run folder, logs continue
    a, b = (json.loads((d / "runs" / "tiny_rl" / "version_0" / "summary.json").read_text()) for d in (whole, split))
    for key in ("iterations", "samples_seen", "base", "final", "final_train", "eval_history"):
        assert a[key] == b[key], key
    wa, wb = (torch.load(d / "runs" / "tiny_rl" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
              for d in (whole, split))
    assert wa["epoch"] == wb["epoch"] == 4  # last.ckpt: the final state, saved when training ended
    assert not list((split / "runs" / "tiny_rl" / "version_0" / "checkpoints").glob("last-v*.ckpt"))
    assert b["checkpoint"] == str((split / "runs" / "tiny_rl" / "version_0" / "checkpoints" / "last.ckpt").resolve())
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])


def test_ctrl_c_mid_run_saves_a_checkpoint(toy_pipelines, tmp_path):
    recipe = write_tiny_recipe(tmp_path, toy_pipelines)
    killed = run_cli(tmp_path, ["run", str(recipe)], sigterm_at=0, signal_name="SIGINT")
    ckpt = tmp_path / "runs" / "tiny_rl" / "version_0" / "checkpoints" / "last.ckpt"
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "[SIGINT] stopping after this iteration to write a resumable checkpoint (Ctrl-C again quits now" \
        in killed.stderr
    assert f"[SIGINT] saved a resumable checkpoint to {ckpt.resolve()}" in killed.stderr
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0


def raises_at(iteration: int):
    """Brightness that raises on training call ``iteration`` (a scorer bug or a failed remote call)."""
    calls = {"n": 0}

    def reward(images, prompts, **_):
        if len(prompts) == 4:
            calls["n"] += 1
            if calls["n"] - 1 == iteration:
                raise ValueError("scorer fell over\nsecond line of the message")
        return images.mean(dim=(1, 2, 3))
    return reward


def test_a_reward_that_raises_stops_with_a_checkpoint_of_the_iterations_before(toy_pipelines, tmp_path):
    module = make(toy_pipelines["dit"], raises_at(1))
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    weights_after_0 = {}

    class Keep(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                weights_after_0.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Keep())
    with pytest.raises(TrainingHalted, match=r"iteration 1: scoring raised ValueError: scorer fell over; fix it, "
                                             r"then resume; saved a resumable checkpoint to .*last\.ckpt"):
        trainer.fit(module)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["lit_diffac"]["samples_seen"] == 8 and saved["lit_diffac"]["skipped_iterations"] == 1
    assert any(k.startswith("value_head.") for k in saved["state_dict"])  # the trained tensors, as after iteration 0:
    assert all(torch.equal(v, weights_after_0[k]) for k, v in saved["state_dict"].items())  # iteration 1 skipped


def test_last_ckpt_is_written_every_n_minutes(toy_pipelines, tmp_path, monkeypatch):
    import lit_diffac.faults as faults

    clock = {"t": 1000.0}
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock["t"])

    class Tick(Callback):  # each iteration takes 20 "minutes"
        def on_train_epoch_start(self, trainer, pl_module):
            clock["t"] += 20 * 60

    saved_epochs = []
    real_save = L.Trainer.save_checkpoint

    def save(self, path, *args, **kwargs):
        saved_epochs.append((Path(path).name, self.current_epoch))
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save)
    module = make(toy_pipelines["dit"], nan_at(-1))
    L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
              callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=100), Tick()]).fit(module)
    # 30-minute period, 20-minute iterations: after iterations 1 and 3 (40 and 80 minutes), then the final state
    # (written by ModelCheckpoint's own end-of-training save too); never a versioned last-v1.ckpt
    assert saved_epochs[:2] == [("last.ckpt", 1), ("last.ckpt", 3)]
    assert set(saved_epochs[2:]) == {("last.ckpt", 4)}
    assert sorted(p.name for p in tmp_path.glob("last*.ckpt")) == ["last.ckpt"]


def test_save_last_link_ends_with_a_final_last_ckpt_and_leaves_the_periodic_one_alone(toy_pipelines, tmp_path):
    """``save_last="link"``: during the run last.ckpt links to the newest periodic checkpoint (no second copy);
    at the end GracefulStop writes the final state as a file in its place (the checkpoint IO replaces the link;
    it does not write through it)."""
    import torch

    module = make(toy_pipelines["dit"], nan_at(-1))
    L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
              callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last="link", every_n_epochs=2)]).fit(module)
    last, periodic = tmp_path / "last.ckpt", next(tmp_path.glob("epoch=1*.ckpt"))
    assert last.is_file() and not last.is_symlink()
    assert torch.load(last, weights_only=False)["epoch"] == 3  # the final state, after 3 iterations
    assert torch.load(periodic, weights_only=False)["epoch"] == 1  # the iteration-2 checkpoint, unchanged
