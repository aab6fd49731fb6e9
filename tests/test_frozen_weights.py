"""Trainable-only checkpoints: what a checkpoint keeps, exact resume with them, and the base-weights check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_resume import assert_same_state, fit

from lit_diffac.checkpoints import CHECKSUM_KEY
from lit_diffac.errors import CheckpointMismatchError
from lit_diffac.frozen_weights import FROZEN_KEY, frozen_keys, weights_hash
from lit_diffac.modules import LatentActorCritic
from lit_diffac.resume import CHECKPOINT_KEY

LORA = {"lora_rank": 2}


def stored(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    """A toy DiT pipeline of the same architecture as ``toy_pipelines["dit"]`` with other random weights."""
    from lit_diffac.toy.models import build_toy_backbone, save_pipeline

    torch.manual_seed(1)
    return save_pipeline(build_toy_backbone("dit"), tmp_path_factory.mktemp("other") / "dit")


@pytest.mark.parametrize("backbone_kw", [None, LORA], ids=["full", "lora"])
def test_a_checkpoint_keeps_what_training_changes_and_nothing_else(backbone_kw, toy_pipelines, tmp_path):
    module, _, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "run", 1, backbone_kw=backbone_kw)
    state = stored(tmp_path / "run" / "ckpt" / "last.ckpt")
    saved = set(state["state_dict"])
    trainable = {f"backbone.denoiser.{n}" for n, p in module.backbone.denoiser.named_parameters() if p.requires_grad}
    assert trainable and trainable <= saved  # every trained parameter ...
    assert {k for k in module.state_dict() if k.startswith("value_head.")} <= saved  # ... and the critic
    assert not any(k.startswith(("backbone.text_encoder.", "rewards.")) for k in saved)  # no frozen component
    frozen = set(frozen_keys(module, module.trainable_parameters()))
    assert saved == set(module.state_dict()) - frozen
    if backbone_kw:  # LoRA: the denoiser's base weights stay out too
        assert all("lora_" in k for k in saved if k.startswith("backbone."))
    record = state[CHECKPOINT_KEY][FROZEN_KEY]
    backbone_frozen = {k: v for k, v in module.state_dict().items() if k in frozen and k.startswith("backbone.")}
    assert record == {"keys": len(frozen), "sha256": weights_hash(backbone_frozen),
                      "pretrained": str(toy_pipelines["dit"])}


def test_lora_four_iterations_equal_two_plus_resume_plus_two(toy_pipelines, tmp_path):
    pipeline = toy_pipelines["dit"]
    whole, whole_metrics, _ = fit(LatentActorCritic, pipeline, tmp_path, "whole", 4, backbone_kw=LORA)
    _, first_metrics, _ = fit(LatentActorCritic, pipeline, tmp_path, "split", 2, backbone_kw=LORA)
    resumed, resumed_metrics, _ = fit(LatentActorCritic, pipeline, tmp_path, "resumed", 4, backbone_kw=LORA,
                                      ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    assert first_metrics + resumed_metrics == whole_metrics  # bit-exact, floats compared with ==
    assert_same_state(whole, resumed)  # every tensor of the module (frozen ones reloaded from the pipeline)


def test_other_base_weights_are_refused_with_the_reason(toy_pipelines, other_pipeline, tmp_path):
    fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "run", 1, backbone_kw=LORA)
    with pytest.raises(CheckpointMismatchError, match=r"made for other base weights than this recipe loads \(trained "
                       r"on '.*dit', base-weights SHA-256 [0-9a-f]{12}…; loaded here: '.*other.*dit', [0-9a-f]{12}…\)"):
        fit(LatentActorCritic, other_pipeline, tmp_path, "resumed", 2, backbone_kw=LORA,
            ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt")


def test_a_full_checkpoint_of_an_earlier_version_still_resumes(toy_pipelines, tmp_path):
    """Checkpoints written before trainable-only saving hold every tensor and no hash: they load as they are."""
    module, _, trainer = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "run", 1, backbone_kw=LORA)
    old = stored(tmp_path / "run" / "ckpt" / "last.ckpt")
    old["state_dict"] = {k: v.clone() for k, v in module.state_dict().items()}
    del old[CHECKPOINT_KEY][FROZEN_KEY]
    old.pop(CHECKSUM_KEY, None)
    torch.save(old, tmp_path / "old.ckpt")
    resumed, metrics, _ = fit(LatentActorCritic, toy_pipelines["dit"], tmp_path, "resumed", 2, backbone_kw=LORA,
                              ckpt_path=tmp_path / "old.ckpt")
    assert len(metrics) == 1 and resumed.history.samples_seen == 8


def test_hash_depends_on_every_byte_name_and_dtype():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    base = weights_hash(a)
    assert weights_hash({"b": a["b"], "w": a["w"]}) == base  # order-free
    changed = {**a, "w": a["w"].clone()}
    changed["w"][1, 2] = torch.nextafter(changed["w"][1, 2], torch.tensor(100.0))  # one ulp of one weight
    assert weights_hash(changed) != base
    assert weights_hash({**a, "w": a["w"].reshape(3, 2)}) != base
    assert weights_hash({**a, "w": a["w"].double()}) != base
    assert weights_hash({"v": a["w"], "b": a["b"]}) != base
