"""A 2-process DDP run of the actor-critic on the toy DiT (CPU, gloo) that records each rank's statistics.

Run by ``tests/test_distributed.py`` as ``python tests/ddp_worker.py OUT_DIR``; Lightning's DDP launcher starts the
second process by re-running this script.  Each rank writes ``OUT_DIR/rank{r}.pt`` with its prompts, raw rewards,
values, the normalised rewards the estimator received and the advantages / value targets it returned, plus a
checksum of its parameters after the update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from lit_diffac.backbones import DiTBackbone
from lit_diffac.estimators import CriticGAE
from lit_diffac.modules import LatentActorCritic
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.rewards import DigitAlignment
from lit_diffac.samplers import FlowSDESampler


class RecordingEstimator(CriticGAE):
    """CriticGAE that keeps what it was given and what it returned (for the test)."""

    record: dict = {}

    def __call__(self, rewards, values, prompts, weights, gather=None):
        out = super().__call__(rewards, values, prompts, weights, gather=gather)
        self.record.update(normalized=rewards.clone(), values=values.clone(), prompts=list(prompts),
                           advantages=out.advantages.clone(), targets=out.targets.clone())
        return out


class Recorder(LatentActorCritic):
    def update(self, rollout, actor_opt, critic_opt):
        self.estimator.record["raw_rewards"] = rollout.rewards.clone()
        return super().update(rollout, actor_opt, critic_opt)

    def on_train_end(self) -> None:
        record = dict(self.estimator.record, rank=self.global_rank, world_size=self.trainer.world_size,
                      params=torch.cat([p.detach().flatten() for p in self.parameters() if p.requires_grad]))
        torch.save(record, Path(sys.argv[1]) / f"rank{self.global_rank}.pt")


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = Recorder(
        backbone=DiTBackbone("toy-dit", feature_taps=[1, 3]), rewards=[DigitAlignment()],
        sampler=FlowSDESampler(num_steps=3, noise_level=0.7), estimator=RecordingEstimator(),
        evaluation=HeldOutEvaluation(prompts=["a handwritten digit 3"], samples_per_prompt=1), batch_size=4, minibatch_size=6, seed=0)
    trainer = L.Trainer(strategy="ddp", devices=int(sys.argv[2]) if len(sys.argv) > 2 else 2, accelerator="cpu",
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module)


if __name__ == "__main__":
    main()
