"""The reward protocol (``lit_diffac.rewards.base``) and the image-statistics rewards."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_diffac.rewards import (
    Brightness,
    CallableReward,
    JpegCompressibility,
    JpegIncompressibility,
    Reward,
    as_reward,
)


def mean_red(images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
    """A plain reward function (also imported by dotted path in a test)."""
    return images[:, 0].mean(dim=(1, 2))


class Recorder(Reward):
    """Scores each image by its mean plus the prompt length; records chunk sizes and metadata."""

    default_name = "recorder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunks: list[int] = []
        self.labels: list[torch.Tensor] = []

    def score(self, images, prompts, labels=None, **metadata):
        self.chunks.append(images.shape[0])
        if labels is not None:
            self.labels.append(labels)
        assert torch.is_grad_enabled() is False
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.float64)
        return images.mean(dim=(1, 2, 3)).double() + lengths


class Returns(Reward):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__(name="fixed")
        self.value = value

    def score(self, images, prompts, **metadata):
        return self.value


def images(n: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompts(n: int = 5) -> list[str]:
    return [f"a handwritten digit {i}" for i in range(n)]


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("bad", "match"), [
    (torch.rand(2, 1, 8, 8), r"reward 'recorder': images must have shape \[B, 3, H, W\], got \[2, 1, 8, 8\]"),
    (torch.rand(3, 8, 8), r"images must have shape \[B, 3, H, W\]"),
    (torch.ones(2, 3, 8, 8, dtype=torch.uint8), r"floating tensor"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, r"image values must be in \[0, 1\]"),
])
def test_input_validation(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recorder()(bad, prompts(bad.shape[0]))


def test_small_overshoot_is_tolerated_and_prompt_count_checked() -> None:
    x = images(2).clamp(0, 1)
    x[0, 0, 0, 0] = 1.0005
    assert Recorder()(x, prompts(2)).shape == (2,)
    with pytest.raises(ValueError, match=r"reward 'recorder': got 2 images but 3 prompts"):
        Recorder()(x, prompts(3))


@pytest.mark.parametrize(("value", "match"), [
    (torch.zeros(4, 1), r"reward 'fixed': score\(\) must return shape \[4\] \(one score per image\), "
                        r"got \[4, 1\]"),
    (torch.zeros(3), r"must return shape \[4\]"),
    (torch.zeros(4, dtype=torch.int64), r"must return a floating tensor, got torch.int64"),
])
def test_output_validation(value: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Returns(value)(images(4), prompts(4))


def test_output_is_float32_on_input_device_and_non_finite_passes_through() -> None:
    out = Returns(torch.tensor([1.0, float("nan")], dtype=torch.float64))(images(2), prompts(2))
    assert out.dtype == torch.float32 and out.device == torch.device("cpu")
    assert out[0] == 1 and torch.isnan(out[1])


def test_batching_matches_unbatched_and_chunks_metadata() -> None:
    x, p = images(5), prompts(5)
    labels = torch.arange(5)
    whole, chunked = Recorder(), Recorder(batch_size=2, device="cpu")
    torch.testing.assert_close(whole(x, p, labels=labels), chunked(x, p, labels=labels))
    assert whole.chunks == [5] and chunked.chunks == [2, 2, 1]
    assert [t.tolist() for t in chunked.labels] == [[0, 1], [2, 3], [4]]
    assert Recorder()(x[:0], []).shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        Recorder(batch_size=0)


def test_names() -> None:
    assert Recorder().name == "recorder"
    assert Recorder(name="other").name == "other"
    assert Brightness().name == "brightness"
    assert JpegCompressibility().name == "jpeg_compressibility"
    assert JpegIncompressibility().name == "jpeg_incompressibility"


# ------------------------------------------------------------------------------------------------ callables


def test_callable_reward_from_function_and_dotted_path() -> None:
    x, p = images(3), prompts(3)
    direct = CallableReward(mean_red)
    assert direct.name == "mean_red"
    by_path = CallableReward(f"{__name__}.mean_red", name="red", batch_size=2)
    assert by_path.name == "red"
    torch.testing.assert_close(direct(x, p), x[:, 0].mean(dim=(1, 2)))
    torch.testing.assert_close(by_path(x, p), direct(x, p))
    with pytest.raises(ImportError, match="no attribute 'nope'"):
        CallableReward(f"{__name__}.nope")
    with pytest.raises(ValueError, match="dotted import path"):
        CallableReward("nodots")


def test_as_reward() -> None:
    reward = Brightness()
    assert as_reward(reward) is reward
    wrapped = as_reward(lambda images, prompts, **_: images.mean(dim=(1, 2, 3)))
    assert isinstance(wrapped, CallableReward) and wrapped.name == "callable"
    assert as_reward(mean_red, name="red").name == "red"
    with pytest.raises(TypeError):
        as_reward(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- image rewards


def test_brightness_exact() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x[0] = 0.25
    x[1, 0] = 1.0  # one channel white: mean 1/3
    torch.testing.assert_close(Brightness()(x, ["a", "b"]), torch.tensor([0.25, 1 / 3]))


def test_jpeg_constant_image_compresses_better_than_noise() -> None:
    constant = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch, p = torch.cat([constant, noise]), ["a", "b"]
    comp = JpegCompressibility()(batch, p)
    incomp = JpegIncompressibility(quality=95)(batch, p)
    assert comp[0] > comp[1]  # the constant image is more compressible
    assert incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)
    assert (incomp > 0).all() and incomp[1] < 10  # sizes in kB
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# ---------------------------------------------------------------------------------- constant-reward warning


class Grey(Reward):
    """Saturation-like: 0 on every grey image (the toy world's digits are grey)."""

    default_name = "grey_saturation"

    def score(self, images, prompts, **metadata):
        return images.amax(dim=1).sub(images.amin(dim=1)).mean(dim=(1, 2))


def test_constant_reward_warns_once_per_reward_pointing_at_its_score() -> None:
    from lit_diffac.rewards.base import ConstantRewardWarning

    grey = torch.rand(4, 1, 8, 8).expand(4, 3, 8, 8).contiguous()
    reward = Grey(batch_size=3)  # chunked: the check is on the whole batch
    with pytest.warns(ConstantRewardWarning, match=r"reward 'grey_saturation' gave all 4 images of a batch the "
                                                   r"same score \(0\)") as caught:
        assert reward(grey, ["a"] * 4).tolist() == [0.0] * 4
    assert len(caught) == 1
    assert caught[0].filename == __file__  # the reward's own score(), not torch's Module.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(grey, ["a"] * 4)  # once per reward
        Grey()(grey[:1], ["a"])  # one image: nothing to compare
        Grey()(torch.rand(4, 3, 8, 8), ["a"] * 4)  # colour images: scores differ
    with pytest.warns(ConstantRewardWarning, match="'grey_saturation'"):
        Grey()(grey, ["a"] * 4)  # another instance warns on its own


def test_constant_reward_warning_ignores_non_finite_and_names_a_function() -> None:
    from lit_diffac.rewards.base import ConstantRewardWarning

    def always_one(images, prompts, **metadata):
        return torch.tensor([1.0, float("nan"), 1.0])

    with pytest.warns(ConstantRewardWarning, match=r"'always_one' gave all 2 images .* same score \(1\)") as caught:
        CallableReward(always_one)(torch.rand(3, 3, 4, 4), ["a", "b", "c"])
    assert caught[0].filename == __file__ and caught[0].lineno == always_one.__code__.co_firstlineno
