"""What the critic caches per (image, step), from the real models' shapes and measured on tiny SD pipelines.

The critic replay keeps, for every step of the recent rollouts, the tapped features as the value head reads them
after its parameter-free pooling (``ValueHead.compress``).  Issue 16's bound: at most 1 MB per (image, step) at
SD3.5-Medium's shapes (3 taps of 1,024 tokens × 1,536 channels, 512 px).  The tap shapes here come from a forward
pass of the real-width denoisers on the meta device (no memory, no compute), the head settings from the recipes.
"""

from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.sd_scaled import sd15_shape, sd35m_shape
from lit_diffac.critic_replay import CriticReplay
from lit_diffac.value_heads import ValueHead

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _tap_shapes(family: str) -> list[torch.Size]:
    """Per-image tap outputs of the recipe's taps, from a meta-device forward at 512 px (64×64 latents)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    shapes: dict[str, torch.Size] = {}

    def record(name):
        def hook(_module, _inputs, output):
            image = output[1] if family == "sd35m" else (output[0] if isinstance(output, tuple) else output)
            shapes.setdefault(name, image.shape[1:])  # DiT taps: the image tokens (the backbone's choice)
        return hook

    with torch.device("meta"):
        if family == "sd35m":  # every SD3.5-M block has the same output shape: one block stands for taps 7/15/23
            model = SD3Transformer2DModel(**sd35m_shape(blocks=1, quick=False)["transformer"])
            model.transformer_blocks[0].register_forward_hook(record("block"))
            model(hidden_states=torch.empty(1, 16, 64, 64), encoder_hidden_states=torch.empty(1, 333, 4096),
                  pooled_projections=torch.empty(1, 2048), timestep=torch.empty(1))
            return [shapes["block"]] * 3
        shape = sd15_shape(layers=1, quick=False)
        model = UNet2DConditionModel(**shape["unet"])
        for name in shape["taps"]:
            model.get_submodule(name).register_forward_hook(record(name))
        model(torch.empty(1, 4, 64, 64), torch.empty(1), encoder_hidden_states=torch.empty(1, 77, 768))
        return [shapes[name] for name in shape["taps"]]


def _recipe_head(family: str) -> dict:
    recipe = ROOT / "recipes" / ("sd35/pickscore.yaml" if family == "sd35m" else "sd15/pickscore.yaml")
    return yaml.safe_load(recipe.read_text())["model"]["init_args"]["value_head"]["init_args"]


def _replay_bytes(shapes: list[torch.Size], head: ValueHead, steps: int = 40, pooled_dim: int = 2048) -> float:
    """Bytes per (image, step) that :class:`CriticReplay` keeps for one image of ``steps`` steps (meta tensors)."""
    features = [head.compress(torch.empty(steps, *shape, device="meta", dtype=torch.bfloat16))[None]
                for shape in shapes]
    replay = CriticReplay()  # the recipes' storage: bf16
    targets = torch.empty(1, steps, 1, device="meta")
    replay.add(features, torch.empty(1, pooled_dim, device="meta"), targets, targets)
    return replay.bytes_per_pair()


@pytest.mark.parametrize("family, unpooled, pooled", [
    ("sd35m", 3 * 1024 * 1536 * 2, 3 * 64 * 1536 * 2),               # 9.44 MB → 0.59 MB (32×32 → 8×8 tokens)
    ("sd15", (640 * 16 * 16 + 1280 * 8 * 8 + 1280 * 32 * 32) * 2,     # 3.11 MB → 0.78 MB (maps pooled 2×2)
     (640 * 8 * 8 + 1280 * 4 * 4 + 1280 * 16 * 16) * 2),
])
def test_the_replay_keeps_at_most_1_mb_per_image_and_step_at_sd_shapes(family, unpooled, pooled):
    shapes = _tap_shapes(family)
    if family == "sd35m":
        assert shapes == [torch.Size([1024, 1536])] * 3
    settings = _recipe_head(family)
    head = ValueHead([s[-1] if family == "sd35m" else s[0] for s in shapes], text_dim=2048, **settings)
    head.token_grid = (32, 32)  # what DiTBackbone.feature_grid gives at 64×64 latents, patch 2
    extra = (2048 * 4) / 40 + 2 * 4  # the prompt embedding shared over 40 steps; target and old value (fp32)
    assert _replay_bytes(shapes, head) == pytest.approx(pooled + extra)
    assert _replay_bytes(shapes, head) <= MB  # the recipes' setting is within the bound
    head.patch_size = 1
    assert _replay_bytes(shapes, head) == pytest.approx(unpooled + extra) and unpooled > MB  # without pooling


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_the_replay_measured_on_a_tiny_pipeline_matches_the_shapes(family, sd_pipelines):
    """One rollout of a tiny SD pipeline through the module: the stored features are the head's pooled taps."""
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.evaluation import HeldOutEvaluation
    from lit_diffac.modules import LatentActorCritic
    from lit_diffac.rewards.base import CallableReward

    backbone = (DiTBackbone if family == "sd3" else UNetBackbone)(
        str(sd_pipelines[family]), feature_taps=[0, 1] if family == "sd3" else ["down_blocks.1", "mid_block"])
    module = LatentActorCritic(
        backbone=backbone, rewards=[CallableReward(lambda images, prompts, **_: images.mean((1, 2, 3)), name="b")],
        value_head=lambda dims, text, outputs: ValueHead(dims, text, outputs, dim=32, patch_size=2),
        critic_replay=CriticReplay(iterations=2, passes=1), train_prompts=["a cat", "a dog"], batch_size=2,
        minibatch_size=4, evaluation=HeldOutEvaluation(prompts=["a cat"], samples_per_prompt=1))
    generator = torch.Generator().manual_seed(0)
    rollout = module.roll_out(module.sample_prompts(generator), generator)
    rollout.rewards = module.score(rollout.images, rollout.prompts)
    with torch.no_grad():
        raw = backbone(rollout.latents[:, 0], module.sampler.timestep_for(torch.zeros(2, dtype=torch.long)),
                       rollout.embeds).features  # the first step's taps, unpooled
    module.update(rollout, *module.build_optimizers())
    entry = module.critic_replay.entries[-1]
    steps = module.sampler.num_steps
    for stored, tap in zip(entry.features, raw):
        if family == "sd3":  # tokens on the backbone's grid, pooled 2×2
            rows, cols = backbone.feature_grid
            assert tap.shape[1] == rows * cols
            expected = (2, steps, tap.shape[1] // 4, tap.shape[2])
        else:  # maps pooled 2×2 (a 1×1 map stays 1×1)
            expected = (2, steps, tap.shape[1], -(-tap.shape[2] // 2), -(-tap.shape[3] // 2))
        assert tuple(stored.shape) == expected and stored.dtype == torch.bfloat16
        assert torch.allclose(stored[:, 0].float(), module.value_head.compress(tap).bfloat16().float())
    pooled_bytes = sum(f[0, 0].numel() * 2 for f in entry.features)
    assert module.critic_replay.bytes_per_pair() == pytest.approx(
        pooled_bytes + (rollout.embeds.pooled.shape[1] * 4) / steps + 2 * 4)


def test_the_replay_can_live_in_host_memory_and_fits_on_the_compute_device():
    replay = CriticReplay(storage_dtype=None, device="meta")  # "elsewhere": the features' device is the CPU
    features, targets = [torch.randn(2, 3, 4, 5)], torch.randn(2, 3, 1)
    replay.add(features, torch.randn(2, 6), targets, targets)
    assert replay.entries[-1].features[0].device.type == "meta" and replay.compute_device == torch.device("cpu")
