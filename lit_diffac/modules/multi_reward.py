"""Multi-reward actor-critic: joint optimisation of complementary rewards against reward hacking (DESIGN §5).

Each reward is standardised on its own, gets its own value output on the shared features, its own GAE and
whitening; advantages are then combined by weight, ``A = Σ_i w_i A_i``.  Rewards, explained variance and
evaluation are logged per reward.  ``value_per_reward=False`` fits one head on the weighted sum of the
standardised rewards instead (the paper's ablation says separate heads do better; on the toy, against a
hackable brightness reward, one head on the sum kept the most real alignment: benchmarks/RESULTS.md).

Whitening each reward's advantages before weighting makes reward i's effective weight ``w_i / std(A_i)``
(logged: ``train/advantage_std/<name>``), so a reward its head predicts well counts for more than its weight;
``estimator: CriticGAE(whitening="combined")`` weights first and whitens the sum once, keeping ``w`` as the
trade-off (benchmarks/RESULTS.md, reward hacking).
"""

from __future__ import annotations

from lit_diffac.modules.actor_critic import LatentActorCritic


class MultiRewardActorCritic(LatentActorCritic):
    """:class:`LatentActorCritic` with two or more weighted rewards.

    Args:
        value_per_reward: one value output per reward (default); ``False`` fits a single output on the
            weighted sum of the standardised rewards (the ablation of DESIGN §5).
        (all other arguments: :class:`LatentActorCritic`)

    Example recipe fragment::

        rewards:
          - class_path: lit_diffac.rewards.Brightness
          - class_path: lit_diffac.rewards.DigitAlignment
        reward_weights: [1.0, 1.0]
        value_per_reward: true
    """

    def __init__(self, *args, value_per_reward: bool = True, **kwargs) -> None:
        self.value_per_reward = value_per_reward  # read by num_value_outputs() inside super().__init__
        super().__init__(*args, **kwargs)
        if len(self.rewards) < 2:
            raise ValueError(f"MultiRewardActorCritic needs at least two rewards, got {self.reward_names}; "
                             "use LatentActorCritic for a single reward")

    def num_value_outputs(self) -> int:
        """One value output per reward, or one for the weighted reward sum (``value_per_reward=False``)."""
        return len(self.rewards) if self.value_per_reward else 1
