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

Authentication is optional: a server started with a shared token answers HTTP 401 unless the request
carries ``Authorization: Bearer <token>`` (``RemoteReward(token_env="REWARD_TOKEN")`` sends it).
Redirects are followed only to the same scheme, host and port (re-sending the ``POST``); a redirect to any
other origin fails with :class:`RemoteRewardError`, so neither the images nor the token go elsewhere.

:mod:`lit_diffac.rewards.server` is a minimal reference server for this format.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_diffac.rewards.base import Reward
from lit_diffac.rewards.clip import quantize

__all__ = ["RemoteReward", "RemoteRewardError", "ImageTooLargeError", "encode_png", "decode_png", "png_size",
           "pack", "unpack", "CONTENT_TYPES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_REQUEST_PIXELS"]

CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}

#: Largest image :func:`decode_png` decodes by default: 2048 x 2048 pixels (1024 x 1024 images pass).
DEFAULT_MAX_PIXELS = 2048 * 2048
#: Largest total over the images of one request by default: 64 images of 1024 x 1024.
DEFAULT_MAX_REQUEST_PIXELS = 64 * 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in an HTTP header


class RemoteRewardError(RuntimeError):
    """The reward server answered with an error, or an unusable answer."""


class ImageTooLargeError(ValueError):
    """An image (or a request's images together) has more pixels than the decoder accepts; ``limit`` names
    the setting: ``"max_pixels"`` (one image) or ``"max_request_pixels"`` (a request's images together)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def check_token(token: str, what: str = "token") -> str:
    """``token`` if it can travel as ``Authorization: Bearer <token>``, else a ValueError saying why."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError(f"{what} must be a non-empty string of printable ASCII characters without spaces "
                         "(e.g. the output of: python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token


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


def png_size(blob: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, without decoding it (ValueError if it is not a PNG)."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < 24 or blob[:8] != _PNG_SIGNATURE \
            or blob[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", bytes(blob[16:24]))
    return width, height


def decode_png(blobs: list[bytes], max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_total_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS) -> Tensor:
    """PNG bytes → ``[B, 3, H, W]`` float32 in [0, 1] (all images must have the same size).

    Every image's size is read from its header before anything is decoded: an image over ``max_pixels``
    pixels, or images over ``max_total_pixels`` together, raise :class:`ImageTooLargeError` without
    allocating them (a small PNG can declare a huge image: a decompression bomb).  ``None``: no limit.
    """
    sizes = []
    for i, blob in enumerate(blobs):
        try:
            width, height = png_size(blob)
        except ValueError:
            raise ValueError(f"image {i} is not a PNG (the wire format sends RGB PNGs)") from None
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"image {i} is {width}x{height} = {width * height} pixels, over the limit of "
                                     f"{max_pixels} pixels per image", "max_pixels")
        sizes.append((width, height))
    if len(set(sizes)) > 1:
        raise ValueError("images of different sizes in one request: "
                         + ", ".join(f"{w}x{h}" for w, h in sorted(set(sizes))))
    total = sum(w * h for w, h in sizes)
    if max_total_pixels is not None and total > max_total_pixels:
        raise ImageTooLargeError(f"{len(sizes)} images of {sizes[0][0]}x{sizes[0][1]} are {total} pixels, over the "
                                 f"limit of {max_total_pixels} pixels per request", "max_request_pixels")
    if not sizes:
        return torch.zeros(0, 3, 0, 0)
    arrays = []
    for i, (blob, size) in enumerate(zip(blobs, sizes)):
        try:
            with Image.open(io.BytesIO(blob), formats=["PNG"]) as image:
                if image.size != size:
                    raise ValueError(f"its header says {size[0]}x{size[1]}, the decoder {image.size}")
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"image {i} cannot be decoded: {err}") from None
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
    be reached, the error names the URL.  A redirect is followed (re-sending the ``POST``, at most 5 times)
    only to the same scheme, host and port; a redirect anywhere else raises :class:`RemoteRewardError`
    naming the target, so that neither the images nor the token leave for a host the recipe did not name.

    Args:
        url: the endpoint, e.g. ``"http://127.0.0.1:8000/score"``.
        format: ``"json"`` (base64 PNGs) or ``"msgpack"`` (binary PNGs; needs ``msgpack``).
        timeout: seconds to wait for one answer.
        retries: extra attempts after a failed one.
        backoff: seconds before the first retry (doubled each time).
        max_backoff: cap on the wait between retries.
        headers: extra HTTP headers.
        token: shared token of a server that requires one, sent as ``Authorization: Bearer <token>``.
            A recipe should rather name an environment variable with ``token_env``: a recipe's values
            are saved with the run (``config.yaml``).
        token_env: name of the environment variable holding the token (read when the reward is built;
            an unset variable fails there).
        send_metadata: send the per-sample metadata (e.g. GenEval's object lists) with the request.
        name: metric key (default ``"remote"``; name it after the scorer, e.g. ``"geneval"``).
        batch_size, device: see :class:`~lit_diffac.rewards.base.Reward`.
    """

    default_name = "remote"

    def __init__(self, url: str, format: Literal["json", "msgpack"] = "json", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None, send_metadata: bool = True, name: str | None = None,
                 batch_size: int | None = None, device: str | None = None, token: str | None = None,
                 token_env: str | None = None) -> None:
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
        self.token_env = token_env
        if token is not None and token_env is not None:
            raise ValueError("give the token either as token or as token_env, not both")
        if token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(f"RemoteReward: the environment variable {token_env!r} (token_env) is not set or "
                                 f"empty: export {token_env}=<the reward server's token>")
            check_token(token, f"the token in ${token_env}")
        elif token is not None:
            check_token(token)
        if token is not None and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("give the token either as token/token_env or as an Authorization header, not both")
        self._token = token  # not shown by repr(); never written to logs

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": CONTENT_TYPES[self.format], "Accept": CONTENT_TYPES[self.format], **self.headers}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        last: str = ""
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                return self._post_once(body, headers)
            except urllib.error.HTTPError as err:
                detail = _error_detail(err, self.format)
                if err.code == 401:
                    hint = ("; give RemoteReward the server's token (token_env=NAME of an environment variable "
                            "holding it, or token=...)"
                            if self._token is None and not any(k.lower() == "authorization" for k in self.headers)
                            else "; check that the token is the server's")
                    raise RemoteRewardError(f"reward {self.name!r}: the server at {self.url} refused the request "
                                            f"(HTTP 401): {detail}{hint}") from err
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

    def _post_once(self, body: bytes, headers: dict[str, str]) -> bytes:
        """One ``POST``, following redirects within the same origin only."""
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if err.code not in _REDIRECT_CODES:
                    raise
                location = err.headers.get("Location")
                err.close()
                if not location:
                    raise RemoteRewardError(f"reward {self.name!r}: the server at {url} answered HTTP {err.code} "
                                            "(a redirect) without a Location") from None
                target = urllib.parse.urljoin(url, location)
                if _origin(target) != _origin(url):
                    raise RemoteRewardError(
                        f"reward {self.name!r}: the server at {url} redirected the request (HTTP {err.code}) to "
                        f"{target}, another host; RemoteReward follows redirects only to the same scheme, host and "
                        "port, so that neither the images nor the token are sent elsewhere: if that server is the "
                        f"one to use, set url={target!r}") from None
                url = target
        raise RemoteRewardError(f"reward {self.name!r}: more than {_MAX_REDIRECTS} redirects from {self.url}")

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand every redirect back to :meth:`RemoteReward._post_once`, which decides where it may go."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # an invalid port: never the same origin as a valid URL
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


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
