"""Value pretraining: fit the critic on the initial policy's rollouts before PPO (DESIGN §6).

The policy is frozen (no actor optimiser, its weights stay bit-identical); each iteration rolls out the
initial policy, scores it and regresses the value head on the Monte-Carlo returns (γ = λ = 1: the
standardised final reward at every step).  At the end the head is written to ``output_path`` (by default
``value_head.safetensors`` in the run's log folder, e.g. ``runs/value_pretrain_dit/version_0/``, so a rerun
does not overwrite it) and its path printed, so an actor-critic recipe can start from it with
``value_head: ... init_from: <that path>``.  The paper found ~15 iterations help and much longer pretraining
hurts.
"""

from __future__ import annotations

from pathlib import Path

from lit_diffac.estimators import CriticGAE
from lit_diffac.modules.actor_critic import LatentActorCritic
from lit_diffac.ppo import build_optimizer
from lit_diffac.value_heads.io import save_value_head


class ValuePretraining(LatentActorCritic):
    """Critic-only training on rollouts of the frozen initial policy.

    Takes every :class:`LatentActorCritic` argument (backbone, rewards, sampler, value head, ...) plus:

    Args:
        output_path: where the trained value head is saved (safetensors); ``None``: ``value_head.safetensors``
            in the run's log folder (``trainer.log_dir``, e.g. ``runs/<recipe>/version_<n>/``).
    """

    #: File name of the value head in the run's log folder when no ``output_path`` is given.
    DEFAULT_FILENAME = "value_head.safetensors"

    def __init__(self, *args, output_path: str | None = None, **kwargs) -> None:
        kwargs.setdefault("estimator", CriticGAE(gamma=1.0, lam=1.0))
        super().__init__(*args, **kwargs)
        if self.value_head is None:
            raise ValueError("ValuePretraining needs an estimator with a critic (e.g. CriticGAE)")
        if self.backbone.critic_lora_rank:
            raise ValueError("ValuePretraining saves only the value head, not a critic adapter: pretrain with "
                             "critic_lora_rank: 0 (and value_gradient: detached)")
        self.output_path = output_path
        self.backbone.requires_grad_(False)

    def resolved_output_path(self) -> str:
        """``output_path``, or ``value_head.safetensors`` in the run's log folder when it is ``None``."""
        if self.output_path is not None:
            return self.output_path
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        return str(Path(log_dir or "runs") / self.DEFAULT_FILENAME)

    def trains_actor(self) -> bool:
        return False

    def build_optimizers(self):
        return None, build_optimizer(self.optimizer_factory, list(self.value_head.parameters()), self.hparams.critic_lr)

    def actor_critic_optimizers(self):
        return None, self.optimizers()

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_value_head(self.value_head, self.resolved_output_path(), iterations=self.current_epoch,
                                   rewards=self.reward_names, backbone=self.backbone.pretrained)
            self.print(f"saved value head to {Path(path).resolve()} (start PPO from it with "
                       f"--model.init_args.value_head.init_args.init_from={Path(path).resolve()})")
