"""Lightning modules: the actor-critic and its relatives, and toy base-model pretraining."""

from lit_diffac.modules.actor_critic import LatentActorCritic
from lit_diffac.modules.baselines import DDPO, GRPO
from lit_diffac.modules.multi_reward import MultiRewardActorCritic
from lit_diffac.modules.toy_pretrain import ToyBasePretraining
from lit_diffac.modules.value_pretrain import ValuePretraining

__all__ = ["LatentActorCritic", "GRPO", "DDPO", "MultiRewardActorCritic", "ValuePretraining", "ToyBasePretraining"]
