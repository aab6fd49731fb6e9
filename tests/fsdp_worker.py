"""2-process FSDP runs of the actor-critic on the toy DiT with LoRA (CPU, gloo), recorded for ``tests/test_fsdp.py``.

Run as ``python tests/fsdp_worker.py OUT_DIR``; Lightning's launcher starts the second process by re-running this
script, and the later ``Trainer``\\ s of the script reuse both processes.  Four runs, each writing
``OUT_DIR/<run>_rank{r}.pt``:

* ``first``: FSDP, 2 iterations, a sharded checkpoint (``state_dict_type="sharded"``) in ``OUT_DIR/first/``;
* ``resumed``: FSDP, resumed from ``first``'s ``last.ckpt`` for iterations 3 and 4;
* ``whole``: FSDP, 4 iterations in one go;
* ``full_shard``: FSDP with ``FULL_SHARD`` (the others: ``SHARD_GRAD_OP``), 2 iterations;
* ``ddp``: DDP, 2 iterations, the same configuration (the reference for what FSDP computes).

Each record holds the iterations' metrics, every trainable weight and the reward statistics gathered whole on
each rank (FSDP: ``summon_full_params``) before and after training, and each rank's own optimiser states (FSDP:
its shards).

The FSDP runs use Lightning's ``FSDPStrategy`` and the library's ``configure_model`` sharding
(:func:`lit_diffac.distributed.shard_module`), with one test-only difference: Lightning accepts FSDP on GPUs only,
so :class:`CPUFSDPStrategy` is a subclass (Lightning's check tests the exact class) that also gives torch's FSDP
``device_id=cpu`` (Lightning passes the CUDA device index, ``None`` on CPU, which FSDP refuses there).
"""

from __future__ import annotations

import faulthandler
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lit_diffac.backbones import DiTBackbone
from lit_diffac.checkpoints import guard_strategy, safe_checkpoint_plugins
from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules import LatentActorCritic
from lit_diffac.rewards import DigitAlignment
from lit_diffac.samplers import FlowSDESampler

LORA_RANK = 2
MAX_GRAD_NORM = 0.02  # below the gradient norms of both groups: clipping acts in every minibatch


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), for this test only (see the module docstring)."""

    @contextmanager
    def model_sharded_context(self):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload,
                         mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
                         device_id=self.root_device, **self.kwargs):
            yield


Module = LatentActorCritic


def whole_state(module: LatentActorCritic) -> dict[str, torch.Tensor]:
    """Every trainable weight (whole, also under FSDP) and the reward statistics, copied."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with ExitStack() as stack:
        for unit in (module.backbone.denoiser, module.value_head):
            if isinstance(unit, FullyShardedDataParallel):
                stack.enter_context(FullyShardedDataParallel.summon_full_params(unit, writeback=False))
        state = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                 for name, p in module.named_parameters() if p.requires_grad}
    state.update({f"reward_normalizer.{n}": b.clone() for n, b in module.reward_normalizer.named_buffers()})
    return state


class Record(Callback):
    """Writes ``OUT_DIR/<run>_rank{r}.pt`` at the end of a fit (see the module docstring)."""

    def __init__(self, out: Path, run: str) -> None:
        self.out, self.run, self.metrics, self.before = out, run, [], None

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = whole_state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.metrics.append({k: v for k, v in pl_module.last_metrics.items() if not k.startswith("perf/")})

    def on_train_end(self, trainer, pl_module) -> None:
        optimizers = [opt.state_dict() for opt in trainer.optimizers]
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size,
                    "strategy": type(trainer.strategy).__name__,
                    "sharding": str(getattr(trainer.strategy, "sharding_strategy", None)), "max_grad_norm": MAX_GRAD_NORM,
                    "metrics": self.metrics, "before": self.before, "after": whole_state(pl_module),
                    "optimizers": optimizers, "denoiser": type(pl_module.backbone.denoiser).__name__,
                    "value_head": type(pl_module.value_head).__name__},
                   self.out / f"{self.run}_rank{trainer.global_rank}.pt")


def fit(out: Path, run: str, strategy, epochs: int, ckpt_path: Path | None = None) -> None:
    L.seed_everything(0)
    module = Module(
        backbone=DiTBackbone("toy-dit", feature_taps=[1, 3], lora_rank=LORA_RANK), rewards=[DigitAlignment()],
        sampler=FlowSDESampler(num_steps=3, noise_level=0.7), batch_size=4, minibatch_size=6, seed=0,
        actor_lr=1e-2, critic_lr=1e-2, max_grad_norm=MAX_GRAD_NORM,
        evaluation=HeldOutEvaluation(prompts=["a handwritten digit 3"], samples_per_prompt=1, diversity=False))
    checkpoints = [ModelCheckpoint(dirpath=out / run, save_last=True)] if run == "first" else []
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", max_epochs=epochs, logger=False,
                        callbacks=[Record(out, run), *checkpoints], enable_checkpointing=bool(checkpoints),
                        plugins=safe_checkpoint_plugins(None, strategy, "cpu"),  # as LitDiffacCLI does
                        enable_progress_bar=False, enable_model_summary=False)
    guard_strategy(trainer.strategy)  # as LitDiffacCLI does: checkpoints are read weights-only
    trainer.fit(module, ckpt_path=ckpt_path)


def main() -> None:
    faulthandler.dump_traceback_later(float(sys.argv[2]) if len(sys.argv) > 2 else 240, exit=True)  # no hang
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    fsdp = lambda sharding="SHARD_GRAD_OP": CPUFSDPStrategy(sharding_strategy=sharding,  # noqa: E731
                                                            state_dict_type="sharded")
    fit(out, "first", fsdp(), 2)
    fit(out, "resumed", fsdp(), 4, ckpt_path=out / "first" / "last.ckpt")
    fit(out, "whole", fsdp(), 4)
    fit(out, "full_shard", fsdp("FULL_SHARD"), 2)
    fit(out, "ddp", DDPStrategy(find_unused_parameters=True), 2)


if __name__ == "__main__":
    main()
