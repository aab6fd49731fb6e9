"""A reward computed by another process over HTTP, for heavy scorers (GenEval, VLM judges) that live in
their own environment or on their own GPU.

Wire format (version 1), one ``POST`` per chunk of ``batch_size`` images:

* request, ``Content-Type: application/json``::

      {"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...], "metadata": {"key": [...], ...}}

  or ``Content-Type: application/msgpack`` with the same map and the PNG bytes as binary (smaller and
  faster; needs ``pip install msgpack`` on both sides).  Images are RGB PNGs of the uint8 image
  ``round(x * 255)``; ``metadata`` holds the per-sample extras passed to the reward (tensors as lists).
* response, same content type: ``{"scores": [0.7, null, ...]}``, one number per image (``null`` → NaN,
  which the training loop masks), or an HTTP error status with ``{"error": "message"}``.

:mod:`lit_diffac.rewards.server` is a minimal reference server for this format.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_diffac.rewards.base import Reward
from lit_diffac.rewards.clip import quantize

__all__ = ["RemoteReward", "RemoteRewardError", "encode_png", "decode_png", "pack", "unpack", "CONTENT_TYPES"]

CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}


class RemoteRewardError(RuntimeError):
    """The reward server answered with an error, or an unusable answer."""


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as err:
        raise ImportError("format='msgpack' needs the msgpack package: pip install msgpack "
                          "(or use format='json')") from err
    return msgpack


def encode_png(images: Tensor) -> list[bytes]:
    """``[B, 3, H, W]`` in [0, 1] → one RGB PNG (bytes) per image, of ``round(x * 255)``."""
    pixels = quantize(images).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def decode_png(blobs: list[bytes]) -> Tensor:
    """PNG bytes → ``[B, 3, H, W]`` float32 in [0, 1] (all images must have the same size)."""
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes in one request: {sorted({a.shape for a in arrays})}")
    if not arrays:
        return torch.zeros(0, 3, 0, 0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _plain(value: Any, key: str) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, key) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"metadata {key!r} holds a {type(value).__name__}, which cannot be sent to a remote reward "
                    "(send numbers, strings, lists or tensors, or pass send_metadata=False)")


def pack(payload: dict[str, Any], fmt: Literal["json", "msgpack"]) -> bytes:
    """Serialise a request or response; in JSON, ``bytes`` values in ``images`` become base64 strings."""
    if fmt == "msgpack":
        return _msgpack().packb(payload, use_bin_type=True)
    if "images" in payload:
        payload = {**payload, "images": [base64.b64encode(b).decode("ascii") for b in payload["images"]]}
    return json.dumps(payload).encode("utf-8")


def unpack(body: bytes, fmt: Literal["json", "msgpack"]) -> dict[str, Any]:
    """Inverse of :func:`pack` (``images`` come back as PNG bytes)."""
    if fmt == "msgpack":
        payload = _msgpack().unpackb(body, raw=False)
    else:
        payload = json.loads(body.decode("utf-8"))
        if isinstance(payload, dict) and "images" in payload:
            payload["images"] = [base64.b64decode(s) for s in payload["images"]]
    if not isinstance(payload, dict):
        raise ValueError(f"expected a map, got {type(payload).__name__}")
    return payload


class RemoteReward(Reward):
    """A reward scored by an HTTP server (see the module docstring for the wire format).

    Each chunk of ``batch_size`` images is one request.  Connection failures, timeouts and HTTP 5xx
    answers are retried ``retries`` times with exponential backoff (``backoff``, ``2 * backoff``, ...,
    at most ``max_backoff`` seconds); HTTP 4xx answers (a bad request) are not.  When the server cannot
    be reached, the error names the URL.

    Args:
        url: the endpoint, e.g. ``"http://127.0.0.1:8000/score"``.
        format: ``"json"`` (base64 PNGs) or ``"msgpack"`` (binary PNGs; needs ``msgpack``).
        timeout: seconds to wait for one answer.
        retries: extra attempts after a failed one.
        backoff: seconds before the first retry (doubled each time).
        max_backoff: cap on the wait between retries.
        headers: extra HTTP headers (e.g. ``{"Authorization": "Bearer ..."}``).
        send_metadata: send the per-sample metadata (e.g. GenEval's object lists) with the request.
        name: metric key (default ``"remote"``; name it after the scorer, e.g. ``"geneval"``).
        batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "remote"

    def __init__(self, url: str, format: Literal["json", "msgpack"] = "json", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None, send_metadata: bool = True, name: str | None = None,
                 batch_size: int | None = None, device: str | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size, device=device)
        if format not in CONTENT_TYPES:
            raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        if format == "msgpack":
            _msgpack()
        self.url = url
        self.format = format
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.headers = dict(headers or {})
        self.send_metadata = send_metadata

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": CONTENT_TYPES[self.format], "Accept": CONTENT_TYPES[self.format], **self.headers}
        last: str = ""
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err, self.format)
                if err.code < 500:
                    raise RemoteRewardError(f"reward {self.name!r}: the server at {self.url} rejected the request "
                                            f"(HTTP {err.code}): {detail}") from err
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"no answer within {self.timeout:g} s"
                else:
                    last = f"{type(reason).__name__}: {reason}"
        raise ConnectionError(f"reward {self.name!r}: cannot get scores from {self.url} after {attempts} "
                              f"attempt(s) ({last}). Is the reward server running and reachable? (the reference "
                              "server: python -m lit_diffac.rewards.server --help)")

    def score(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        payload: dict[str, Any] = {"prompts": list(prompts), "images": encode_png(images)}
        if self.send_metadata and metadata:
            payload["metadata"] = {k: _plain(v, k) for k, v in metadata.items()}
        answer = self._post(pack(payload, self.format))
        try:
            scores = unpack(answer, self.format)["scores"]
            values = [float("nan") if s is None else float(s) for s in scores]
        except Exception as err:  # noqa: BLE001 - any malformed answer
            raise RemoteRewardError(f"reward {self.name!r}: unusable answer from {self.url}: expected "
                                    f"{{\"scores\": [...]}} ({type(err).__name__}: {err})") from err
        if len(values) != len(prompts):
            raise RemoteRewardError(f"reward {self.name!r}: the server at {self.url} returned {len(values)} scores "
                                    f"for {len(prompts)} images")
        return torch.tensor(values, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, url={self.url!r}, format={self.format!r}"


def _error_detail(err: urllib.error.HTTPError, fmt: Literal["json", "msgpack"]) -> str:
    try:
        body = err.read()
    except Exception:  # noqa: BLE001
        return str(err.reason)
    try:
        return str(unpack(body, fmt).get("error", body[:200]))
    except Exception:  # noqa: BLE001
        try:
            return str(json.loads(body).get("error"))
        except Exception:  # noqa: BLE001
            return body[:200].decode("utf-8", "replace") or str(err.reason)
