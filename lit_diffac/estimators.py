"""How advantages are estimated: the one component in which actor-critic, GRPO and DDPO differ (DESIGN §7).

An estimator maps standardised rewards and the rollout's values to per-step advantages (one column per
reward, before weighting) and value targets.  :class:`CriticGAE` is the paper's: GAE over the denoising
steps with the learned critic.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch

from lit_diffac.advantages import clip_advantages, compute_gae, terminal_rewards, whiten

GatherFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Advantages:
    """Estimator output.

    Attributes:
        advantages: ``[B, K]`` combined, whitened and clipped advantages used by the policy loss.
        targets: ``[B, K, R]`` value targets (clipped), or ``None`` when there is no critic.
        per_reward: ``[B, K, R]`` per-reward advantages before weighting (for logging).
    """

    advantages: torch.Tensor
    targets: torch.Tensor | None
    per_reward: torch.Tensor


class AdvantageEstimator(abc.ABC):
    """Base class: ``estimator(rewards [B, R], values [B, K, R], prompts, weights [R], gather) → Advantages``.

    Args:
        advantage_clip: clamp of the final advantages (paper: 10).
        reward_normalization: how the module standardises each reward before the estimator sees it:
            ``"running"`` (statistics of every reward seen so far, gathered across processes; stable critic
            targets), ``"batch"`` (this iteration's batch only) or ``"none"`` (raw rewards).
    """

    uses_critic: bool = False

    def __init__(self, advantage_clip: float = 10.0, reward_normalization: str = "running") -> None:
        if reward_normalization not in ("running", "batch", "none"):
            raise ValueError("reward_normalization must be 'running', 'batch' or 'none', "
                             f"got {reward_normalization!r}")
        self.advantage_clip = advantage_clip
        self.reward_normalization = reward_normalization

    @abc.abstractmethod
    def __call__(self, rewards: torch.Tensor, values: torch.Tensor, prompts: list[str], weights: torch.Tensor,
                 gather: GatherFn | None = None) -> Advantages:
        ...

    def combine(self, per_reward: torch.Tensor, weights: torch.Tensor, gather: GatherFn | None) -> torch.Tensor:
        """Whiten each reward's advantages over the global batch, then ``A = Σ_i w_i A_i``, clipped."""
        whitened = torch.stack([whiten(per_reward[..., i], gather=gather) for i in range(per_reward.shape[-1])], -1)
        return clip_advantages((whitened * weights.to(whitened)).sum(-1), self.advantage_clip)


class CriticGAE(AdvantageEstimator):
    """Actor-critic advantages: per-reward GAE over the K steps with the critic's values (DESIGN §3).

    With γ = λ = 1 (paper) ``A_k = R − V_k`` and the value target is ``R``.

    Args:
        gamma: discount γ.
        lam: GAE λ.
        advantage_clip: clamp of the whitened, combined advantages (paper: 10).
        target_clip: clamp of the value targets (paper: 5).
        reward_normalization: see :class:`AdvantageEstimator`.
    """

    uses_critic = True

    def __init__(self, gamma: float = 1.0, lam: float = 1.0, advantage_clip: float = 10.0,
                 target_clip: float = 5.0, reward_normalization: str = "running") -> None:
        super().__init__(advantage_clip, reward_normalization)
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma, self.lam, self.target_clip = gamma, lam, target_clip

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        num_steps = values.shape[1]
        per_reward, targets = compute_gae(terminal_rewards(rewards, num_steps), values, self.gamma, self.lam)
        return Advantages(advantages=self.combine(per_reward, weights, gather),
                          targets=clip_advantages(targets, self.target_clip), per_reward=per_reward)


def group_relative_advantages(rewards: torch.Tensor, prompts: list[str], eps: float = 1e-4) -> torch.Tensor:
    r"""GRPO advantages: standardise each reward within its group of samples for the same prompt.

    .. math:: A_j = (R_j − \operatorname{mean}_{g(j)} R) / (\operatorname{std}_{g(j)} R + ε)

    (population std; a group of one sample gets advantage 0).

    Args:
        rewards: ``[B, R]`` rewards (any affine per-reward normalisation leaves the result unchanged).
        prompts: the ``B`` prompts; equal strings form a group.
        eps: added to the group std.

    Returns:
        ``[B, R]`` advantages.
    """
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
    out = torch.zeros_like(rewards, dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for members in groups.values():
        r = rewards[members].float()
        out[members] = (r - r.mean(0)) / (r.std(0, unbiased=False) + eps)
    return out


class GroupRelative(AdvantageEstimator):
    """GRPO (Flow-GRPO style): no critic; one group-standardised advantage per trajectory, at every step.

    Use with ``samples_per_prompt = G > 1`` on the module so each prompt has a group.

    Args:
        eps: added to the group std.
        advantage_clip: clamp of the combined advantages.
        reward_normalization: see :class:`AdvantageEstimator` (group standardisation makes it immaterial).
    """

    def __init__(self, eps: float = 1e-4, advantage_clip: float = 10.0, reward_normalization: str = "running") -> None:
        super().__init__(advantage_clip, reward_normalization)
        self.eps = eps

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        per_reward = group_relative_advantages(rewards, prompts, self.eps)[:, None].expand(-1, values.shape[1], -1)
        combined = clip_advantages((per_reward * weights.to(per_reward)).sum(-1), self.advantage_clip)
        return Advantages(advantages=combined, targets=None, per_reward=per_reward)


class PerPromptStatTracker:
    """DDPO's running per-prompt reward statistics.

    Each prompt keeps its last ``buffer_size`` rewards; once it has ``min_count`` of them, a new reward is
    standardised by that buffer's mean and std, before that by the current batch's.

    Args:
        buffer_size: rewards remembered per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"need 1 <= min_count <= buffer_size, got {min_count}, {buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Add ``rewards [B]`` to the buffers and return them standardised ``[B]`` (float32)."""
        rewards = rewards.detach().float().cpu()
        out = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            buffer = self.buffers.setdefault(prompt, [])
            buffer.extend(rewards[idx].tolist())
            del buffer[:-self.buffer_size]
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stats = torch.tensor(buffer)
                mean, std = stats.mean(), stats.std(unbiased=False)
            out[idx] = (rewards[idx] - mean) / (std + eps)
        return out

    def state_dict(self) -> dict:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: list(v) for k, v in state["buffers"].items()}


class PerPromptStats(AdvantageEstimator):
    """DDPO: advantages from per-prompt running reward statistics, clipped to ±5, no critic.

    Args:
        buffer_size, min_count: see :class:`PerPromptStatTracker`.
        advantage_clip: clamp of the combined advantages (DDPO: 5).
        reward_normalization: see :class:`AdvantageEstimator`.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, advantage_clip: float = 5.0,
                 reward_normalization: str = "running") -> None:
        super().__init__(advantage_clip, reward_normalization)
        self.trackers: list[PerPromptStatTracker] = []
        self.buffer_size, self.min_count = buffer_size, min_count

    def state_dict(self) -> dict:
        """The trackers' buffers (plain lists, for ``weights_only`` checkpoints)."""
        return {"trackers": [t.state_dict() for t in self.trackers]}

    def load_state_dict(self, state: dict) -> None:
        self.trackers = []
        for tracker_state in state["trackers"]:
            tracker = PerPromptStatTracker(self.buffer_size, self.min_count)
            tracker.load_state_dict(tracker_state)
            self.trackers.append(tracker)

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        while len(self.trackers) < rewards.shape[1]:
            self.trackers.append(PerPromptStatTracker(self.buffer_size, self.min_count))
        per_reward = torch.stack([t.update(prompts, rewards[:, j]) for j, t in enumerate(self.trackers)], -1)
        per_reward = per_reward.to(rewards.device)[:, None].expand(-1, values.shape[1], -1)
        combined = clip_advantages((per_reward * weights.to(per_reward)).sum(-1), self.advantage_clip)
        return Advantages(advantages=combined, targets=None, per_reward=per_reward)
