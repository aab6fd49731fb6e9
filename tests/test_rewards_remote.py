"""Remote reward over HTTP against the reference server, on 127.0.0.1 only (bounded servers)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
import torch

from lit_diffac.rewards import Brightness
from lit_diffac.rewards.clip import quantize
from lit_diffac.rewards.remote import RemoteReward, RemoteRewardError, decode_png, encode_png
from lit_diffac.rewards.server import RewardServer


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(seed))


def prompts(n: int = 5) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_png_round_trip_is_the_uint8_image():
    x = images(3)
    torch.testing.assert_close(decode_png(encode_png(x)), quantize(x).float() / 255, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_remote_scores_equal_local_scores_in_chunks(fmt):
    if fmt == "msgpack":
        pytest.importorskip("msgpack")
    x = images()
    with RewardServer(Brightness(), idle_timeout=30) as server:
        reward = RemoteReward(server.url, format=fmt, batch_size=2, name="remote_brightness")
        scores = reward(x, prompts())
        assert server.requests == 3  # 5 images in chunks of 2
    torch.testing.assert_close(scores, Brightness()(quantize(x).float() / 255, prompts()), rtol=0, atol=1e-6)
    assert reward.name == "remote_brightness" and scores.dtype == torch.float32


def test_metadata_and_missing_scores_travel():
    seen = {}

    def judge(images, prompts, labels=None, **_):
        seen["labels"], seen["prompts"] = labels, prompts
        return torch.tensor([float("nan") if i == 1 else 1.0 for i in range(len(prompts))])

    with RewardServer(judge, idle_timeout=30) as server:
        scores = RemoteReward(server.url)(images(3), prompts(3), labels=torch.tensor([4, 5, 6]))
    assert seen == {"labels": [4, 5, 6], "prompts": prompts(3)}
    assert scores[0] == 1.0 and torch.isnan(scores[1])


def test_server_down_gives_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    reward = RemoteReward(url, retries=2, backoff=0.01, timeout=2)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        reward(images(2), prompts(2))
    assert url in str(err.value) and "3 attempt(s)" in str(err.value) and "server running" in str(err.value)
    assert time.monotonic() - start < 5


def test_timeout_then_retry_and_server_errors():
    calls = {"n": 0}

    def flaky(images, prompts, **_):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("warming up")  # HTTP 500: retried
        return torch.ones(len(prompts))

    with RewardServer(flaky, idle_timeout=30) as server:
        assert RemoteReward(server.url, retries=1, backoff=0.01)(images(2), prompts(2)).tolist() == [1.0, 1.0]
        assert server.requests == 2

    def slow(images, prompts, **_):
        time.sleep(1.0)
        return torch.ones(len(prompts))

    with RewardServer(slow, idle_timeout=30) as server:
        with pytest.raises(ConnectionError, match=r"no answer within 0.2 s"):
            RemoteReward(server.url, timeout=0.2, retries=0)(images(1), prompts(1))

    def wrong_count(images, prompts, **_):
        return torch.ones(len(prompts) + 1)

    def bad_input(images, prompts, **_):
        raise ValueError("unknown object class")  # HTTP 400: not retried

    with RewardServer(wrong_count, idle_timeout=30) as server:
        with pytest.raises(RemoteRewardError, match="returned 3 scores for 2 images"):
            RemoteReward(server.url)(images(2), prompts(2))
    with RewardServer(bad_input, idle_timeout=30) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 400.*unknown object class"):
            RemoteReward(server.url, retries=3, backoff=5)(images(2), prompts(2))
        assert server.requests == 1


def test_reference_server_is_bounded():
    server = RewardServer(Brightness(), max_requests=1, idle_timeout=30).start()
    assert server.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.url.replace("/score", "/health"), timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    RemoteReward(server.url)(images(1), prompts(1))
    server._thread.join(5)
    assert not server.running  # stopped by itself after max_requests
    idle = RewardServer(Brightness(), idle_timeout=0.1).start()
    idle._thread.join(5)
    assert not idle.running  # stopped by itself when idle


def test_invalid_arguments():
    with pytest.raises(ValueError, match="http"):
        RemoteReward("127.0.0.1:8000")
    with pytest.raises(ValueError, match="format"):
        RemoteReward("http://127.0.0.1:1/score", format="xml")


def test_server_command_loads_a_reward_class_or_function():
    from lit_diffac.rewards.server import _load_reward

    assert isinstance(_load_reward("lit_diffac.rewards:JpegCompressibility", {"quality": 50}), torch.nn.Module)
    with pytest.raises(ValueError, match="only for a reward class"):
        _load_reward("lit_diffac.rewards.image:jpeg_size_kb", {"quality": 1})
