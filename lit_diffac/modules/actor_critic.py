"""LatentActorCritic: trajectory-level PPO over the denoising chain with a state-aligned critic.

One Lightning *epoch* is one RL iteration (DESIGN §6), so ``trainer.max_epochs`` is the number of iterations
and checkpoints fall between iterations.  :meth:`~LatentActorCritic.training_step` is the algorithm box:

1. **roll out** ``batch_size`` training prompts (per process) with the stochastic sampler, recording
   ``x_{t_k}``, ``log π_old`` and ``V_old`` from one backbone pass per step;
2. **score** the decoded final images with every reward;
3. **estimate** advantages and value targets from the standardised rewards (:mod:`lit_diffac.estimators`);
4. **update**: ``num_inner_epochs`` passes over shuffled (sample, step) minibatches, one backbone forward each
   giving ``log π_new`` and ``V_new``; clipped PPO on the policy and value regression on the critic, each
   with its own optimiser (:mod:`lit_diffac.ppo`); then the critic's replay passes, if any.

Around it, each in its own module: held-out evaluation (:mod:`lit_diffac.evaluation`), the run's record and
``summary.json`` (:mod:`lit_diffac.history`), non-finite iterations (:mod:`lit_diffac.faults`), exact resume
(:mod:`lit_diffac.resume`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.critic_replay import CriticReplay, fit_from_rollout
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.distributed import all_processes, gather_processes, is_sharded, shard_module
from lit_diffac.errors import ConfigError
from lit_diffac.estimators import AdvantageEstimator, Advantages, CriticGAE
from lit_diffac.evaluation import HeldOutEvaluation, default_sampler
from lit_diffac.faults import (GracefulStop, NonFiniteGuard, NonFiniteUpdate, TrainableSnapshot,
                               drop_nonfinite_samples, nonfinite_inputs)
from lit_diffac.frozen_weights import FROZEN_KEY, restore_frozen, strip_frozen
from lit_diffac.history import IterationTimer, RunHistory, RunReport
from lit_diffac.losses import reference_kl
from lit_diffac.modules.config import check_config
from lit_diffac.normalization import RewardNormalizer
from lit_diffac.ppo import (advantage_pairs, apply_learning_rates, build_optimizer, clip_and_step, clip_gradients,
                            minibatch_loss, reward_statistics, shuffled_pairs, value_diagnostics, zero_grad)
from lit_diffac.resume import CHECKPOINT_KEY, load_training_state, training_state
from lit_diffac.rewards.base import Reward
from lit_diffac.rollout import Rollout, collect_rollout, denoise, iteration_generator, sample_prompt_groups
from lit_diffac.samplers.base import Sampler, step_window
from lit_diffac.samplers.flow import FlowSDESampler
from lit_diffac.value_heads.head import ValueHead

ValueHeadFactory = Callable[[list[int], int, int], nn.Module]


class LatentActorCritic(L.LightningModule):
    """The paper's state-aligned latent actor-critic (DESIGN §1–§6); GRPO / DDPO with another estimator.

    Args:
        backbone: the diffusion policy, also the critic's feature extractor.
        rewards: one or more rewards; their names become metric keys ``reward/<name>_mean``.
        reward_weights: weight of each reward's advantages (default: all 1).
        sampler: stochastic sampler with log-probs (default: DDIM η=1 or flow SDE a=0.7, 10 steps).
        value_head: factory ``(feature_dims, text_dim, num_outputs) → nn.Module`` (default: :class:`ValueHead`).
        estimator: advantages and reward standardisation (default :class:`CriticGAE`); critic-free: no value head.
        train_prompts: prompt source for rollouts (``"toy:train"``, a text file, or a list).
        evaluation: the held-out evaluation (default: :class:`HeldOutEvaluation` on ``"toy:heldout"``).
        batch_size: trajectories per iteration per process.
        samples_per_prompt: trajectories per prompt (``G``; GRPO's group size; ``batch_size`` must be a multiple).
        minibatch_size: (sample, step) pairs per PPO minibatch.
        num_inner_epochs: passes over the iteration's data.
        timestep_fraction: fraction of each trajectory's steps trained on (``⌈fraction · K⌉`` per sample).
        step_selection: which steps those are: ``"random"`` (a random subset per sample and inner epoch, DDPO /
            flow_grpo) or ``"advantage"`` (those with the largest ``|A|``, :func:`~lit_diffac.ppo.advantage_pairs`:
            the critic says which denoising steps matter; needs a critic and ``timestep_fraction < 1``).
        train_steps: the window of denoising steps the policy update may train on (``timestep_fraction`` and
            ``step_selection`` choose within it): ``"all"``, ``"first:N"``, ``"last:N"`` or a list of step indices
            (:func:`~lit_diffac.samplers.base.step_window`; step ``K − 1`` makes the image).  Rollouts still sample
            every step; the others are not trained.  ``"first:9"`` of 10 is what flow_grpo's ``train_sd3.py``
            trains (``range(int(10 · 0.99))``).  The PPO minibatches' value loss sees the same steps; critic
            replay trains every step.
        clip_range: PPO ratio clip ε (per-dimension-mean log-probs make it tiny: paper 1e-5 SD1.5, 1e-4 SD3.5).
        value_clip_range: clip of ``V`` around ``V_old`` in the value loss (``None``: unclipped).
        kl_coef: weight β of the per-step KL to the reference policy (:func:`~lit_diffac.losses.reference_kl`);
            the reference is the base model, computed by disabling the LoRA adapter, so it needs a LoRA policy.
        kl_form: ``"exact"`` (the Gaussian KL of the two steps) or ``"flow_grpo"`` (flow_grpo's form, the exact KL
            times the step's ``|dt|``: a flow SDE sampler; :func:`~lit_diffac.losses.flow_grpo_kl`,
            docs/baselines.md), so that ``kl_coef`` is flow_grpo's ``beta``.
        critic_replay: extra value-only passes on cached features of recent iterations (head only;
            :class:`~lit_diffac.critic_replay.CriticReplay`); ``None``: PPO minibatches only (the paper).
        actor_lr, critic_lr: learning rates of the two optimisers.
        optimizer: optimiser for both, its ``lr`` replaced (default: AdamW, betas (0.9, 0.95), weight decay 1e-4).
        lr_scheduler: learning-rate schedule, one instance per optimiser, stepped once per iteration (``None``:
            constant learning rates); e.g. ``CosineAnnealingLR`` with ``T_max`` = the run's iterations.
        max_grad_norm: gradient clipping of the actor's and of the critic's parameters (``None``: off).
        value_gradient: ``"detached"`` (value loss trains only the head), ``"shared"`` (it also trains the
            backbone's policy parameters) or ``"critic_lora"`` (it trains the head and the backbone's separate
            critic adapter, ``critic_lora_rank > 0``; the features then come from an extra partial pass).
        seed: seeds prompts, rollout noise and minibatch order (with the iteration and process rank).
        faults: non-finite iterations (default :class:`NonFiniteGuard`: skip, roll back, stop after 3 in a row).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        rewards: Reward | Sequence[Reward],
        reward_weights: Sequence[float] | None = None,
        sampler: Sampler | None = None,
        value_head: ValueHeadFactory | None = None,
        estimator: AdvantageEstimator | None = None,
        train_prompts: PromptSource = "toy:train",
        evaluation: HeldOutEvaluation | None = None,
        batch_size: int = 32,
        samples_per_prompt: int = 1,
        minibatch_size: int = 64,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        step_selection: Literal["random", "advantage"] = "random",
        train_steps: str | list[int] = "all",
        clip_range: float = 1e-4,
        value_clip_range: float | None = None,
        kl_coef: float = 0.0,
        kl_form: Literal["exact", "flow_grpo"] = "exact",
        critic_replay: CriticReplay | None = None,
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        value_gradient: Literal["detached", "shared", "critic_lora"] = "detached",
        seed: int = 0,
        faults: NonFiniteGuard | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "rewards", "sampler", "value_head", "estimator", "evaluation",
                                          "critic_replay", "optimizer", "lr_scheduler", "faults"])
        self.automatic_optimization = False
        self.backbone = backbone
        self.rewards = nn.ModuleList([rewards] if isinstance(rewards, Reward) else list(rewards))
        self.estimator = estimator if estimator is not None else CriticGAE()
        check_config(self, reward_weights, critic_replay)
        weights = [1.0] * len(self.rewards) if reward_weights is None else list(reward_weights)
        self.register_buffer("reward_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.sampler = sampler if sampler is not None else default_sampler(backbone)
        self.sampler.setup(backbone.scheduler)
        self.train_step_indices = step_window(train_steps, self.sampler.num_steps, what="train_steps")
        if kl_form == "flow_grpo" and not isinstance(self.sampler, FlowSDESampler):
            raise ConfigError(f"kl_form='flow_grpo' needs a FlowSDESampler, got {type(self.sampler).__name__} "
                              "(flow_grpo's KL divides by the flow SDE's diffusion coefficient); use kl_form='exact'")
        self.num_values = self.num_value_outputs()
        factory = value_head if value_head is not None else ValueHead
        self.value_head = factory(backbone.feature_dims, backbone.pooled_dim, self.num_values) \
            if self.estimator.uses_critic else None
        if self.value_head is not None and hasattr(self.value_head, "detach_features"):
            self.value_head.detach_features = value_gradient == "detached"  # critic_lora: grads reach the adapter
        if self.value_head is not None and hasattr(self.value_head, "token_grid"):
            self.value_head.token_grid = backbone.feature_grid  # to pool a DiT's image tokens (patch_size > 1)
        self.reward_normalizer = RewardNormalizer(len(self.rewards), self.estimator.reward_normalization)
        self.train_prompt_list = load_prompts(train_prompts)
        self.evaluation = evaluation if evaluation is not None else HeldOutEvaluation()
        self.critic_replay = critic_replay if self.value_head is not None else None
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.faults = faults if faults is not None else NonFiniteGuard()
        self.history = RunHistory()

    # ------------------------------------------------------------------ configuration
    def num_value_outputs(self) -> int:  # one critic output per reward
        return len(self.rewards)

    @property
    def reward_names(self) -> list[str]:  # the metric keys of the rewards
        return [r.name for r in self.rewards]

    @property
    def last_metrics(self) -> dict[str, float]:  # the training metrics of the last iteration
        return self.history.last_metrics

    def trains_actor(self) -> bool:  # False for value pretraining
        return True

    def train_dataloader(self) -> DataLoader:  # one item per epoch: each iteration draws its own prompts
        return DataLoader([0], batch_size=1)

    def build_optimizers(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        """New ``(actor, critic)`` optimisers (``critic`` is ``None`` without a critic)."""
        hp, factory = self.hparams, self.optimizer_factory
        actor = build_optimizer(factory, list(self.backbone.policy_parameters()), hp.actor_lr)
        critic = build_optimizer(factory, self.critic_parameters(), hp.critic_lr) if self.value_head else None
        return actor, critic

    def configure_model(self) -> None:  # FSDPStrategy: the denoiser block by block and the value head become units
        shard_module(self)

    def configure_optimizers(self):
        optimizers = [opt for opt in self.build_optimizers() if opt is not None]
        if self.lr_scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        return optimizers, [self.lr_scheduler_factory(opt) for opt in optimizers]

    def critic_parameters(self) -> list[nn.Parameter]:
        """What the critic optimiser updates: the value head (and the backbone's critic adapter, if any)."""
        return [*self.value_head.parameters(), *self.backbone.critic_parameters()]

    def actor_critic_optimizers(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        """``(actor, critic)`` optimisers; either may be ``None`` (no critic / frozen policy)."""
        optimizers = self.optimizers()
        return tuple(optimizers) if isinstance(optimizers, list) else (optimizers, None)

    def configure_callbacks(self):  # evaluations and summary.json; SIGTERM, Ctrl-C and halts stop with a checkpoint
        return [RunReport(evaluate=self.trains_actor()), GracefulStop(guard=self.faults)]

    # ------------------------------------------------------------------ the RL iteration
    def training_step(self, batch, batch_idx: int) -> None:
        timer = IterationTimer(self.device)
        generator = self.generator(purpose=0)
        rollout = self.roll_out(self.sample_prompts(generator), generator)
        timer.lap("rollout")
        rollout.rewards, problem = self.faults.call(
            lambda: self.score(rollout.images, rollout.prompts, times=timer.reward_times), "scoring", self.current_epoch)
        timer.lap("reward")
        dropped, message = 0, None
        if problem is None and self.trainer.world_size == 1:  # several processes: equal batches, so skip instead
            kept, message = drop_nonfinite_samples(rollout, self.reward_names)
            dropped, rollout = rollout.batch_size - kept.batch_size, kept
        if message:
            self.print(f"[iteration {self.current_epoch}] {message}")
        problem = problem or nonfinite_inputs(rollout.rewards, rollout.log_probs, rollout.values, self.reward_names)
        metrics = self.faults.run(lambda: self.update(rollout, *self.actor_critic_optimizers()), problem,
                                  snapshot=self.snapshot, everywhere=self.everywhere,
                                  iteration=self.current_epoch, log=self.print)
        timer.lap("update")
        samples = self.hparams.batch_size * self.trainer.world_size
        self.history.samples_seen += samples
        metrics.update({**timer.metrics(samples, self.history.samples_seen), "fault/dropped_samples": float(dropped)})
        metrics.update({f"train/{name}_lr": opt.param_groups[0]["lr"]  # the rates this iteration's update used
                        for name, opt in zip(("actor", "critic"), self.actor_critic_optimizers()) if opt is not None})
        self.log_iteration(metrics)
        self.step_lr_schedulers()

    def step_lr_schedulers(self) -> None:
        """One step of each learning-rate schedule per iteration (updated or skipped alike)."""
        schedulers = self.lr_schedulers() if self.lr_scheduler_factory is not None else None
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def sample_prompts(self, generator: torch.Generator) -> list[str]:
        """``batch_size`` prompts: ``batch_size / samples_per_prompt`` draws, each repeated (a group)."""
        return sample_prompt_groups(self.train_prompt_list, self.hparams.batch_size, self.hparams.samples_per_prompt,
                                    generator)

    def roll_out(self, prompts: list[str], generator: torch.Generator) -> Rollout:
        """Sample trajectories with the current policy (features kept when the critic replays them)."""
        self.backbone.eval()
        return collect_rollout(self.backbone, self.sampler, prompts, value_head=self.value_head,
                               num_values=self.num_values, generator=generator, cfg_scale=self.backbone.cfg_scale,
                               device=self.device, keep_features=self.critic_replay is not None)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], times: dict[str, float] | None = None
              ) -> torch.Tensor:
        """``[B, R]`` raw rewards, one column per reward (each reward's seconds into ``times``, if given)."""
        columns = []
        for reward in self.rewards:
            with IterationTimer.measure(times, f"perf/reward_time/{reward.name}", self.device):
                columns.append(reward(images, prompts).to(self.device).float())
        return torch.stack(columns, dim=-1)

    def estimate(self, rollout: Rollout) -> Advantages:
        """Standardise each reward, then the estimator's advantages ``[B, K]`` and value targets."""
        normalized = self.reward_normalizer(rollout.rewards, gather=self.gather)
        weights = self.reward_weights
        if self.num_values == 1 and len(self.rewards) > 1:  # one critic output: fit it on the weighted sum
            normalized, weights = (normalized * weights).sum(-1, keepdim=True), weights.new_ones(1)
        return self.estimator(normalized, rollout.values, rollout.prompts, weights, gather=self.gather)

    def update(self, rollout: Rollout, actor_opt: torch.optim.Optimizer | None,
               critic_opt: torch.optim.Optimizer | None) -> dict[str, float]:
        """Estimate advantages, then PPO on the rollout's (sample, step) pairs; returns the diagnostics.

        Raises :class:`~lit_diffac.faults.NonFiniteUpdate` when a loss or gradient norm is not finite.
        """
        hp = self.hparams
        est = self.estimate(rollout)
        metrics = reward_statistics(self.gather(rollout.rewards), self.reward_names, self.reward_weights)
        if est.targets is not None:
            metrics.update(value_diagnostics(rollout.values, est.targets, self.reward_names))
        generator = self.generator(purpose=1)
        uncond = self.backbone.encode_negative(1).to(self.device) if self.backbone.cfg_scale != 1.0 else None
        train_actor = self.trains_actor()
        groups = [("actor", actor_opt if train_actor else None, list(self.backbone.policy_parameters())),
                  ("critic", critic_opt, self.critic_parameters() if critic_opt is not None else [])]
        self.backbone.train()
        sums: dict[str, list[float]] = {}
        for epoch in range(hp.num_inner_epochs):
            pairs = self.training_pairs(rollout, est.advantages, generator)
            if epoch == 0:
                metrics["train/trained_step_mean"] = pairs[:, 1].float().mean().item()
            for start in range(0, len(pairs), hp.minibatch_size):
                i, k = pairs[start:start + hp.minibatch_size].unbind(-1)
                log_prob, values, kl = self.forward_step(rollout.latents[i, k], k, rollout.embeds[i],
                                                         rollout.latents[i, k + 1],
                                                         uncond[[0] * len(i)] if uncond is not None else None)
                terms = minibatch_loss(log_prob, rollout.log_probs[i, k], est.advantages[i, k], hp.clip_range,
                                       values, est.targets[i, k] if values is not None else None,
                                       rollout.values[i, k], hp.value_clip_range, kl, hp.kl_coef, train_actor)
                if epoch == 0 and start == 0:  # on-policy check: before any step, log π_new = log π_old
                    metrics["train/onpolicy_max_abs_ratio_dev"] = \
                        (log_prob.detach() - rollout.log_probs[i, k]).exp().sub(1).abs().max().item()
                where = f"inner epoch {epoch}, minibatch {start // hp.minibatch_size}"
                zero_grad(groups)
                self.backward_loss(terms.loss, f"loss is not finite ({where})")
                norms = clip_and_step(groups, hp.max_grad_norm,
                                      lambda norm, name: self.require_finite(norm, f"{name} is not finite ({where})"))
                for key, value in {**terms.diagnostics(), **norms}.items():
                    sums.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else value)
        self.backbone.eval()
        if self.critic_replay is not None and est.targets is not None:
            metrics.update(self.fit_critic(rollout, est.targets, critic_opt, generator))
        metrics.update({key: sum(v) / len(v) for key, v in sums.items()})
        metrics.update({"train/actor_updated": float(train_actor), "train/ratio_min": min(sums["train/ratio_min"]),
                        "train/ratio_max": max(sums["train/ratio_max"]),
                        "train/neg_log_prob": -rollout.log_probs.mean().item(),
                        "train/advantage_abs_mean": est.advantages.abs().mean().item()})
        if est.per_reward.shape[-1] == len(self.reward_names) > 1:  # each reward's say in the combined advantage
            metrics.update({f"train/advantage_std/{name}": est.per_reward[..., j].std(unbiased=False).item()
                            for j, name in enumerate(self.reward_names)})
        return metrics

    def training_pairs(self, rollout: Rollout, advantages: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One inner epoch's ``(trajectory, step)`` pairs ``[N, 2]`` in training order (``step_selection``)."""
        hp, steps = self.hparams, self.train_step_indices  # every step: the same draws as no window
        if hp.step_selection == "advantage":
            return advantage_pairs(advantages, hp.timestep_fraction, generator, steps)
        return shuffled_pairs(rollout.batch_size, rollout.num_steps, hp.timestep_fraction, generator, self.device,
                              steps)

    def forward_step(self, latents: torch.Tensor, step_index: torch.Tensor, embeds: PromptEmbeds,
                     next_latents: torch.Tensor, uncond: PromptEmbeds | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One backbone pass on ``(x_{t_k}, k)`` pairs → ``log π(x_{t_{k+1}} | x_{t_k}) [M]``, ``V [M, R]`` (or
        ``None`` without a critic) and the KL to the reference ``[M]`` (or ``None`` when ``kl_coef`` is 0)."""
        t = self.sampler.timestep_for(step_index, device=self.device)
        # Value-only updates (pretraining) need no graph through a detached-feature backbone.
        backbone_grad = self.trains_actor() or self.hparams.value_gradient != "detached"
        cfg = self.backbone.cfg_scale
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_grad):
            prediction, features = denoise(self.backbone, latents, t, embeds, cfg, uncond)
            step = self.sampler.step(prediction, step_index, latents, prev_sample=next_latents)
        kl = None
        if self.hparams.kl_coef:
            with torch.no_grad(), self.backbone.reference_policy():
                ref_prediction, _ = denoise(self.backbone, latents, t, embeds, cfg, uncond)
                ref_mean = self.sampler.step(ref_prediction, step_index, latents, prev_sample=next_latents).mean
            dt = None
            if self.hparams.kl_form == "flow_grpo":  # the flow SDE's steps, dt = σ_{k+1} − σ_k
                sigmas = self.sampler.sigmas.to(step.std.device)
                dt = sigmas[step_index + 1] - sigmas[step_index]
            kl = reference_kl(step.mean, ref_mean, step.std, self.hparams.kl_form, dt=dt)
        values = None
        if self.value_head is not None:
            values = self.value_head(features, self.sampler.timestep_fraction(step_index).to(self.device),
                                     embeds.pooled)
        return step.log_prob, values, kl

    def fit_critic(self, rollout: Rollout, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                   generator: torch.Generator) -> dict[str, float]:
        """Add the rollout to the critic replay, then its value-only passes (:mod:`lit_diffac.critic_replay`)."""
        replay, hp = self.critic_replay, self.hparams
        fit = fit_from_rollout(
            replay, self.value_head, optimizer, rollout.features, rollout.embeds.pooled, targets, rollout.values,
            minibatch_size=replay.minibatch_size or hp.minibatch_size, generator=generator,
            timestep_fraction=lambda k: self.sampler.timestep_fraction(k).to(self.device),
            value_clip_range=hp.value_clip_range,
            backward=lambda loss: self.backward_loss(loss, "extra critic epoch loss is not finite"),
            clip=lambda params: self.require_finite(clip_gradients(params, hp.max_grad_norm),
                                                    "extra critic epoch gradient is not finite"))
        return {"train/critic_extra_value_loss": fit["loss"], "train/critic_extra_grad_norm": fit["grad_norm"],
                "train/critic_replay_pairs": float(len(replay))}

    # ------------------------------------------------------------------ helpers
    def generator(self, purpose: int) -> torch.Generator:
        """A generator seeded by (seed, iteration, rank, purpose): reproducible and resumable."""
        rank = self.global_rank if self._trainer is not None else 0
        return iteration_generator(self.hparams.seed, self.current_epoch, rank, purpose, self.device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` over processes along dim 0 (identity on one process)."""
        return gather_processes(self, x)

    def backward_loss(self, loss: torch.Tensor, message: str) -> None:
        """Check that ``loss`` is finite everywhere (else ``message``), then ``manual_backward`` under a Trainer
        (precision, strategy) or plain ``backward`` without one (tests)."""
        self.require_finite(float(loss.detach()), message)
        if self._trainer is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    def everywhere(self, ok: bool) -> bool:
        """Whether ``ok`` holds in every process (so that all of them skip an update together)."""
        return all_processes(self, ok)

    def require_finite(self, value: float, message: str) -> float:
        """``value``; raise :class:`NonFiniteUpdate` (in every process) unless it is finite in every process."""
        finite_here = math.isfinite(value)
        if not self.everywhere(finite_here):
            raise NonFiniteUpdate(message if not finite_here else f"{message} in another process")
        return value

    def snapshot(self) -> TrainableSnapshot:
        """What an update may change: trainable weights, optimiser states, reward statistics, estimator state."""
        params = [*self.backbone.policy_parameters(), *(self.critic_parameters() if self.value_head else ())]
        return TrainableSnapshot(params, self.actor_critic_optimizers(), [self.reward_normalizer, self.estimator])

    def log_iteration(self, metrics: dict[str, float]) -> None:
        """Send an iteration's metrics to every logger and the progress bar; keep them in the run's history."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.current_epoch)
        shown = {"reward": metrics.get(f"reward/{self.reward_names[0]}_mean"),
                 "kl": metrics.get("train/approx_kl"), "ev": metrics.get("train/explained_variance")}
        self.log_dict({k: v for k, v in shown.items() if v is not None and math.isfinite(v)},
                      prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.history.record_iteration(metrics)

    # ------------------------------------------------------------------ hooks, checkpoints, lit-diffac validate
    def on_fit_start(self) -> None:
        self.sampler.to(self.device)

    def on_train_start(self) -> None:  # on resume too: the recipe's learning rates win over the checkpoint's
        lrs = zip(("actor", "critic"), self.actor_critic_optimizers(), (self.hparams.actor_lr, self.hparams.critic_lr))
        schedulers = self.lr_schedulers() if self.lr_scheduler_factory is not None else None
        for message in apply_learning_rates(lrs, schedulers if isinstance(schedulers, list) else
                                            [schedulers] if schedulers else None):
            self.print(f"[iteration {self.current_epoch}] {message}")

    def val_dataloader(self) -> DataLoader:  # `lit-diffac validate / test`: one held-out evaluation (none in fit)
        return DataLoader([0] if self.trainer.state.fn != "fit" else [], batch_size=1)

    def validation_step(self, batch, batch_idx: int) -> None:
        """The held-out evaluation of the loaded policy (``lit-diffac validate --ckpt_path``), logged as metrics."""
        self.sampler.to(self.device)
        self.log_dict(self.evaluation.run(self, self.trainer.state.stage.value, self.history.iterations),
                      batch_size=1)

    test_dataloader, test_step = val_dataloader, validation_step

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that training changes (policy, critic adapter); checkpoints keep these, the
        value head and the module's other state, not the frozen weights (:mod:`lit_diffac.frozen_weights`)."""
        return [*self.backbone.policy_parameters(), *self.backbone.critic_parameters()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # what exact resume needs beyond weights (resume.py)
        checkpoint[CHECKPOINT_KEY] = training_state(self)
        if not is_sharded(self):  # FSDP: the strategy writes and reads every weight (frozen ones too) itself
            checkpoint[CHECKPOINT_KEY][FROZEN_KEY] = strip_frozen(checkpoint["state_dict"], self,
                                                                  self.trainable_parameters())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:  # FSDP's load_checkpoint has loaded the weights already and leaves none here
            record = checkpoint.get(CHECKPOINT_KEY, {}).get(FROZEN_KEY)
            restore_frozen(checkpoint["state_dict"], record, self, self.trainable_parameters(),
                           str(getattr(self._trainer, "ckpt_path", "")))
        if CHECKPOINT_KEY in checkpoint:
            load_training_state(self, checkpoint[CHECKPOINT_KEY], rng=self._trainer is not None)  # not for inference
