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
    """

    uses_critic: bool = False

    def __init__(self, advantage_clip: float = 10.0) -> None:
        self.advantage_clip = advantage_clip

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
    """

    uses_critic = True

    def __init__(self, gamma: float = 1.0, lam: float = 1.0, advantage_clip: float = 10.0,
                 target_clip: float = 5.0) -> None:
        super().__init__(advantage_clip)
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma, self.lam, self.target_clip = gamma, lam, target_clip

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        num_steps = values.shape[1]
        per_reward, targets = compute_gae(terminal_rewards(rewards, num_steps), values, self.gamma, self.lam)
        return Advantages(advantages=self.combine(per_reward, weights, gather),
                          targets=clip_advantages(targets, self.target_clip), per_reward=per_reward)
