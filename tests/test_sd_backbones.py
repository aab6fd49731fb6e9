"""SD1.5- and SD3-format backbones on tiny random pipeline folders: loading, text encoders, taps, precision,
gradient checkpointing, chunked decoding, the critic adapter and classifier-free guidance with a negative prompt."""

from __future__ import annotations

import shutil

import pytest
import torch

from lit_diffac.backbones import DiTBackbone, UNetBackbone
from lit_diffac.errors import PipelineNotFoundError
from lit_diffac.tiny_pipelines import T5_MAX_LENGTH

PROMPTS = ["a photo of a cat", 'a red sign saying "hi" on the road', ""]


def _inputs(backbone, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *backbone.latent_shape, generator=g)
    timesteps = torch.tensor([900.0, 500.0, 20.0])[:n]
    return latents, timesteps, backbone.encode_prompts(PROMPTS[:n])


# ------------------------------------------------------------------------------------------ SD3 text encoders

@pytest.mark.parametrize("use_t5", [True, False])
def test_sd3_prompt_embeds_equal_the_pipelines_encode_prompt(sd_pipelines, use_t5):
    from diffusers import StableDiffusion3Pipeline

    folder = sd_pipelines["sd3"]
    backbone = DiTBackbone(str(folder), max_sequence_length=T5_MAX_LENGTH, use_t5=use_t5)
    extra = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **extra)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_MAX_LENGTH)
    embeds = backbone.encode_prompts(PROMPTS)
    # 77 CLIP tokens + the T5 tokens; CLIP 32 + 32 channels zero-padded to the T5 width 64
    assert embeds.hidden.shape == hidden.shape == (3, 77 + T5_MAX_LENGTH, 64)
    assert embeds.pooled.shape == pooled.shape == (3, 64)
    # the backbone encodes the unique prompts as one sorted batch: equal up to batch-order rounding
    torch.testing.assert_close(embeds.hidden, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.pooled, pooled, rtol=0, atol=1e-5)
    t5_part = embeds.hidden[:, 77:]
    assert (t5_part.abs().sum() > 0) == use_t5  # zeros without T5, as the pipeline does
    assert hasattr(backbone, "text_encoder_3") == use_t5


def test_without_t5_the_t5_folder_is_never_read(sd_pipelines, tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(sd_pipelines["sd3"], folder)
    for f in (folder / "text_encoder_3").iterdir():
        f.write_bytes(b"corrupt")
    DiTBackbone(str(folder), use_t5=False)  # loads: only the needed sub-folders are read
    with pytest.raises(Exception):
        DiTBackbone(str(folder), use_t5=True)


def test_component_loaders_read_each_layout(sd_pipelines):
    from lit_diffac.backbones.loading import load_dit_components, load_unet_components

    sd3 = load_dit_components(str(sd_pipelines["sd3"]), use_t5=False)
    assert set(sd3.extra_text) == {"text_encoder_2", "tokenizer_2"} and sd3.vae is not None
    assert set(load_dit_components(str(sd_pipelines["sd3"])).extra_text) == {
        "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"}
    backbone = DiTBackbone(sd3, max_sequence_length=T5_MAX_LENGTH)  # in-memory components: nothing loaded
    assert backbone.is_sd3 and backbone.pretrained is None and not hasattr(backbone, "text_encoder_3")
    sd15 = load_unet_components(str(sd_pipelines["sd15"]))
    assert type(sd15.scheduler).__name__ == "DDIMScheduler" and not sd15.extra_text
    assert UNetBackbone.from_components(sd15).vae_scaling_factor == 0.18215


def test_sd3_prediction_is_the_transformer_call_of_the_pipeline(sd_pipelines):
    backbone = DiTBackbone(str(sd_pipelines["sd3"]), feature_taps=[1, 3], max_sequence_length=T5_MAX_LENGTH)
    latents, t, embeds = _inputs(backbone)
    out = backbone(latents, t, embeds)
    expected = backbone.denoiser(hidden_states=latents, encoder_hidden_states=embeds.hidden,
                                 pooled_projections=embeds.pooled, timestep=t).sample
    torch.testing.assert_close(out.prediction, expected, rtol=0, atol=0)
    assert [f.shape for f in out.features] == [(3, 16, 32)] * 2 and backbone.feature_dims == [32, 32]
    assert backbone.decode(latents).shape == (3, 3, 16, 16)


# ------------------------------------------------------------------------------------------ UNet taps

def test_sd15_named_block_taps_report_their_widths(sd_pipelines):
    backbone = UNetBackbone(str(sd_pipelines["sd15"]), feature_taps=["down_blocks.1", "mid_block", "up_blocks.1"])
    latents, t, embeds = _inputs(backbone)
    out = backbone(latents, t, embeds)
    assert [f.shape[1] for f in out.features] == backbone.feature_dims == [32, 32, 16]
    assert out.prediction.shape == latents.shape and out.prediction.dtype == torch.float32
    assert backbone.decode(latents).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("tap", ["down_blocks.7", "up_blocks", "conv_in.weight"])
def test_bad_unet_taps_fail_clearly(sd_pipelines, tap):
    with pytest.raises(ValueError, match="feature tap"):
        UNetBackbone(str(sd_pipelines["sd15"]), feature_taps=[tap])


def test_dit_taps_out_of_range_fail_clearly(sd_pipelines):
    DiTBackbone(str(sd_pipelines["sd3"]), feature_taps=[7, 15, 23])  # SD3.5-M's taps: the tiny model has 24 blocks
    with pytest.raises(ValueError, match="out of range: this transformer has 24 blocks"):
        DiTBackbone(str(sd_pipelines["sd3"]), feature_taps=[7, 24])


# ------------------------------------------------------------------------------------------ loading

def test_a_missing_folder_says_where_to_put_the_weights(tmp_path):
    with pytest.raises(PipelineNotFoundError, match="put a diffusers pipeline there") as err:
        DiTBackbone(str(tmp_path / "weights" / "sd35"))
    assert "\n" not in str(err.value)


def test_an_unreachable_hub_id_gives_one_line_with_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineNotFoundError, match="hf download nobody-here/no-such-pipeline") as err:
        UNetBackbone("nobody-here/no-such-pipeline")
    assert "\n" not in str(err.value)


def test_a_folder_without_a_component_names_it(sd_pipelines, tmp_path):
    folder = tmp_path / "sd15"
    shutil.copytree(sd_pipelines["sd15"], folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="has no 'text_encoder/' folder"):
        UNetBackbone(str(folder))


# ------------------------------------------------------------------------------------------ precision

def test_bf16_weights_keep_lora_and_outputs_float32(sd_pipelines):
    full = DiTBackbone(str(sd_pipelines["sd3"]), lora_rank=4, max_sequence_length=T5_MAX_LENGTH)
    half = DiTBackbone(str(sd_pipelines["sd3"]), lora_rank=4, max_sequence_length=T5_MAX_LENGTH,
                       weights_dtype="bfloat16")
    assert half.text_encoder.dtype == half.text_encoder_3.dtype == half.vae.dtype == torch.bfloat16
    assert half.autocast_dtype == torch.bfloat16  # defaults to the weights' dtype
    base = [p for n, p in half.denoiser.named_parameters() if "lora_" not in n]
    lora = [p for n, p in half.denoiser.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.bfloat16 for p in base) and lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.float32 for p in half.policy_parameters())
    latents, t, _ = _inputs(full)
    ref = full(latents, t, full.encode_prompts(PROMPTS)).prediction
    out = half(latents, t, half.encode_prompts(PROMPTS))
    assert out.prediction.dtype == torch.float32 and all(f.dtype == torch.float32 for f in out.features)
    assert half.encode_prompts(PROMPTS).pooled.dtype == torch.float32
    err = (out.prediction - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1, err  # bf16 rounding, not a different model
    out.prediction.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in half.policy_parameters())


def test_low_precision_weights_need_lora(sd_pipelines):
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        UNetBackbone(str(sd_pipelines["sd15"]), weights_dtype="bf16")
    with pytest.raises(ValueError, match="unknown dtype"):
        UNetBackbone(str(sd_pipelines["sd15"]), lora_rank=2, weights_dtype="float8")


def test_guidance_below_one_is_refused(sd_pipelines):
    with pytest.raises(ValueError, match=r"cfg_scale must be >= 1 \(1 = no guidance; got 0.5\)"):
        DiTBackbone(str(sd_pipelines["sd3"]), cfg_scale=0.5)


# ------------------------------------------------------------------------------------------ checkpointing, decode

@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gradient_checkpointing_gives_the_same_gradients(sd_pipelines, family):
    cls, taps = (UNetBackbone, ["down_blocks.1", "mid_block"]) if family == "sd15" else (DiTBackbone, [1, 2])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = cls(str(sd_pipelines[family]), feature_taps=taps, lora_rank=2,
                       gradient_checkpointing=checkpointing).train()
        assert backbone.denoiser.is_gradient_checkpointing == checkpointing
        latents, t, embeds = _inputs(backbone)
        out = backbone(latents, t, embeds)
        (out.prediction.pow(2).mean() + sum(f.mean() for f in out.features)).backward()
        assert backbone.taps._captured == {}  # recomputation in backward recorded nothing
        grads.append(torch.cat([p.grad.flatten() for p in backbone.policy_parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_vae_decode_in_chunks_equals_one_batch(sd_pipelines):
    whole = UNetBackbone(str(sd_pipelines["sd15"]))
    chunked = UNetBackbone(str(sd_pipelines["sd15"]), vae_decode_batch=2)
    latents = torch.randn(5, *whole.latent_shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked.decode(latents), whole.decode(latents), rtol=0, atol=1e-5)


def test_resolution_sets_the_latent_size(sd_pipelines):
    backbone = UNetBackbone(str(sd_pipelines["sd15"]), resolution=32)
    assert backbone.vae_scale_factor == 2 and backbone.latent_shape == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        UNetBackbone(str(sd_pipelines["sd15"]), resolution=33)


def test_prompt_cache_is_bounded(sd_pipelines):
    backbone = UNetBackbone(str(sd_pipelines["sd15"]), max_cached_prompts=2)
    first = backbone.encode_prompts(PROMPTS)
    assert len(backbone._prompt_cache) == 2
    torch.testing.assert_close(backbone.encode_prompts(PROMPTS).hidden, first.hidden, rtol=0, atol=0)


def test_prompt_embeddings_do_not_depend_on_the_batch():
    """A prompt's embedding is the same whichever prompts it is encoded with (exact resume needs this: a resumed
    run's cache starts empty).  Encoded together, the toy DiT's pooled embeddings differ by ~1e-6."""
    from lit_diffac.data.prompts import load_prompts

    backbone = DiTBackbone("toy-dit")
    prompts = sorted(set(load_prompts("toy:train")))
    alone = [backbone.encode_prompts([p]) for p in prompts[:12]]
    backbone.clear_prompt_cache()
    together = backbone.encode_prompts(prompts)
    for i, embeds in enumerate(alone):
        assert torch.equal(embeds.hidden[0], together.hidden[i]) and torch.equal(embeds.pooled[0], together.pooled[i])


# ------------------------------------------------------------------------------------------ critic adapter

def _randomise(backbone, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_critic_adapter_leaves_the_policy_output_alone(sd_pipelines, family):
    cls, taps = (UNetBackbone, ["mid_block"]) if family == "sd15" else (DiTBackbone, [1])
    torch.manual_seed(0)
    plain = cls(str(sd_pipelines[family]), feature_taps=taps, lora_rank=2)
    torch.manual_seed(0)
    split = cls(str(sd_pipelines[family]), feature_taps=taps, lora_rank=2, critic_lora_rank=2)
    _randomise(plain, "policy", 1)
    _randomise(split, "policy", 1)
    _randomise(split, "critic", 2)
    latents, t, embeds = _inputs(plain)
    ref = plain(latents, t, embeds)
    out = split(latents, t, split.encode_prompts(PROMPTS))
    torch.testing.assert_close(out.prediction, ref.prediction, rtol=0, atol=1e-6)  # the policy is unchanged
    assert (out.features[0] - ref.features[0]).abs().max() > 1e-3  # the critic reads its own adapter's features
    policy, critic = split.policy_parameters(), split.critic_parameters()
    assert critic and not {id(p) for p in policy} & {id(p) for p in critic}
    out.features[0].pow(2).mean().backward()  # a value loss
    assert all(p.grad is None for p in policy) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic)
    split.zero_grad(set_to_none=True)
    out = split(latents, t, split.encode_prompts(PROMPTS))
    out.prediction.pow(2).mean().backward()  # a policy loss
    assert all(p.grad is None for p in critic) and any(p.grad is not None for p in policy)


def test_disabled_adapters_give_the_base_model_with_a_critic_adapter(sd_pipelines):
    torch.manual_seed(0)
    base = DiTBackbone(str(sd_pipelines["sd3"]), feature_taps=[1])
    torch.manual_seed(0)
    split = DiTBackbone(str(sd_pipelines["sd3"]), feature_taps=[1], lora_rank=2, critic_lora_rank=2)
    _randomise(split, "policy", 1)
    latents, t, embeds = _inputs(base)
    split.denoiser.disable_adapters()  # how the KL term gets the reference policy
    try:
        reference = split(latents, t, embeds).prediction
    finally:
        split.denoiser.enable_adapters()
    torch.testing.assert_close(reference, base(latents, t, embeds).prediction, rtol=0, atol=1e-6)
    assert (split(latents, t, embeds).prediction - reference).abs().max() > 1e-3


def test_critic_lora_needs_policy_lora(sd_pipelines):
    with pytest.raises(ValueError, match="critic_lora_rank needs a LoRA policy"):
        DiTBackbone(str(sd_pipelines["sd3"]), critic_lora_rank=2)


# ------------------------------------------------------------------------------------------ CFG, negative prompt

def test_negative_prompt_is_the_unconditional_branch(sd_pipelines):
    from lit_diffac.evaluation import default_sampler
    from lit_diffac.rollout import collect_rollout, denoise

    backbone = DiTBackbone(str(sd_pipelines["sd3"]), max_sequence_length=T5_MAX_LENGTH)
    sampler = default_sampler(backbone, num_steps=2)

    def run(negative_prompt="", **kw):
        backbone.negative_prompt = negative_prompt
        return collect_rollout(backbone, sampler, PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kw)

    plain, blurry = run(cfg_scale=3.0), run(cfg_scale=3.0, negative_prompt="blurry")
    assert (plain.latents[:, 1] - blurry.latents[:, 1]).abs().max() > 1e-4
    torch.testing.assert_close(run(negative_prompt="blurry").latents, run().latents)  # no CFG: no effect
    assert DiTBackbone(str(sd_pipelines["sd3"]), negative_prompt="blurry").negative_prompt == "blurry"
    # the first step of the guided rollout is u + s (c − u) with u from the negative prompt
    x0, t = blurry.latents[:, 0], sampler.timestep_for(torch.zeros(2, dtype=torch.long))
    neg = backbone.encode_prompts(["blurry"] * 2)
    u, c = backbone(x0, t, neg).prediction, backbone(x0, t, blurry.embeds).prediction
    guided, _ = denoise(backbone, x0, t, blurry.embeds, 3.0, neg)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_fsdp_wrap_policy_wraps_one_unit_per_block(sd_pipelines):
    from lit_diffac.distributed import diffusion_block_wrap_policy

    dit = DiTBackbone(str(sd_pipelines["sd3"])).denoiser
    unet = UNetBackbone(str(sd_pipelines["sd15"])).denoiser
    assert sum(diffusion_block_wrap_policy(m, False, 0) for m in dit.modules()) == 24
    assert sum(diffusion_block_wrap_policy(m, False, 0) for m in unet.modules()) == 2 + 1 + 2  # down, mid, up
    assert diffusion_block_wrap_policy(dit, True, 0)  # recursion always continues


def test_value_pretraining_refuses_a_critic_adapter_it_would_not_save(sd_pipelines):
    from lit_diffac.modules import ValuePretraining
    from lit_diffac.rewards import Brightness

    backbone = DiTBackbone(str(sd_pipelines["sd3"]), lora_rank=2, critic_lora_rank=2)
    with pytest.raises(ValueError, match="saves only the value head, not a critic adapter"):
        ValuePretraining(backbone=backbone, rewards=[Brightness()], value_gradient="critic_lora",
                         train_prompts=["a cat"])


def test_critic_lora_value_gradient_and_backbone_go_together(sd_pipelines):
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards import Brightness

    backbone = DiTBackbone(str(sd_pipelines["sd3"]), lora_rank=2)
    with pytest.raises(ValueError, match="critic_lora_rank > 0 go together"):
        LatentActorCritic(backbone=backbone, rewards=[Brightness()], value_gradient="critic_lora",
                          train_prompts=["a cat"])


@pytest.mark.parametrize("name, local", [("stabilityai/stable-diffusion-3.5-medium", False),
                                         ("stable-diffusion-v1-5/stable-diffusion-v1-5", False)])
def test_only_owner_slash_name_goes_to_the_hub(name, local):
    from lit_diffac.backbones.loading import locate_pipeline

    assert locate_pipeline(name, ("unet",)) == (name, local)


@pytest.mark.parametrize("name", ["weights/sd/v15", "./weights/sd15", "/models/sd15", "~/sd15"])
def test_path_like_names_never_go_to_the_hub(name):
    from lit_diffac.backbones.loading import locate_pipeline

    with pytest.raises(PipelineNotFoundError, match="no pipeline folder at"):
        locate_pipeline(name, ("unet",))


def test_sd15_folder_reads_as_a_ddim_scheduler_without_clipping(sd_pipelines):
    backbone = UNetBackbone(str(sd_pipelines["sd15"]))
    assert type(backbone.scheduler).__name__ == "DDIMScheduler" and backbone.scheduler.config.clip_sample is False
    assert backbone.vae_scaling_factor == 0.18215
