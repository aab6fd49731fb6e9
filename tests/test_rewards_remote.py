"""Remote reward over HTTP against the reference server, on 127.0.0.1 only (bounded servers)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lit_diffac.rewards import Brightness
from lit_diffac.rewards.clip import quantize
from lit_diffac.rewards.remote import RemoteReward, RemoteRewardError, decode_png, encode_png, pack
from lit_diffac.rewards.server import RewardServer, serve_main


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


# --- hostile requests (issue 15, point 7): each gets an HTTP error status and a one-line error body ---------------


def raw_request(url: str, data: bytes, wait: float = 5.0) -> tuple[int | None, dict | None, float]:
    """Send ``data`` on a fresh connection, read until the server closes it (at most ``wait`` s of silence):
    (status or None, the JSON body or None, seconds until the connection closed)."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        while len(answer) < 2 ** 20:
            chunk = sock.recv(65536)  # socket.timeout (a test failure) if the server neither answers nor closes
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - start
    if not answer:
        return None, None, elapsed
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\n" not in body.strip(), body  # one line
    return int(head.split()[1]), json.loads(body), elapsed


def post_header(length: str | None = None, extra: str = "") -> bytes:
    lines = ["POST /score HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def serves_normally(server: RewardServer) -> None:
    with urllib.request.urlopen(server.url.replace("/score", "/health"), timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    assert RemoteReward(server.url, retries=0, timeout=5)(images(2), prompts(2)).shape == (2,)


@pytest.mark.parametrize("length, status, message", [
    ("-1", 400, "invalid Content-Length '-1'"),
    ("abc", 400, "invalid Content-Length 'abc'"),
    ("1e3", 400, "invalid Content-Length '1e3'"),
    ("99999999999999999999999", 413, "over the server's limit of 3000 bytes"),
    ("5000", 413, "request body of 5000 bytes is over the server's limit of 3000 bytes"),
    (None, 411, "Content-Length header is required"),
])
def test_malformed_or_too_large_content_length_gets_a_clear_status(length, status, message):
    with RewardServer(Brightness(), idle_timeout=30, max_body_bytes=3000, request_timeout=5) as server:
        got, body, elapsed = raw_request(server.url, post_header(length), wait=4)
        assert (got, message in body["error"]) == (status, True), body
        assert elapsed < 3  # answered at once, not after waiting for a body
        serves_normally(server)


def test_conflicting_content_lengths_are_refused():
    with RewardServer(Brightness(), idle_timeout=30, request_timeout=5) as server:
        got, body, _ = raw_request(server.url, post_header("2", "Content-Length: 3\r\n") + b"{}", wait=4)
        assert got == 400 and "conflicting Content-Length" in body["error"]


@pytest.mark.parametrize("stalled", ["mid-headers", "after-headers", "mid-body"])
def test_a_stalled_client_is_answered_408_and_disconnected_within_the_timeout(stalled):
    data = {"mid-headers": post_header("20")[:-4], "after-headers": post_header("20"),
            "mid-body": post_header("20") + b'{"prom'}[stalled]
    with RewardServer(Brightness(), idle_timeout=30, request_timeout=0.5) as server:
        start = time.monotonic()
        result: dict = {}
        waiter = threading.Thread(target=lambda: result.update(answer=raw_request(server.url, data, wait=5)))
        waiter.start()
        serves_normally(server)  # while that client stalls, others are served
        waiter.join(10)
        status, body, _ = result["answer"]
        assert time.monotonic() - start < 4
        assert status == 408 and "did not arrive within 0.5 s" in body["error"]
        serves_normally(server)  # and after it


def test_a_trickling_client_cannot_outlast_the_request_deadline():
    with RewardServer(Brightness(), idle_timeout=30, request_timeout=0.6) as server:
        host, port = server.url.split("//")[1].split("/")[0].split(":")
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(post_header("1000"))
            answer = b""
            for _ in range(40):  # a byte every 0.1 s, each well within a per-read timeout
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                sock.settimeout(0.1)
                try:
                    answer += sock.recv(4096)
                except socket.timeout:
                    continue
                if answer.count(b"\r\n\r\n") and answer.endswith(b"}"):
                    break
        assert answer.startswith(b"HTTP/1.0 408") and time.monotonic() - start < 3


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of zeros: a few kB that decode to ``width * height * 3`` bytes."""
    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte + RGB
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def post_pngs(url: str, blobs: list[bytes], token: str | None = None) -> tuple[int, dict]:
    body = pack({"prompts": ["p"] * len(blobs), "images": blobs}, "json")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    assert decode_png([png_bomb(7, 5)]).shape == (1, 3, 5, 7)  # the helper makes real PNGs
    bomb = png_bomb(4096, 4096)  # 16.8 megapixels: 50 MB as uint8, 200 MB as float32
    assert len(bomb) < 100_000
    with RewardServer(Brightness(), idle_timeout=30, request_timeout=10) as server:
        tracemalloc.start()
        try:
            status, body = post_pngs(server.url, [bomb])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 413 and "image 0 is 4096x4096 = 16777216 pixels" in body["error"]
        assert "max_pixels" in body["error"]
        assert peak < 16 * 2 ** 20  # nothing the size of the image was allocated
        serves_normally(server)


def test_pixel_caps_are_configurable_and_1024px_images_pass_the_defaults():
    with RewardServer(Brightness(), idle_timeout=30, max_pixels=100, max_request_pixels=150) as server:
        status, body = post_pngs(server.url, encode_png(images(1)))  # 12 x 10 = 120 pixels
        assert status == 413 and "over the limit of 100 pixels per image" in body["error"]
        status, body = post_pngs(server.url, encode_png(torch.rand(2, 3, 10, 10)))
        assert status == 413 and "200 pixels, over the limit of 150 pixels per request" in body["error"]
        status, body = post_pngs(server.url, [b"GIF89a not a png"])
        assert status == 400 and "image 0 is not a PNG" in body["error"]
    with RewardServer(Brightness(), idle_timeout=30) as server:
        x = torch.zeros(2, 3, 1024, 1024)
        x[1] = 1.0
        assert RemoteReward(server.url, retries=0)(x, prompts(2)).tolist() == [0.0, 1.0]


def test_token_is_required_and_accepted(monkeypatch):
    with RewardServer(Brightness(), idle_timeout=30, token="s3cret-Token") as server:
        status, body, _ = raw_request(server.url, post_header("2") + b"{}")
        assert status == 401 and body["error"].startswith("no token: this server requires")
        with pytest.raises(RemoteRewardError, match=r"HTTP 401\): no token.*token_env"):
            RemoteReward(server.url, retries=3, backoff=5)(images(2), prompts(2))  # not retried
        with pytest.raises(RemoteRewardError, match=r"HTTP 401\): wrong token"):
            RemoteReward(server.url, token="s3cret-Tokem", retries=0)(images(2), prompts(2))
        with pytest.raises(RemoteRewardError, match=r"HTTP 401\): wrong token"):
            RemoteReward(server.url, headers={"Authorization": "Basic s3cret-Token"}, retries=0)(images(2), prompts(2))
        assert server.requests == 0  # refused requests do not count towards max_requests
        with urllib.request.urlopen(server.url.replace("/score", "/health"), timeout=5) as response:
            assert response.status == 200  # health stays open
        assert RemoteReward(server.url, token="s3cret-Token")(images(2), prompts(2)).shape == (2,)
        monkeypatch.setenv("LIT_DIFFAC_TEST_TOKEN", "s3cret-Token")
        reward = RemoteReward(server.url, token_env="LIT_DIFFAC_TEST_TOKEN")
        assert reward(images(2), prompts(2)).shape == (2,) and server.requests == 2
        assert "s3cret" not in repr(reward)
    monkeypatch.delenv("LIT_DIFFAC_TEST_TOKEN")
    with pytest.raises(ValueError, match="LIT_DIFFAC_TEST_TOKEN.*not set"):
        RemoteReward("http://127.0.0.1:1/score", token_env="LIT_DIFFAC_TEST_TOKEN")
    with pytest.raises(ValueError, match="printable ASCII"):
        RemoteReward("http://127.0.0.1:1/score", token="two words")
    with pytest.raises(ValueError, match="printable ASCII"):
        RewardServer(Brightness(), token="")
    with pytest.raises(SystemExit) as err:
        serve_main(["lit_diffac.rewards:Brightness", "--port", "0", "--token-env", "LIT_DIFFAC_TEST_TOKEN"])
    assert err.value.code == 2


class Recorder(BaseHTTPRequestHandler):
    """Records every request's method, path and Authorization; ``/moved`` redirects to ``server.location``,
    other POSTs score 1.0 per prompt."""

    def log_message(self, *args):
        pass

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        return body

    def _answer(self, status: int, payload: dict, location: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - what urllib turns a redirected POST into
        self._record()
        self._answer(405, {"error": "POST only"})

    def do_POST(self):  # noqa: N802
        body = self._record()
        if self.path == "/moved":
            self._answer(self.server.code, {}, self.server.location)
        else:
            self._answer(200, {"scores": [1.0] * len(json.loads(body)["prompts"])})


@pytest.fixture
def recorders():
    servers = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        server.seen, server.code, server.location, server.timeout = [], 302, "", 5
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_host_is_refused_and_the_token_not_forwarded(recorders, code):
    first, other = recorders
    first.code = code
    first.location = f"http://127.0.0.1:{other.server_address[1]}/score"  # another port: another origin
    reward = RemoteReward(f"http://127.0.0.1:{first.server_address[1]}/moved", token="s3cret", retries=2, backoff=0)
    with pytest.raises(RemoteRewardError, match=rf"redirected the request \(HTTP {code}\) to {first.location}, "
                                                 "another host.*set url="):
        reward(images(2), prompts(2))
    assert first.seen == [("POST", "/moved", "Bearer s3cret")]  # once: not retried
    assert other.seen == []  # neither the token nor the images went there


def test_redirect_on_the_same_host_is_followed_with_the_post_and_the_token(recorders):
    first, _ = recorders
    first.code, first.location = 307, "/score"
    reward = RemoteReward(f"http://127.0.0.1:{first.server_address[1]}/moved", token="s3cret")
    assert reward(images(2), prompts(2)).tolist() == [1.0, 1.0]
    assert first.seen == [("POST", "/moved", "Bearer s3cret"), ("POST", "/score", "Bearer s3cret")]


def test_a_refused_large_body_reaches_the_client_as_its_status_not_a_reset():
    x = torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # about 2 MB of PNGs
    server = RewardServer(Brightness(), idle_timeout=30, max_body_bytes=10_000, token="s3cret", request_timeout=5)
    with server:
        with pytest.raises(RemoteRewardError, match=r"HTTP 401\): no token"):
            RemoteReward(server.url, retries=0)(x, prompts(8))
        with pytest.raises(RemoteRewardError, match=r"HTTP 413\): request body of \d+ bytes is over the server's "
                                                     r"limit of 10000 bytes"):
            RemoteReward(server.url, token="s3cret", retries=0)(x, prompts(8))
