import pytest
import torch

from lit_diffac.backbones.loading import resolve_pretrained
from lit_diffac.backbones.dit import DiTBackbone
from lit_diffac.backbones.unet import UNetBackbone


def test_forward_returns_prediction_and_features(backbone):
    embeds = backbone.encode_prompts(["a handwritten digit 3", "the number five"])
    x = torch.randn(2, *backbone.latent_shape)
    out = backbone(x, torch.tensor([999, 500]), embeds)
    assert out.prediction.shape == x.shape
    assert len(out.features) == len(backbone.feature_dims)
    for feature, dim in zip(out.features, backbone.feature_dims):
        assert feature.shape[0] == 2
        assert dim in (feature.shape[1], feature.shape[-1])


def test_features_come_from_the_same_single_pass(backbone):
    calls = []
    backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    embeds = backbone.encode_prompts(["a handwritten digit 3"])
    backbone(torch.randn(1, *backbone.latent_shape), torch.tensor([500]), embeds)
    assert len(calls) == 1


def test_decode_gives_rgb_in_unit_range(backbone):
    images = backbone.decode(torch.randn(2, *backbone.latent_shape) * 3)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


def test_prompt_cache_and_frozen_text_encoder(backbone):
    a = backbone.encode_prompts(["the number seven", "the digit 2"])
    b = backbone.encode_prompts(["the digit 2"])
    assert torch.equal(a.hidden[1], b.hidden[0])
    assert not any(p.requires_grad for p in backbone.text_encoder.parameters())
    assert backbone.policy_parameters() and all(p.requires_grad for p in backbone.policy_parameters())


@pytest.mark.parametrize("cls, family", [(UNetBackbone, "unet"), (DiTBackbone, "dit")])
def test_lora_policy_starts_equal_to_base(cls, family, toy_pipelines):
    base = cls(str(toy_pipelines[family]))
    lora = cls(str(toy_pipelines[family]), lora_rank=4)
    params = lora.policy_parameters()
    assert params and all("lora" in n for n, p in lora.denoiser.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in base.policy_parameters()) / 5
    embeds = base.encode_prompts(["the digit 4"])
    x, t = torch.randn(1, *base.latent_shape), torch.tensor([400])
    assert torch.allclose(base(x, t, embeds).prediction, lora(x, t, embeds).prediction, atol=1e-6)


def test_missing_component_and_unknown_tap_errors(toy_pipelines, tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'unet/' folder"):
        UNetBackbone(str(tmp_path))
    with pytest.raises(ValueError, match="unknown feature taps"):
        UNetBackbone(str(toy_pipelines["unet"]), feature_taps=("not_a_block",))


def test_toy_aliases_resolve_to_shipped_folders():
    for alias in ("toy-unet", "toy-dit"):
        assert resolve_pretrained(alias).endswith(alias)
    assert resolve_pretrained("/some/path") == "/some/path"  # folders and hub ids: locate_pipeline's business


@pytest.mark.parametrize("cls, family, load", [(UNetBackbone, "unet", "load_unet_components"),
                                               (DiTBackbone, "dit", "load_dit_components")])
def test_built_from_loaded_components_equals_loaded_by_name(cls, family, load, toy_pipelines):
    from lit_diffac.backbones import loading

    components = getattr(loading, load)(str(toy_pipelines[family]))
    assert isinstance(components, loading.PipelineComponents) and components.vae is None
    assert not components.extra_text  # the toy layouts have one text encoder
    by_name = cls(str(toy_pipelines[family]))
    by_components = cls(components)
    assert by_name.pretrained == str(toy_pipelines[family]) and by_components.pretrained is None
    assert type(cls.from_components(getattr(loading, load)(str(toy_pipelines[family])))) is cls
    state = by_name.state_dict()
    assert state.keys() == by_components.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in by_components.state_dict().items())
    embeds = by_name.encode_prompts(["the digit 4"])
    x, t = torch.randn(1, *by_name.latent_shape), torch.tensor([400])
    assert torch.equal(by_name(x, t, embeds).prediction, by_components(x, t, embeds).prediction)


def test_toy_backbones_are_built_by_ordinary_construction():
    from lit_diffac.toy.models import build_toy_backbone

    for family, cls in (("unet", UNetBackbone), ("dit", DiTBackbone)):
        backbone = build_toy_backbone(family)
        assert type(backbone) is cls and backbone.pretrained is None
    assert build_toy_backbone("dit").max_sequence_length == 256  # the subclass's __init__ ran too
    with pytest.raises(ValueError, match="family must be 'unet' or 'dit'"):
        build_toy_backbone("vit")


def test_loading_names_stay_importable_from_base():
    from lit_diffac.backbones import base, loading

    for name in ("resolve_pretrained", "locate_pipeline", "hub_has_subfolder", "load_component",
                 "PipelineComponents", "PipelineNotFoundError", "HubUnavailableError"):
        assert getattr(base, name) is getattr(loading, name)
