"""Baselines on the same machinery (DESIGN §7): they differ from the actor-critic only in the estimator.

* :class:`GRPO` — Flow-GRPO style: ``G`` samples per prompt, group-standardised advantages at every step, no
  critic, optional KL to the reference policy (``kl_coef`` with a LoRA policy).
* :class:`DDPO` — per-prompt running reward statistics, advantages clipped to ±5, no critic.

Every other option (sampler, minibatches, timestep fraction, clip range, LoRA, CFG, evaluation) is
:class:`~lit_diffac.modules.LatentActorCritic`'s.
"""

from __future__ import annotations

from lit_diffac.estimators import AdvantageEstimator, GroupRelative, PerPromptStats
from lit_diffac.modules.actor_critic import LatentActorCritic


class GRPO(LatentActorCritic):
    """Group-relative policy optimisation on the denoising chain.

    Args:
        samples_per_prompt: group size ``G`` (default 4; ``batch_size`` must be a multiple).
        estimator: defaults to :class:`~lit_diffac.estimators.GroupRelative`.
        (all other arguments: :class:`LatentActorCritic`)
    """

    def __init__(self, *args, samples_per_prompt: int = 4, estimator: AdvantageEstimator | None = None,
                 **kwargs) -> None:
        super().__init__(*args, samples_per_prompt=samples_per_prompt, estimator=estimator or GroupRelative(),
                         **kwargs)
        if samples_per_prompt < 2:
            raise ValueError("GRPO needs samples_per_prompt >= 2 (a group per prompt)")


class DDPO(LatentActorCritic):
    """DDPO with per-prompt reward statistics.

    Args:
        estimator: defaults to :class:`~lit_diffac.estimators.PerPromptStats` (buffer 32, min count 16, clip 5).
        (all other arguments: :class:`LatentActorCritic`)
    """

    def __init__(self, *args, estimator: AdvantageEstimator | None = None, **kwargs) -> None:
        super().__init__(*args, estimator=estimator or PerPromptStats(), **kwargs)
