"""Mutation check: plant one-line bugs in the training step and check that the behaviour tests kill them.

    python -m benchmarks.mutants [--list | --check] [--stop] [--each] [NAME ...]

Each entry of :data:`MUTANTS` names a file, an exact original substring (found exactly once in that file; it
may span a few lines to be unique, but only one line changes), its replacement and the test node ids expected
to kill it.  The repository's tracked and untracked (not ignored) files are copied once to a temporary
directory; each mutant is applied there, the named tests run with ``pytest -x -q -p no:cacheprovider``, and
the file is restored (``--each``: every named test runs on its own and must fail).  The working tree is
never modified.  Before the mutants, the union of the named tests
runs on the unmodified copy and must pass.

``--list`` prints the table (and whether each original substring is still found exactly once) and exits 0;
``--check`` does the same but exits 1 when a substring is missing, without running any test.  A full run
exits 1 if any mutant survives, any substring is missing, the baseline fails, or a mutant breaks the run
otherwise (pytest errors other than failing tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEHAVIOUR = "tests/test_training_behaviour.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    description: str


def _t(*names: str) -> tuple[str, ...]:
    """Node ids: bare names are tests of the behaviour file; ``path::name`` ids pass through."""
    return tuple(n if "::" in n else f"{BEHAVIOUR}::{n}" for n in names)


AC = "lit_diffac/modules/actor_critic.py"
PPO = "lit_diffac/ppo.py"
EST = "lit_diffac/estimators.py"

MUTANTS: list[Mutant] = [
    # --- the module's update -------------------------------------------------------------------------------
    Mutant("policy_loss_sign", PPO,
        "loss = policy.loss if train_actor else",
        "loss = -policy.loss if train_actor else",
        _t("test_actor_step_moves_log_probs_along_the_advantages",
           "test_one_large_advantage_moves_its_own_log_prob",
           "test_policy_gradient_is_that_of_the_planted_pair"),
        "the module minimises +A·ρ (sign of the policy loss flipped)"),
    Mutant("advantage_next_step", AC,
        "est.advantages[i, k], hp.clip_range,",
        "est.advantages[i, (k + 1) % rollout.num_steps], hp.clip_range,",
        _t("test_policy_gradient_is_that_of_the_planted_pair"),
        "pair (i, k) gets the advantage of step k+1"),
    Mutant("advantage_other_sample", AC,
        "est.advantages[i, k], hp.clip_range,",
        "est.advantages[(i + 1) % rollout.batch_size, k], hp.clip_range,",
        _t("test_policy_gradient_is_that_of_the_planted_pair"),
        "pair (i, k) gets the advantage of sample i+1"),
    Mutant("advantage_transposed", AC,
        "est.advantages[i, k], hp.clip_range,",
        "est.advantages[k, i], hp.clip_range,",
        _t("test_policy_gradient_is_that_of_the_planted_pair"),
        "advantages indexed [k, i] (runs silently when B = K)"),
    Mutant("old_log_prob_next_step", AC,
        "rollout.log_probs[i, k], est.advantages",
        "rollout.log_probs[i, (k + 1) % rollout.num_steps], est.advantages",
        _t("test_policy_gradient_is_that_of_the_planted_pair"),
        "the ratio uses log π_old of the next step"),
    Mutant("value_time_next_step", AC,
        "values = self.value_head(features, self.sampler.timestep_fraction(step_index).to(self.device),",
        "values = self.value_head(features, self.sampler.timestep_fraction((step_index + 1) % "
        "self.sampler.num_steps).to(self.device),",
        _t("test_recomputed_values_equal_the_rollout_values",
           "test_value_gradient_is_that_of_the_planted_target"),
        "the value head is told the next step's time"),
    Mutant("value_from_next_latents", AC,
        "values = self.value_head(features, self.sampler.timestep_fraction(step_index).to(self.device),",
        "values = self.value_head(denoise(self.backbone, next_latents, t, embeds)[1], "
        "self.sampler.timestep_fraction(step_index).to(self.device),",
        _t("test_recomputed_values_equal_the_rollout_values",
           "test_value_gradient_is_that_of_the_planted_target"),
        "the value is read from the features of x_{k+1}, not x_k"),
    Mutant("old_values_next_step", AC,
        "rollout.values[i, k], hp.value_clip_range,",
        "rollout.values[i, (k + 1) % rollout.num_steps], hp.value_clip_range,",
        _t("test_recomputed_values_equal_the_rollout_values"),
        "the value clip is centred on the next step's stored value"),
    Mutant("targets_next_step", AC,
        "est.targets[i, k] if values is not None",
        "est.targets[i, (k + 1) % rollout.num_steps] if values is not None",
        _t("test_value_gradient_is_that_of_the_planted_target"),
        "pair (i, k) regresses on the target of step k+1"),
    Mutant("value_loss_sign", PPO,
        "loss = loss + value.loss",
        "loss = loss - value.loss",
        _t("test_value_gradient_is_that_of_the_planted_target"),
        "the critic ascends its loss"),
    Mutant("critic_owns_backbone", AC,
        "return [*self.value_head.parameters(), *self.backbone.critic_parameters()]",
        "return [*self.value_head.parameters(), *self.backbone.critic_parameters(), "
        "*self.backbone.policy_parameters()]",
        _t("test_detached_critic_leaves_the_policy_alone"),
        "the critic optimiser also steps the policy parameters"),
    Mutant("features_not_detached", AC,
        "self.value_head.detach_features = value_gradient == \"detached\"",
        "self.value_head.detach_features = value_gradient != \"detached\"",
        _t("test_detached_critic_leaves_the_policy_alone"),
        "value_gradient='detached' lets the value loss reach the backbone"),
    Mutant("kl_sign", PPO,
        "loss = loss + kl_coef * kl.mean()",
        "loss = loss - kl_coef * kl.mean()",
        _t("test_kl_term_pulls_the_policy_toward_the_reference"),
        "the KL penalty pushes away from the reference"),
    Mutant("kl_reference_adapter_on", "lit_diffac/backbones/base.py",
        "self.denoiser.disable_adapters()",
        "self.denoiser.enable_adapters()",
        _t("test_module_kl_is_the_gaussian_kl_of_policy_and_reference_steps"),
        "the reference is the policy itself (adapter left on): KL always 0"),
    Mutant("kl_std_sqrt", AC,
        "kl = reference_kl(step.mean, ref_mean, step.std, self.hparams.kl_form, dt=dt)",
        "kl = reference_kl(step.mean, ref_mean, step.std.sqrt(), self.hparams.kl_form, dt=dt)",
        _t("test_module_kl_is_the_gaussian_kl_of_policy_and_reference_steps"),
        "the module passes √σ as the step's std"),
    Mutant("rollout_value_time_next_step", "lit_diffac/rollout.py",
        "values.append(value_head(features, sampler.timestep_fraction(index).to(device), embeds.pooled,",
        "values.append(value_head(features, sampler.timestep_fraction((index + 1) % "
        "sampler.num_steps).to(device), embeds.pooled,",
        _t("test_recomputed_values_equal_the_rollout_values"),
        "the rollout stores values computed with the next step's time"),
    # --- estimators ----------------------------------------------------------------------------------------
    Mutant("whitening_dropped", EST,
        "whitened = torch.stack([whiten(per_reward[..., i], gather=gather) for i in "
        "range(per_reward.shape[-1])], -1)",
        "whitened = per_reward.float()",
        _t("test_combine_gives_rewards_on_different_scales_equal_influence"),
        "combine() sums raw per-reward advantages (no whitening)"),
    Mutant("whitening_joint", EST,
        "whitened = torch.stack([whiten(per_reward[..., i], gather=gather) for i in "
        "range(per_reward.shape[-1])], -1)",
        "whitened = whiten(per_reward, gather=gather)",
        _t("test_combine_gives_rewards_on_different_scales_equal_influence"),
        "combine() whitens all rewards together, not each one"),
    Mutant("reward_weights_ignored", EST,
        "return clip_advantages((whitened * weights.to(whitened)).sum(-1), self.advantage_clip)",
        "return clip_advantages(whitened.sum(-1), self.advantage_clip)",
        _t("test_combine_gives_rewards_on_different_scales_equal_influence"),
        "combine() ignores the reward weights"),
    Mutant("whitening_local_only", EST,
        "whitened = torch.stack([whiten(per_reward[..., i], gather=gather) for i in "
        "range(per_reward.shape[-1])], -1)",
        "whitened = torch.stack([whiten(per_reward[..., i]) for i in range(per_reward.shape[-1])], -1)",
        _t("test_combine_whitens_with_the_gathered_statistics"),
        "combine() whitens with this process's statistics only (gather dropped)"),
    Mutant("gae_gamma_lam_swapped", EST,
        "compute_gae(terminal_rewards(rewards, num_steps), values, self.gamma, self.lam)",
        "compute_gae(terminal_rewards(rewards, num_steps), values, self.lam, self.gamma)",
        _t("test_critic_gae_uses_gamma_and_lambda"),
        "CriticGAE passes λ as γ and γ as λ (invisible at γ = λ = 1)"),
    Mutant("critic_advantage_clip_dropped", EST,
        "return clip_advantages((whitened * weights.to(whitened)).sum(-1), self.advantage_clip)",
        "return (whitened * weights.to(whitened)).sum(-1)",
        _t("test_critic_gae_clips_advantages_and_targets"),
        "CriticGAE / combine() advantage clip dropped"),
    Mutant("target_clip_dropped", EST,
        "targets=clip_advantages(targets, self.target_clip)",
        "targets=targets",
        _t("test_critic_gae_clips_advantages_and_targets"),
        "CriticGAE value-target clip dropped"),
    Mutant("grpo_advantage_clip_dropped", EST,
        "self.eps)[:, None].expand(-1, values.shape[1], -1)\n"
        "        combined = clip_advantages((per_reward * weights.to(per_reward)).sum(-1), "
        "self.advantage_clip)",
        "self.eps)[:, None].expand(-1, values.shape[1], -1)\n"
        "        combined = (per_reward * weights.to(per_reward)).sum(-1)",
        _t("test_group_relative_clips_advantages_and_ranks_within_groups"),
        "GroupRelative (GRPO) advantage clip dropped"),
    Mutant("ddpo_advantage_clip_dropped", EST,
        "per_reward = advantage[:, None, None].expand(-1, values.shape[1], 1)\n"
        "        combined = clip_advantages(per_reward[..., 0], self.advantage_clip)",
        "per_reward = advantage[:, None, None].expand(-1, values.shape[1], 1)\n"
        "        combined = per_reward[..., 0]",
        _t("test_per_prompt_stats_clips_advantages"),
        "PerPromptStats (DDPO) advantage clip dropped"),
    Mutant("grpo_advantage_sign", EST,
        "out[members] = (r - r.mean(0))",
        "out[members] = (r.mean(0) - r)",
        _t("test_group_relative_clips_advantages_and_ranks_within_groups",
           "tests/test_estimators.py::test_group_relative_equals_hand_computation"),
        "GRPO reinforces the worse samples of each group"),
    Mutant("gae_value_sign", "lit_diffac/advantages.py",
        "delta = rewards[:, k] + gamma * next_values - values[:, k]",
        "delta = rewards[:, k] + gamma * next_values + values[:, k]",
        _t("test_combine_gives_rewards_on_different_scales_equal_influence",
           "tests/test_advantages.py::test_compute_gae_terminal_reward_gamma_lambda_one"),
        "GAE adds V_k instead of subtracting it"),
    # --- losses --------------------------------------------------------------------------------------------
    Mutant("kl_std_unsquared", "lit_diffac/losses.py",
        "var = std.view(-1, *([1] * (mean.ndim - 1))) ** 2",
        "var = std.view(-1, *([1] * (mean.ndim - 1)))",
        _t("test_gaussian_kl_is_the_closed_form_kl",
           "test_module_kl_is_the_gaussian_kl_of_policy_and_reference_steps"),
        "gaussian_kl divides by 2σ instead of 2σ²"),
    Mutant("ppo_ratio_clip_dropped", "lit_diffac/losses.py",
        "clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)",
        "clipped = -advantages * ratio",
        _t("tests/test_losses.py::test_ppo_policy_loss_hand_computed"),
        "PPO ratio clip dropped"),
    Mutant("ppo_loss_sign", "lit_diffac/losses.py",
        "loss = torch.maximum(unclipped, clipped).mean()",
        "loss = -torch.maximum(unclipped, clipped).mean()",
        _t("test_actor_step_moves_log_probs_along_the_advantages",
           "tests/test_losses.py::test_ppo_policy_loss_hand_computed"),
        "ppo_policy_loss returns the negated surrogate"),
    # --- guidance and samplers -----------------------------------------------------------------------------
    Mutant("steering_grad_negated", "lit_diffac/guidance.py",
        "prediction = sampler.guide(prediction.detach(), grad, index, scale, sample=x)",
        "prediction = sampler.guide(prediction.detach(), -grad, index, scale, sample=x)",
        _t("test_steering_raises_the_value_of_the_next_state"),
        "steered_sample steers along −∇V"),
    Mutant("steering_objective_negated", "lit_diffac/guidance.py",
        "grad, = torch.autograd.grad((v * w).sum(), x_in)",
        "grad, = torch.autograd.grad(-(v * w).sum(), x_in)",
        _t("test_steering_raises_the_value_of_the_next_state"),
        "steered_sample differentiates −V"),
    Mutant("ddim_guide_sign", "lit_diffac/samplers/ddim.py",
        "guided = eps - expand_like(coef, model_output) * value_grad.float()",
        "guided = eps + expand_like(coef, model_output) * value_grad.float()",
        _t("test_steering_raises_the_value_of_the_next_state[unet]"),
        "DDIMSampler.guide shifts ε̂ the wrong way"),
    Mutant("ddim_guide_clip_mask", "lit_diffac/samplers/ddim.py",
        "return torch.where(x0_inside(eps) & x0_inside(guided), guided, eps)",
        "return guided",
        _t("tests/test_guidance.py::test_steering_direction_raises_the_value[unet-0-clip_sample]"),
        "DDIMSampler.guide shifts ε̂ on clipped elements too (the step goes against ∇V there)"),
    Mutant("flow_guide_sign", "lit_diffac/samplers/flow.py",
        "return model_output.float() - expand_like(coef, model_output) * value_grad.float()",
        "return model_output.float() + expand_like(coef, model_output) * value_grad.float()",
        _t("test_steering_raises_the_value_of_the_next_state[dit]"),
        "FlowSDESampler.guide shifts v̂ the wrong way"),
    Mutant("advantage_pairs_smallest", PPO,
        "ranked = torch.argsort(-advantages.detach()[:, window].abs(), dim=1, stable=True)[:, :kept]",
        "ranked = torch.argsort(advantages.detach()[:, window].abs(), dim=1, stable=True)[:, :kept]",
        _t("tests/test_ppo.py::test_advantage_pairs_keep_each_trajectory_s_largest_abs_advantages"),
        "step_selection='advantage' trains on the steps with the smallest |A| instead of the largest"),
    Mutant("train_steps_ignored", AC,
        "hp, steps = self.hparams, self.train_step_indices",
        "hp, steps = self.hparams, None",
        _t("tests/test_actor_critic.py::test_train_steps_limit_the_trained_steps"),
        "train_steps is accepted but the update trains every step"),
    Mutant("shuffled_pairs_window_ignored", PPO,
        "pairs = torch.stack(torch.meshgrid(torch.arange(batch, device=device), window, indexing=\"ij\"), -1)",
        "pairs = torch.stack(torch.meshgrid(torch.arange(batch, device=device), torch.arange(len(window), "
        "device=device), indexing=\"ij\"), -1)",
        _t("tests/test_ppo.py::test_shuffled_pairs_train_only_the_window_s_steps"),
        "shuffled_pairs trains the first W steps instead of the window's"),
    Mutant("group_baseline_whole_batch", EST,
        "out[members] = advantages[members] - advantages[members].mean(0)",
        "out[members] = advantages[members] - advantages.mean(0)",
        _t("tests/test_estimators.py::test_critic_gae_group_baseline_centres_each_step_on_its_prompt_group"),
        "CriticGAE(group_baseline=True) centres on the batch mean instead of each prompt group's"),
]


def _changed_line(m: Mutant) -> str:
    """The one line that the mutant changes, before → after (for the table)."""
    before = [line.strip() for line in m.original.splitlines()]
    after = [line.strip() for line in m.replacement.splitlines()]
    pairs = [(a, b) for a, b in zip(before, after) if a != b] or [(before[0], after[0])]
    return f"`{pairs[0][0]}` → `{pairs[0][1]}`"


def occurrences(m: Mutant, root: Path = ROOT) -> int:
    path = root / m.file
    return path.read_text().count(m.original) if path.is_file() else 0


def _check_table() -> None:
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate mutant names in {names}")
    for m in MUTANTS:
        if m.original == m.replacement or len(m.original.splitlines()) != len(m.replacement.splitlines()):
            raise SystemExit(f"{m.name}: replacement must change exactly one line of the original")
        changed = sum(a != b for a, b in zip(m.original.splitlines(), m.replacement.splitlines()))
        if changed != 1:
            raise SystemExit(f"{m.name}: changes {changed} lines, not one")


def list_table(mutants: list[Mutant]) -> int:
    missing = 0
    print(f"{'name':30} {'found':6} file / tests")
    for m in mutants:
        n = occurrences(m)
        missing += n != 1
        print(f"{m.name:30} {('ok' if n == 1 else f'{n}x!'):6} {m.file}: {_changed_line(m)}")
        print(f"{'':37}{m.description}; killed by {', '.join(t.split('::', 1)[1] for t in m.tests)}")
    return missing


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _pytest(workdir: Path, tests: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=workdir, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def _reason(output: str) -> str:
    """The first ``FAILED node - reason`` line of pytest's short summary, shortened."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            node, _, why = line.partition(" - ")
            node = node.split("::", 1)[-1]
            return f"{node}: {why[:90]}" if why else node
    return ""


def run(mutants: list[Mutant], keep_going: bool = True, each: bool = False) -> int:
    missing = [m for m in mutants if occurrences(m) != 1]
    for m in missing:
        print(f"MISSING  {m.name}: the original substring occurs {occurrences(m)}x in {m.file} "
              "(need exactly 1)")
    # no bytecode caches (a mutant of the same size written within the same second could reuse a stale .pyc);
    # wide lines so that pytest's summary keeps the failure reason; one thread, as the test suite runs.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "250",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows, bad = [], len(missing)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        env["PYTHONPATH"] = str(work)
        where = subprocess.run([sys.executable, "-c", "import lit_diffac; print(lit_diffac.__file__)"],
                               cwd=work, env=env, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(work)):
            raise SystemExit(f"the copy's lit_diffac is not the one imported ({where}); refusing to run")
        union = list(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, seconds, out = _pytest(work, union, env)
        print(f"baseline (unmodified copy, {len(union)} test ids): rc={rc} in {seconds:.1f} s")
        if rc != 0:
            print(out[-4000:])
            print("the tests must pass on the unmodified code: aborting")
            return 1
        for m in mutants:
            if m in missing:
                rows.append((m, "MISSING", 0.0))
                continue
            path = work / m.file
            pristine = path.read_text()
            try:
                path.write_text(pristine.replace(m.original, m.replacement))
                groups = [[t] for t in m.tests] if each else [list(m.tests)]
                runs = [_pytest(work, tests, env) for tests in groups]
            finally:
                path.write_text(pristine)
            codes = [r[0] for r in runs]
            seconds, out = sum(r[1] for r in runs), "\n".join(r[2] for r in runs)
            if each and 0 in codes and any(c == 1 for c in codes):
                status = "PARTIAL"  # killed, but not by every test named
            elif 0 in codes:
                status = "SURVIVED"
            else:
                status = "KILLED" if all(c == 1 for c in codes) else f"ERROR(rc={max(codes)})"
            bad += status != "KILLED"
            rows.append((m, status, seconds))
            print(f"{status:9} {m.name:30} {seconds:5.1f} s  {_reason(out)}", flush=True)
            if status != "KILLED":
                print(out[-3000:])
                if not keep_going:
                    break
    print()
    print("| mutant | file | one-line break | killed by | result |")
    print("|---|---|---|---|---|")
    for m, status, seconds in rows:
        tests = "<br>".join(t.split("::", 1)[1] if t.startswith(BEHAVIOUR) else t for t in m.tests)
        print(f"| {m.name} | {m.file} | {_changed_line(m).replace('|', '&#124;')} | {tests} | {status} |")
    killed = sum(s == "KILLED" for _, s, _ in rows)
    print(f"\n{killed}/{len(mutants)} mutants killed")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the table and exit 0")
    parser.add_argument("--check", action="store_true",
                        help="print the table; exit 1 if an original substring is not found exactly once")
    parser.add_argument("--stop", action="store_true", help="stop at the first mutant that is not killed")
    parser.add_argument("--each", action="store_true",
                        help="run every named test of a mutant on its own: each one must kill it (slower)")
    args = parser.parse_args(argv)
    _check_table()
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list or args.check:
        missing = list_table(chosen)
        return 1 if args.check and missing else 0
    return run(chosen, keep_going=not args.stop, each=args.each)


if __name__ == "__main__":
    sys.exit(main())
