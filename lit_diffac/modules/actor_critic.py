"""LatentActorCritic: trajectory-level PPO over the denoising chain with a state-aligned critic.

One Lightning *epoch* is one RL iteration (DESIGN §6), so ``trainer.max_epochs`` is the number of iterations
and checkpoints fall between iterations:

1. draw ``batch_size`` training prompts (per process) and roll out the current policy with the stochastic
   sampler, recording ``x_{t_k}``, ``log π_old`` and ``V_old`` from one backbone pass per step;
2. decode and score the final images with every reward;
3. standardise each reward, estimate advantages and value targets (:mod:`lit_diffac.estimators`);
4. ``num_inner_epochs`` passes over shuffled (sample, step) minibatches: one backbone forward gives
   ``log π_new`` and ``V_new``; clipped PPO on the policy, (optionally clipped) value regression on the
   critic, each with its own AdamW optimiser and gradient clipping (Lightning manual optimisation).

Held-out evaluation (fixed prompts and seeds, CFG off) runs before training, every
``eval_every_n_iterations`` and at the end; ``summary.json`` in the run's log directory records the base
and final figures.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_diffac.backbones.base import DiffusionBackbone, PromptEmbeds
from lit_diffac.critic_replay import CriticReplay
from lit_diffac.critic_replay import fit_critic as regress_on_replay
from lit_diffac.data.prompts import PromptSource, load_prompts
from lit_diffac.evaluation import default_sampler, evaluate, run_summary
from lit_diffac.estimators import AdvantageEstimator, CriticGAE
from lit_diffac.faults import GracefulStop, NonFiniteUpdate, guarded_update
from lit_diffac.losses import explained_variance, gaussian_kl, ppo_policy_loss, value_loss
from lit_diffac.normalization import RewardNormalizer
from lit_diffac.resume import CHECKPOINT_KEY, check_compatible, load_training_state, training_state
from lit_diffac.rewards.base import Reward
from lit_diffac.rollout import Rollout, collect_rollout, denoise
from lit_diffac.samplers.base import Sampler
from lit_diffac.value_heads.head import ValueHead
from lit_diffac.value_heads.io import load_value_head

ValueHeadFactory = Callable[[list[int], int, int], nn.Module]


class LatentActorCritic(L.LightningModule):
    """The paper's state-aligned latent actor-critic (DESIGN §1–§6).

    Args:
        backbone: the diffusion policy, also the critic's feature extractor.
        rewards: one or more rewards; their names become metric keys ``reward/<name>``.
        reward_weights: weight of each reward's advantages (default: all 1).
        sampler: stochastic sampler with log-probs (default: DDIM η=1 or flow SDE a=0.7, 10 steps).
        value_head: factory ``(feature_dims, text_dim, num_outputs) → nn.Module`` (default: :class:`ValueHead`).
        estimator: advantage estimator (default: :class:`CriticGAE` with γ = λ = 1).
        train_prompts: prompt source for rollouts (``"toy:train"``, a text file, or a list).
        eval_prompts: prompt source for held-out evaluation.
        eval_rewards: extra rewards measured in evaluation only (e.g. the alignment judge while training on
            a hackable reward).
        batch_size: trajectories per iteration per process.
        samples_per_prompt: trajectories per prompt (``G``; GRPO's group size; ``batch_size`` must be a multiple).
        minibatch_size: (sample, step) pairs per PPO minibatch.
        num_inner_epochs: passes over the iteration's data.
        timestep_fraction: fraction of each trajectory's steps trained on (a random subset per sample).
        clip_range: PPO ratio clip ε (per-dimension-mean log-probs make it tiny: paper 1e-5 SD1.5, 1e-4 SD3.5).
        value_clip_range: clip of ``V`` around ``V_old`` in the value loss (``None``: unclipped).
        value_loss_coef: weight of the value loss (it has its own optimiser; this scales its gradient).
        kl_coef: weight β of the per-step KL to the reference policy, ``‖μ_θ − μ_ref‖² / (2σ²)`` (Flow-GRPO form);
            the reference is the base model, computed by disabling the LoRA adapter (no weight copy), so it
            needs ``lora_rank > 0``.
        critic_epochs: extra value-only passes per iteration on cached features (no extra backbone pass, only
            the head; needs ``value_gradient="detached"``).  Each pass regresses the head on ``batch_size ×
            num_steps`` (trajectory, step) pairs drawn from the critic replay (:mod:`lit_diffac.critic_replay`).
            0 is the paper's setting.
        critic_replay: iterations whose features and value targets the extra passes draw from (1: this
            iteration's rollout only).  A replay of a few dozen iterations is what makes the toy critic read
            ``x_t`` (PPG-style auxiliary value phase); features are stored in bf16 (about 10 MB per iteration
            for the toy DiT recipe).
        critic_minibatch_size: minibatch of the extra passes (``None``: ``minibatch_size``).
        checkpoint_critic_replay: save the critic replay in checkpoints, so that a resumed run is exact
            (``False``: smaller checkpoints; a resumed run refills the replay and is no longer bit-identical).
        actor_lr, critic_lr: AdamW learning rates.
        betas, weight_decay: AdamW settings for both optimisers.
        max_grad_norm, critic_max_grad_norm: gradient clipping (``None``: off).
        reward_normalization: ``"running"``, ``"batch"`` or ``"none"`` (DESIGN §3).
        value_gradient: ``"detached"`` (value loss trains only the head), ``"shared"`` (it also trains the
            backbone's policy parameters) or ``"critic_lora"`` (it trains the head and the backbone's separate
            critic adapter, ``critic_lora_rank > 0``; the features then come from an extra partial pass, see
            :meth:`~lit_diffac.backbones.base.DiffusionBackbone.forward`).
        cfg_scale: classifier-free guidance in rollouts and updates (1.0 = off, the paper's setting).
        negative_prompt: the unconditional branch's prompt when ``cfg_scale != 1`` (default ``""``).
        value_per_reward: one value output per reward (default); ``False`` fits a single head on the weighted
            sum of the standardised rewards (the ablation of DESIGN §5).
        value_warmup_iters: the first N iterations train only the critic (policy untouched: in-line value
            pretraining).
        critic_init: a value-head file written by :class:`~lit_diffac.modules.ValuePretraining` (or
            :func:`~lit_diffac.value_heads.save_value_head`) to start the critic from.
        eval_every_n_iterations: evaluation period (0: only before and after training).
        eval_samples_per_prompt: samples per held-out prompt.
        seed: seeds prompts, rollout noise and minibatch order (with the iteration and process rank).
        max_bad_iterations: an iteration whose rewards, log-probs, values, losses or gradients are not finite
            is skipped (weights and optimiser states untouched, counted in ``fault/skipped_iterations``); this
            many in a row stop the run with a checkpoint and a clear error.
        rollback_on_nonfinite: keep a copy of the trainable weights and optimiser states during each update,
            so that a non-finite loss or gradient mid-update undoes the whole iteration (``False`` saves that
            memory: only the remaining minibatches are skipped).
    """

    #: summary.json reports training diagnostics averaged over this many final iterations.
    SUMMARY_WINDOW = 10

    def __init__(
        self,
        backbone: DiffusionBackbone,
        rewards: Reward | Sequence[Reward],
        reward_weights: Sequence[float] | None = None,
        sampler: Sampler | None = None,
        value_head: ValueHeadFactory | None = None,
        estimator: AdvantageEstimator | None = None,
        train_prompts: PromptSource = "toy:train",
        eval_prompts: PromptSource = "toy:heldout",
        eval_rewards: Sequence[Reward] = (),
        batch_size: int = 32,
        samples_per_prompt: int = 1,
        minibatch_size: int = 64,
        num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0,
        clip_range: float = 1e-4,
        value_clip_range: float | None = None,
        value_loss_coef: float = 1.0,
        kl_coef: float = 0.0,
        critic_epochs: int = 0,
        critic_replay: int = 1,
        critic_minibatch_size: int | None = None,
        checkpoint_critic_replay: bool = True,
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 1e-4,
        max_grad_norm: float | None = 1.0,
        critic_max_grad_norm: float | None = 1.0,
        reward_normalization: Literal["running", "batch", "none"] = "running",
        value_gradient: Literal["detached", "shared", "critic_lora"] = "detached",
        cfg_scale: float = 1.0,
        negative_prompt: str = "",
        value_per_reward: bool = True,
        value_warmup_iters: int = 0,
        critic_init: str | None = None,
        eval_every_n_iterations: int = 0,
        eval_samples_per_prompt: int = 25,
        seed: int = 0,
        max_bad_iterations: int = 3,
        rollback_on_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["backbone", "rewards", "sampler", "value_head", "estimator", "eval_rewards"])
        _check_config(batch_size=batch_size, minibatch_size=minibatch_size, num_inner_epochs=num_inner_epochs,
                      timestep_fraction=timestep_fraction, clip_range=clip_range, cfg_scale=cfg_scale,
                      critic_epochs=critic_epochs, critic_replay=critic_replay,
                      critic_minibatch_size=critic_minibatch_size, value_gradient=value_gradient,
                      value_warmup_iters=value_warmup_iters, samples_per_prompt=samples_per_prompt,
                      kl_coef=kl_coef, max_bad_iterations=max_bad_iterations)
        if kl_coef and not getattr(backbone, "lora_rank", 0) and not _has_adapter(backbone.denoiser):
            raise ValueError("kl_coef > 0 needs a LoRA policy (lora_rank > 0): the reference policy is the base "
                             "model with the adapter disabled, so no copy of the weights is kept")
        if (value_gradient == "critic_lora") != bool(getattr(backbone, "critic_lora_rank", 0)):
            raise ValueError("value_gradient='critic_lora' and the backbone's critic_lora_rank > 0 go together "
                             "(set both, or neither)")
        self.automatic_optimization = False
        self.backbone = backbone
        self.rewards = nn.ModuleList([rewards] if isinstance(rewards, Reward) else list(rewards))
        if not len(self.rewards):
            raise ValueError("at least one reward is needed")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they are metric keys), got {names}")
        weights = [1.0] * len(names) if reward_weights is None else list(reward_weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} reward_weights for {len(names)} rewards {names}")
        self.register_buffer("reward_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.sampler = sampler if sampler is not None else default_sampler(backbone)
        self.sampler.setup(backbone.scheduler)
        self.estimator = estimator if estimator is not None else CriticGAE()
        self.num_values = self._num_value_outputs()
        factory = value_head if value_head is not None else ValueHead
        self.value_head = factory(backbone.feature_dims, backbone.pooled_dim, self.num_values) \
            if self.estimator.uses_critic else None
        if self.value_head is not None and hasattr(self.value_head, "detach_features"):
            self.value_head.detach_features = value_gradient == "detached"  # critic_lora: grads reach the adapter
        if self.value_head is None and (critic_init is not None or value_warmup_iters):
            raise ValueError("critic_init / value_warmup_iters need a critic, but this estimator uses none")
        if critic_init is not None:
            if self.value_head is None:
                raise ValueError("critic_init was given but this estimator uses no critic")
            load_value_head(self.value_head, critic_init)
        extra = [r for r in eval_rewards if r.name not in names]
        self.eval_rewards = nn.ModuleList(extra)
        self.reward_normalizer = RewardNormalizer(len(self.rewards), reward_normalization)
        self.train_prompt_list = load_prompts(train_prompts)
        self.eval_prompt_list = load_prompts(eval_prompts)
        self.eval_history: list[dict] = []
        self.samples_seen = 0
        self._fit_started: float | None = None
        self._recent: list[dict[str, float]] = []
        self.critic_replay = CriticReplay(critic_replay, storage_dtype=torch.bfloat16)
        self.skipped_iterations, self.consecutive_bad, self.halt_reason = 0, 0, None

    # ------------------------------------------------------------------ configuration
    def _num_value_outputs(self) -> int:
        """One value output per reward, or one for the weighted reward sum (``value_per_reward=False``)."""
        return len(self.rewards) if self.hparams.value_per_reward else 1

    def trains_actor(self) -> bool:
        """Whether this iteration updates the policy (not during value warm-up)."""
        return self.current_epoch >= self.hparams.value_warmup_iters

    def train_dataloader(self) -> DataLoader:
        # One item per epoch: the iteration draws its own prompts from (seed, iteration, rank).
        return DataLoader([0], batch_size=1)

    def configure_optimizers(self):
        hp = self.hparams
        actor = torch.optim.AdamW(self.backbone.policy_parameters(), lr=hp.actor_lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay)
        if self.value_head is None:
            return actor
        critic = torch.optim.AdamW(self.critic_parameters(), lr=hp.critic_lr, betas=tuple(hp.betas),
                                   weight_decay=hp.weight_decay)
        return [actor, critic]

    def critic_parameters(self) -> list[nn.Parameter]:
        """What the critic optimiser updates: the value head (and the backbone's critic adapter, if any)."""
        extra = self.backbone.critic_parameters() if hasattr(self.backbone, "critic_parameters") else []
        return [*self.value_head.parameters(), *extra]

    def actor_critic_optimizers(self):
        """``(actor, critic)`` optimisers; either may be ``None`` (no critic / frozen policy)."""
        optimizers = self.optimizers()
        return tuple(optimizers) if isinstance(optimizers, list) else (optimizers, None)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` over processes along dim 0 (identity on one process)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    def _generator(self, purpose: int) -> torch.Generator:
        """A generator seeded by (seed, iteration, rank, purpose): reproducible and resumable."""
        rank = self.global_rank if self._trainer is not None else 0
        seed = ((self.hparams.seed * 1_000_003 + self.current_epoch) * 4099 + rank) * 17 + purpose
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    # ------------------------------------------------------------------ rollout and scoring
    def sample_prompts(self, generator: torch.Generator) -> list[str]:
        """``batch_size`` prompts: ``batch_size / samples_per_prompt`` draws, each repeated (a group)."""
        group = self.hparams.samples_per_prompt
        idx = torch.randint(len(self.train_prompt_list), (self.hparams.batch_size // group,), generator=generator,
                            device=generator.device)
        return [self.train_prompt_list[i] for i in idx.tolist() for _ in range(group)]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B, R]`` raw rewards, one column per reward (each reward's time goes to ``perf/reward_time/<name>``)."""
        columns = []
        self._reward_times = {}
        for reward in self.rewards:
            start = time.perf_counter()
            columns.append(reward(images, prompts).to(self.device).float())
            self._reward_times[f"perf/reward_time/{reward.name}"] = time.perf_counter() - start
        return torch.stack(columns, dim=-1)

    def forward_step(self, latents: torch.Tensor, step_index: torch.Tensor, embeds: PromptEmbeds,
                     next_latents: torch.Tensor, uncond: PromptEmbeds | None = None):
        """One backbone pass on ``(x_{t_k}, k)`` pairs → ``(log π(x_{t_{k+1}} | x_{t_k}) [M], V [M, R] | None)``."""
        t = self.sampler.timestep_for(step_index, device=self.device)
        # Value-only iterations (warm-up, pretraining) need no graph through a detached-feature backbone.
        backbone_grad = self.trains_actor() or self.hparams.value_gradient != "detached"
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_grad):
            prediction, features = denoise(self.backbone, latents, t, embeds, self.hparams.cfg_scale, uncond)
            step = self.sampler.step(prediction, step_index, latents, prev_sample=next_latents)
            log_prob = step.log_prob
        self._last_kl = self._kl_to_reference(step, latents, step_index, t, embeds, next_latents, uncond) \
            if self.hparams.kl_coef else None
        values = None
        if self.value_head is not None:
            values = self.value_head(features, self.sampler.timestep_fraction(step_index).to(self.device),
                                     embeds.pooled)
        return log_prob, values

    def _kl_to_reference(self, step, latents, step_index, t, embeds, next_latents, uncond) -> torch.Tensor:
        """``[M]`` per-step KL to the base model: ``mean_dims (μ_θ − μ_ref)² / (2σ²)`` (adapter disabled)."""
        denoiser = self.backbone.denoiser
        with torch.no_grad():
            denoiser.disable_adapters()
            try:
                ref_prediction, _ = denoise(self.backbone, latents, t, embeds, self.hparams.cfg_scale, uncond)
            finally:
                denoiser.enable_adapters()
            ref_mean = self.sampler.step(ref_prediction, step_index, latents, prev_sample=next_latents).mean
        return gaussian_kl(step.mean, ref_mean, step.std)

    # ------------------------------------------------------------------ the RL iteration
    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        start = time.perf_counter()
        generator = self._generator(purpose=0)
        prompts = self.sample_prompts(generator)
        self.backbone.eval()
        rollout = collect_rollout(self.backbone, self.sampler, prompts, value_head=self.value_head,
                                  num_values=self.num_values, generator=generator, cfg_scale=hp.cfg_scale,
                                  device=self.device, keep_features=self._needs_features(),
                                  negative_prompt=hp.negative_prompt)
        self._sync()
        rollout_time = time.perf_counter() - start
        rollout.rewards = self.score(rollout.images, prompts)
        self._sync()
        reward_time = time.perf_counter() - start - rollout_time
        metrics = guarded_update(self, rollout)  # update(), skipped and rolled back if anything is non-finite
        self._sync()
        iteration_time = time.perf_counter() - start
        samples = hp.batch_size * self.trainer.world_size
        self.samples_seen += samples
        metrics.update({
            "perf/rollout_time": rollout_time, "perf/reward_time": reward_time,
            "perf/update_time": iteration_time - rollout_time - reward_time,
            "perf/iteration_time": iteration_time, "perf/samples_per_sec": samples / iteration_time,
            "perf/samples_seen": float(self.samples_seen), **self._reward_times,
        })
        self._log_metrics(metrics)

    def _sync(self) -> None:
        """Wait for queued GPU work, so the ``perf/…`` timings measure it (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _everywhere(self, ok: bool) -> bool:
        """Whether ``ok`` holds in every process (so that all of them skip an update together)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return ok
        return bool(self.trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _require_finite(self, value: float, message: str) -> None:
        """Raise :class:`NonFiniteUpdate` (in every process) unless ``value`` is finite in every process."""
        finite = math.isfinite(value)
        if not self._everywhere(finite):
            raise NonFiniteUpdate(message if not finite else f"{message} in another process")

    def configure_callbacks(self):
        """SIGTERM / Ctrl-C and a halt after non-finite iterations stop at an iteration's end with a checkpoint."""
        return [GracefulStop()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add what exact resume needs beyond weights and optimisers (:mod:`lit_diffac.resume`)."""
        checkpoint[CHECKPOINT_KEY] = training_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(self.state_dict(), checkpoint["state_dict"], str(getattr(self._trainer, "ckpt_path", "")))
        if CHECKPOINT_KEY in checkpoint:
            load_training_state(self, checkpoint[CHECKPOINT_KEY], rng=self._trainer is not None)  # not for inference

    def _needs_features(self) -> bool:
        return self.value_head is not None and self.hparams.critic_epochs > 0

    def update(self, rollout: Rollout) -> dict[str, float]:
        """PPO on one rollout (rewards filled in); returns the iteration's diagnostics."""
        hp = self.hparams
        batch, num_steps = rollout.batch_size, rollout.num_steps
        metrics = self._reward_metrics(rollout.rewards)
        normalized = self.reward_normalizer(rollout.rewards, gather=self._gather)
        weights = self.reward_weights
        if self.num_values == 1 and len(self.rewards) > 1:  # single head on the weighted sum
            normalized, weights = (normalized * weights).sum(-1, keepdim=True), weights.new_ones(1)
        est = self.estimator(normalized, rollout.values, rollout.prompts, weights, gather=self._gather)
        train_actor = self.trains_actor()
        if est.targets is not None:
            metrics.update(_value_diagnostics(rollout.values, est.targets, self.reward_names))

        # (sample, step) pairs, optionally a random subset of steps per sample (DDPO's timestep fraction).
        generator = self._generator(purpose=1)
        steps_kept = max(1, math.ceil(hp.timestep_fraction * num_steps))
        uncond = self.backbone.encode_prompts([hp.negative_prompt]).to(self.device) if hp.cfg_scale != 1.0 else None
        actor_opt, critic_opt = self.actor_critic_optimizers()
        self.backbone.train()
        sums: dict[str, list[float]] = {}
        for epoch in range(hp.num_inner_epochs):
            order = torch.argsort(torch.rand(batch, num_steps, generator=generator, device=self.device), dim=1)
            pairs = torch.stack(torch.meshgrid(torch.arange(batch, device=self.device),
                                               torch.arange(num_steps, device=self.device), indexing="ij"), -1)
            pairs = torch.gather(pairs, 1, order[..., None].expand(-1, -1, 2))[:, :steps_kept].reshape(-1, 2)
            pairs = pairs[torch.randperm(len(pairs), generator=generator, device=self.device)]
            for mb_start in range(0, len(pairs), hp.minibatch_size):
                i, k = pairs[mb_start:mb_start + hp.minibatch_size].unbind(-1)
                embeds = rollout.embeds[i]
                mb_uncond = uncond[[0] * len(i)] if uncond is not None else None
                log_prob, values = self.forward_step(rollout.latents[i, k], k, embeds, rollout.latents[i, k + 1],
                                                     mb_uncond)
                policy = ppo_policy_loss(log_prob, rollout.log_probs[i, k], est.advantages[i, k], hp.clip_range)
                loss = policy.loss if train_actor else torch.zeros((), device=self.device)
                if self._last_kl is not None:
                    loss = loss + hp.kl_coef * self._last_kl.mean()
                    sums.setdefault("train/kl_to_reference", []).append(float(self._last_kl.mean().detach()))
                diag = {"train/policy_loss": policy.loss, "train/approx_kl": policy.approx_kl,
                        "train/clipfrac": policy.clipfrac, "train/ratio_mean": policy.ratio_mean,
                        "train/ratio_min": policy.ratio_min, "train/ratio_max": policy.ratio_max}
                if values is not None:
                    vloss = value_loss(values, est.targets[i, k], rollout.values[i, k], hp.value_clip_range)
                    loss = loss + hp.value_loss_coef * vloss.loss
                    diag.update({"train/value_loss": vloss.loss, "train/value_clipfrac": vloss.clipfrac})
                if epoch == 0 and mb_start == 0:
                    # On-policy check: recomputed log-probs equal the stored ones before any update.
                    metrics["train/onpolicy_max_abs_ratio_dev"] = \
                        (log_prob.detach() - rollout.log_probs[i, k]).exp().sub(1).abs().max().item()
                for opt in (actor_opt, critic_opt):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                where = f"inner epoch {epoch}, minibatch {mb_start // hp.minibatch_size}"
                self._require_finite(float(loss.detach()), f"loss is not finite ({where})")
                self.manual_backward(loss)
                if train_actor:
                    diag["train/actor_grad_norm"] = _clip(self.backbone.policy_parameters(), hp.max_grad_norm)
                if critic_opt is not None:
                    diag["train/critic_grad_norm"] = _clip(self.critic_parameters(), hp.critic_max_grad_norm)
                for key in ("train/actor_grad_norm", "train/critic_grad_norm"):
                    self._require_finite(diag.get(key, 0.0), f"{key.split('/')[1]} is not finite ({where})")
                if train_actor:
                    actor_opt.step()
                if critic_opt is not None:
                    critic_opt.step()
                for key, value in diag.items():
                    sums.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else value)
        self.backbone.eval()
        if self._needs_features() and est.targets is not None:
            metrics.update(self.fit_critic(rollout, est.targets, critic_opt, generator))
        metrics.update({key: sum(v) / len(v) for key, v in sums.items()})
        metrics["train/actor_updated"] = float(train_actor)
        metrics["train/ratio_min"] = min(sums["train/ratio_min"])
        metrics["train/ratio_max"] = max(sums["train/ratio_max"])
        metrics["train/neg_log_prob"] = -rollout.log_probs.mean().item()
        metrics["train/advantage_abs_mean"] = est.advantages.abs().mean().item()
        return metrics

    def fit_critic(self, rollout: Rollout, targets: torch.Tensor, optimizer, generator: torch.Generator
                   ) -> dict[str, float]:
        """Add the rollout to the critic replay, then ``critic_epochs`` value-only passes drawn from it."""
        hp = self.hparams
        self.critic_replay.add(rollout.features, rollout.embeds.pooled, targets, rollout.values)

        def backward(loss: torch.Tensor) -> None:
            self._require_finite(float(loss.detach()), "extra critic epoch loss is not finite")
            self.manual_backward(loss)

        def clip(params: list[nn.Parameter]) -> float:
            norm = _clip(params, hp.critic_max_grad_norm)
            self._require_finite(norm, "extra critic epoch gradient is not finite")
            return norm

        try:
            fit = regress_on_replay(self.value_head, self.critic_replay, optimizer, passes=hp.critic_epochs,
                                    pairs_per_pass=targets.shape[0] * targets.shape[1],
                                    minibatch_size=hp.critic_minibatch_size or hp.minibatch_size,
                                    timestep_fraction=lambda k: self.sampler.timestep_fraction(k).to(self.device),
                                    generator=generator, value_clip_range=hp.value_clip_range, backward=backward,
                                    clip=clip)
        except NonFiniteUpdate:
            self.critic_replay.entries.pop()  # the iteration is rolled back: so is its replay entry
            raise
        return {"train/critic_extra_value_loss": fit["loss"], "train/critic_extra_grad_norm": fit["grad_norm"],
                "train/critic_replay_pairs": float(len(self.critic_replay))}

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def _reward_metrics(self, rewards: torch.Tensor) -> dict[str, float]:
        pool = self._gather(rewards)
        out = {}
        for j, name in enumerate(self.reward_names):
            out[f"reward/{name}_mean"] = pool[:, j].mean().item()
            out[f"reward/{name}_std"] = pool[:, j].std(unbiased=False).item()
        return out

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        iteration = self.current_epoch
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)
        shown = {"reward": metrics.get(f"reward/{self.reward_names[0]}_mean"),
                 "kl": metrics.get("train/approx_kl"), "ev": metrics.get("train/explained_variance")}
        self.log_dict({k: v for k, v in shown.items() if v is not None and math.isfinite(v)},
                      prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.last_metrics = metrics
        self._recent.append(metrics)
        del self._recent[:-self.SUMMARY_WINDOW]

    # ------------------------------------------------------------------ evaluation and summary
    @torch.no_grad()
    def evaluate(self, samples_per_prompt: int | None = None) -> dict[str, float]:
        """Held-out evaluation: fixed prompts and seeds, CFG off; mean of every reward (and accuracies)."""
        return evaluate(self.backbone, self.sampler, self.eval_prompt_list, [*self.rewards, *self.eval_rewards],
                        samples_per_prompt=samples_per_prompt or self.hparams.eval_samples_per_prompt,
                        device=self.device)

    def _run_eval(self, label: str, iteration: int) -> None:
        """Evaluate after ``iteration`` completed iterations; record, log and print the result."""
        metrics = self.evaluate()
        self.eval_history.append({"iteration": iteration, "label": label, "samples_seen": self.samples_seen,
                                  **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
        self.print(f"[eval {label} @ iteration {iteration}, {self.samples_seen} samples] {shown}")

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        self.sampler.to(self.device)
        if not self.eval_history:
            self._run_eval("base", 0)

    def on_train_epoch_end(self) -> None:
        every = self.hparams.eval_every_n_iterations
        last = self.current_epoch + 1 >= (self.trainer.max_epochs or 0)
        if every and (self.current_epoch + 1) % every == 0 and not last:
            self._run_eval("periodic", self.current_epoch + 1)

    def on_fit_end(self) -> None:
        self._run_eval("final", self.current_epoch)
        if self.trainer.is_global_zero and self.logger is not None and self.trainer.log_dir is not None:
            self.write_summary(Path(self.trainer.log_dir) / "summary.json")

    def write_summary(self, path: Path) -> Path:
        """Base and final held-out metrics, final explained variance, samples seen and wall time."""
        wall = time.perf_counter() - (self._fit_started or time.perf_counter())
        summary = run_summary(type(self).__name__, self.current_epoch, self.samples_seen, wall, self.eval_history,
                              self._recent, self.hparams.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        return path

def _has_adapter(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def _clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip gradients in place (if ``max_norm``) and return the total norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


def _value_diagnostics(values: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Explained variance of the rollout's values, overall, per reward and per third of the chain."""
    out = {"train/explained_variance": explained_variance(values, targets).item()}
    num_steps = values.shape[1]
    thirds = {"early": slice(0, max(1, num_steps // 3)), "middle": slice(num_steps // 3, 2 * num_steps // 3),
              "late": slice(2 * num_steps // 3, num_steps)}
    for bucket, sl in thirds.items():
        if values[:, sl].numel():
            out[f"train/explained_variance_{bucket}"] = explained_variance(values[:, sl], targets[:, sl]).item()
    if values.shape[-1] > 1:  # one value output per reward
        for j, name in enumerate(names):
            out[f"train/explained_variance/{name}"] = explained_variance(values[..., j], targets[..., j]).item()
    return out


def _check_config(**kw) -> None:
    problems = []
    for key in ("batch_size", "minibatch_size", "num_inner_epochs"):
        if kw[key] < 1:
            problems.append(f"{key} must be >= 1 (got {kw[key]})")
    if not 0.0 < kw["timestep_fraction"] <= 1.0:
        problems.append(f"timestep_fraction must be in (0, 1] (got {kw['timestep_fraction']})")
    if not kw["clip_range"] > 0:
        problems.append(f"clip_range must be > 0 (got {kw['clip_range']})")
    if kw["samples_per_prompt"] < 1 or kw["batch_size"] % kw["samples_per_prompt"]:
        problems.append(f"batch_size ({kw['batch_size']}) must be a multiple of samples_per_prompt "
                        f"({kw['samples_per_prompt']})")
    if kw["kl_coef"] < 0:
        problems.append(f"kl_coef must be >= 0 (got {kw['kl_coef']})")
    if kw["value_warmup_iters"] < 0:
        problems.append(f"value_warmup_iters must be >= 0 (got {kw['value_warmup_iters']})")
    if kw["max_bad_iterations"] < 1:
        problems.append(f"max_bad_iterations must be >= 1 (got {kw['max_bad_iterations']})")
    if kw["critic_epochs"] < 0:
        problems.append(f"critic_epochs must be >= 0 (got {kw['critic_epochs']})")
    if kw["critic_replay"] < 1:
        problems.append(f"critic_replay must be >= 1 iteration (got {kw['critic_replay']})")
    if kw["critic_minibatch_size"] is not None and kw["critic_minibatch_size"] < 1:
        problems.append(f"critic_minibatch_size must be >= 1 (got {kw['critic_minibatch_size']})")
    if kw["critic_epochs"] and kw["value_gradient"] != "detached":
        problems.append("critic_epochs needs value_gradient='detached' (cached features carry no backbone graph)")
    if not kw["cfg_scale"] >= 1.0:
        problems.append(f"cfg_scale must be >= 1 (1 = no guidance; got {kw['cfg_scale']})")
    if problems:
        raise ValueError("invalid LatentActorCritic config: " + "; ".join(problems))
