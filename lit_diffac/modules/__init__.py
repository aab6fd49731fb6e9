"""Lightning modules: the actor-critic and its relatives, and toy base-model pretraining."""

from lit_diffac.modules.actor_critic import LatentActorCritic
from lit_diffac.modules.toy_pretrain import ToyBasePretraining

__all__ = ["LatentActorCritic", "ToyBasePretraining"]
