"""GRPO and DDPO modules on the shared machinery, and the KL to the reference policy."""

import lightning as L
import pytest
import torch

from lit_diffac.evaluation import HeldOutEvaluation
from lit_diffac.modules import DDPO, GRPO, LatentActorCritic
from lit_diffac.rewards.base import CallableReward

SMALL = dict(batch_size=4, minibatch_size=20)


def small(**kw):
    return {**SMALL, "evaluation": HeldOutEvaluation(prompts=["the digit 1"], samples_per_prompt=1), **kw}


def _bright(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def _fit(module, tmp_path, epochs=1):
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path).fit(module)
    return module


def test_grpo_groups_prompts_and_trains_without_critic(dit_backbone, tmp_path):
    module = GRPO(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")], samples_per_prompt=2, **small())
    assert module.value_head is None
    prompts = module.sample_prompts(torch.Generator().manual_seed(0))
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]
    before = [p.detach().clone() for p in module.backbone.policy_parameters()]
    _fit(module, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.backbone.policy_parameters()))
    assert "train/explained_variance" not in module.last_metrics


def test_ddpo_trains_without_critic(dit_backbone, tmp_path):
    module = DDPO(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")], **small())
    assert module.value_head is None
    _fit(module, tmp_path)
    assert module.last_metrics["train/policy_loss"] == module.last_metrics["train/policy_loss"]  # finite


def test_validation(dit_backbone):
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        GRPO(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")], samples_per_prompt=3, **small())
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        LatentActorCritic(backbone=dit_backbone, rewards=[CallableReward(_bright, name="b")], kl_coef=0.1, **small())


def test_kl_is_zero_when_adapter_equals_reference(toy_pipelines):
    """A fresh LoRA (zero up-projections) equals the base model: KL 0; after a change it is positive."""
    from lit_diffac.backbones import DiTBackbone
    from lit_diffac.rollout import collect_rollout

    backbone = DiTBackbone(str(toy_pipelines["dit"]), lora_rank=4)
    module = GRPO(backbone=backbone, rewards=[CallableReward(_bright, name="b")], kl_coef=0.1, **small())
    generator = torch.Generator().manual_seed(0)
    prompts = module.sample_prompts(generator)
    r = collect_rollout(backbone, module.sampler, prompts, generator=generator)
    i, k = torch.arange(4), torch.full((4,), 3)
    _, _, kl = module.forward_step(r.latents[i, k], k, r.embeds[i], r.latents[i, k + 1])
    assert torch.allclose(kl, torch.zeros(4), atol=1e-10)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    _, _, kl = module.forward_step(r.latents[i, k], k, r.embeds[i], r.latents[i, k + 1])
    assert (kl > 0).all()
