"""A minimal reference server for :class:`~lit_diffac.rewards.remote.RemoteReward`.

It serves any reward (a :class:`~lit_diffac.rewards.base.Reward` or a plain function
``fn(images [B,3,H,W] in [0,1], prompts, **metadata) -> [B]``) in the wire format of
:mod:`lit_diffac.rewards.remote`, on ``POST`` to any path; ``GET /health`` answers ``{"status": "ok"}``.
It is bounded: it can stop by itself after ``max_requests`` requests or ``idle_timeout`` idle seconds;
it answers a request it will not serve with an HTTP error status and a one-line ``{"error": "..."}`` body:

* 400: a missing, negative, non-numeric or conflicting ``Content-Length``, a body that is not the format
  or not PNGs; 411: no ``Content-Length`` (chunked bodies are not supported);
* 413: a body over ``max_body_bytes``, an image over ``max_pixels`` pixels or images over
  ``max_request_pixels`` pixels together (checked from the PNG headers, before decoding anything);
* 408 (then the connection is closed): a client that has not sent its whole request (headers and body)
  within ``request_timeout`` seconds, so a stalled client cannot hold a worker;
* 401: with a ``token``, a scoring request without ``Authorization: Bearer <token>`` (``GET /health``
  stays open).

It listens on 127.0.0.1 unless told otherwise; anything reachable from other machines should have a token
(and, across an untrusted network, TLS in front of it: the token travels in clear over ``http://``).

In Python (the tests do this)::

    with RewardServer(my_reward, idle_timeout=60) as server:
        reward = RemoteReward(server.url)

From the shell (the token read from an environment variable, not from the command line)::

    REWARD_TOKEN=... python -m lit_diffac.rewards.server lit_diffac.rewards:Brightness --port 8000 \
        --token-env REWARD_TOKEN

Write your own server in any language and framework: the format is all that matters.
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch

from lit_diffac.rewards.base import Reward, _import_callable
from lit_diffac.rewards.remote import (CONTENT_TYPES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS,
                                       ImageTooLargeError, check_token, decode_png, pack, unpack)

__all__ = ["RewardServer", "serve_main"]


class _QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print a traceback when a client hangs up (e.g. timed out)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with TimeoutError once the current request's deadline has passed.

    A per-read timeout alone lets a client that trickles a byte now and then hold a worker for ever; the
    deadline bounds the whole request (headers and body).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf
        self.expired = False

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            raise TimeoutError("request timed out")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise


_DIGITS = re.compile(r"[0-9]{1,18}")


class RewardServer:
    """Serve ``reward`` over HTTP in a background thread.

    Args:
        reward: a Reward or a function ``fn(images, prompts, **metadata) -> [B]``.
        host: interface to listen on (default loopback only).
        port: port (0: any free port; read :attr:`url` after :meth:`start`).
        max_requests: stop after this many scoring requests (``None``: no limit; requests refused for a
            missing or wrong token do not count).
        idle_timeout: stop after this many seconds without a request (``None``: never).
        max_body_bytes: largest accepted request body (larger: HTTP 413).
        request_timeout: seconds a client has to send a whole request, headers and body (later: HTTP 408
            and the connection is closed).  Raise it for large batches over slow links.
        max_pixels: largest image (width x height) the server decodes (larger: HTTP 413); the default,
            2048 x 2048, lets 1024 x 1024 images through.
        max_request_pixels: largest total of pixels over one request's images (larger: HTTP 413); the
            default is 64 images of 1024 x 1024.
        token: shared secret; when set, scoring requests need ``Authorization: Bearer <token>`` (else
            HTTP 401).  Printable ASCII without spaces.
    """

    def __init__(self, reward: Reward | Callable[..., Any], host: str = "127.0.0.1", port: int = 0,
                 max_requests: int | None = None, idle_timeout: float | None = None,
                 max_body_bytes: int = 256 * 2 ** 20, request_timeout: float = 60.0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS, token: str | None = None) -> None:
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        for key, value in (("max_pixels", max_pixels), ("max_request_pixels", max_request_pixels)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be a positive number of pixels or None, got {value}")
        self.reward = reward
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.max_body_bytes = max_body_bytes
        self.request_timeout = float(request_timeout)
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self._token = None if token is None else check_token(token).encode("ascii")
        self.requests = 0
        self._active = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._httpd = _QuietHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.timeout = 0.05

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/score"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "RewardServer":
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="reward-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve_forever(self) -> None:
        """Serve in the calling thread until a bound is hit or the process is interrupted."""
        try:
            self._loop()
        except KeyboardInterrupt:
            self._stop.set()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _done(self) -> bool:
        if self._stop.is_set():
            return True
        if self.max_requests is not None and self.requests >= self.max_requests:
            return True
        if self.idle_timeout is None or self._active:
            return False
        return time.monotonic() - self._last > self.idle_timeout

    def _loop(self) -> None:
        try:
            while not self._done():
                self._httpd.handle_request()
        finally:
            self._httpd.server_close()

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    def _score(self, payload: dict[str, Any]) -> list[float | None]:
        prompts = [str(p) for p in payload.get("prompts", [])]
        images = decode_png(list(payload.get("images", [])), self.max_pixels, self.max_request_pixels)
        if images.shape[0] != len(prompts):
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        metadata = dict(payload.get("metadata") or {})
        with torch.no_grad():
            scores = self.reward(images, prompts, **metadata)
        values = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
        return [v if v == v and abs(v) != float("inf") else None for v in values]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # replaced by reads that honour the request deadline
                self._reader = _DeadlineReader(self.connection)
                self.rfile = io.BufferedReader(self._reader)
                self._responded = False

            def handle_one_request(self) -> None:
                # defaults for an answer sent before the request line is read (a timeout)
                self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
                self._responded = False
                self._reader.start(server.request_timeout)
                super().handle_one_request()  # answers nothing when the request line or headers time out
                if self._reader.expired and not self._responded:
                    self.close_connection = True
                    try:
                        self._send(408, {"error": self._timeout_message()}, "json")
                    except OSError:
                        pass

            def _timeout_message(self) -> str:
                return (f"request timed out: the whole request did not arrive within {server.request_timeout:g} s "
                        "(the server's request_timeout / --request-timeout)")

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                # http.server's own errors (bad request line, oversized headers, unknown method): one JSON line
                self.close_connection = True
                if self.request_version == "HTTP/0.9":  # garbage parsed as HTTP/0.9: still send a status line
                    self.request_version = "HTTP/1.0"
                try:
                    phrase = HTTPStatus(code).phrase
                except ValueError:
                    phrase = "error"
                self._send(int(code), {"error": message or phrase}, "json")

            def _send(self, status: int, payload: dict[str, Any], fmt: str,
                      headers: dict[str, str] | None = None) -> None:
                try:
                    body = pack(payload, fmt)  # type: ignore[arg-type]
                except ImportError:  # msgpack asked for but not installed here
                    fmt, body = "json", pack(payload, "json")
                self._responded = True
                self.connection.settimeout(server.request_timeout)  # bounded writes
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPES[fmt])
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse(self, status: int, message: str, fmt: str, discard: int | None,
                        headers: dict[str, str] | None = None) -> None:
                """Answer an error before the body is read, then close the connection gracefully: read and
                drop up to ``discard`` body bytes (a short grace when unknown) within the request deadline,
                so that the client reads the answer rather than a connection reset."""
                self.close_connection = True
                self._send(status, {"error": message}, fmt, headers)
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    if discard is None:
                        self._reader.deadline = min(self._reader.deadline, time.monotonic() + 1.0)
                        discard = 2 ** 16
                    while discard > 0:
                        chunk = self.rfile.read1(min(discard, 2 ** 16))
                        if not chunk:
                            break
                        discard -= len(chunk)
                except OSError:  # includes the deadline's TimeoutError: the connection is closed anyway
                    pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("health"):
                    self._send(200, {"status": "ok"}, "json")
                else:
                    self._send(404, {"error": "POST images and prompts to score them; GET /health"}, "json")

            def _content_length(self, fmt: str) -> int | None:
                """The body's length, or None after answering a missing, malformed or too large one."""
                if self.headers.get("Transfer-Encoding") is not None:
                    self._refuse(411, "chunked or encoded request bodies are not supported: send the body with a "
                                      "Content-Length", fmt, None)
                    return None
                values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
                if not values:
                    self._refuse(411, "a Content-Length header is required", fmt, None)
                    return None
                if len(set(values)) > 1:
                    self._refuse(400, f"conflicting Content-Length headers: {', '.join(values)}", fmt, None)
                    return None
                if not values[0].isascii() or not values[0].isdigit():
                    self._refuse(400, f"invalid Content-Length {values[0][:40]!r}: expected a non-negative whole "
                                      "number of bytes", fmt, None)
                    return None
                if not _DIGITS.fullmatch(values[0]) or int(values[0]) > server.max_body_bytes:
                    length = int(values[0]) if _DIGITS.fullmatch(values[0]) else None
                    size = f"{length} bytes" if length is not None else f"{len(values[0])} digits of bytes"
                    self._refuse(413, f"request body of {size} is over the server's limit of {server.max_body_bytes} "
                                      "bytes (max_body_bytes / --max-body-bytes): send smaller batches "
                                      "(RemoteReward's batch_size)", fmt, length)
                    return None
                return int(values[0])

            def _authorized(self, fmt: str) -> bool:
                """True, or False after answering HTTP 401."""
                if server._token is None:
                    return True
                header = self.headers.get("Authorization")
                scheme, _, credentials = (header or "").strip().partition(" ")
                supplied = credentials.strip().encode("latin-1", "replace")
                if hmac.compare_digest(supplied, server._token) and scheme.lower() == "bearer":
                    return True
                problem = "no token" if header is None else "wrong token"
                length = self.headers.get("Content-Length", "").strip()
                discard = int(length) if _DIGITS.fullmatch(length) else None  # dropped, within the deadline
                self._refuse(401, f"{problem}: this server requires the header 'Authorization: Bearer <token>'", fmt,
                             discard,
                             {"WWW-Authenticate": 'Bearer realm="lit_diffac reward"'})
                return False

            def do_POST(self) -> None:  # noqa: N802
                ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
                fmt = "msgpack" if ctype == CONTENT_TYPES["msgpack"] else "json"
                if not self._authorized(fmt):
                    return
                with server._lock:
                    server._last = time.monotonic()
                    server.requests += 1
                    server._active += 1
                try:
                    length = self._content_length(fmt)
                    if length is not None:
                        self._handle(fmt, length)
                finally:
                    with server._lock:
                        server._active -= 1
                        server._last = time.monotonic()

            def _handle(self, fmt: str, length: int) -> None:
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    self.close_connection = True
                    self._send(408, {"error": self._timeout_message()}, fmt)
                    return
                if len(body) < length:
                    self.close_connection = True
                    self._send(400, {"error": f"the request body ended after {len(body)} of the {length} bytes "
                                              "its Content-Length announced"}, fmt)
                    return
                try:
                    payload = unpack(body, fmt)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - a malformed request is the client's error
                    self._send(400, {"error": f"cannot decode the {fmt} request: {err}"}, fmt)
                    return
                try:
                    scores = server._score(payload)
                except ImageTooLargeError as err:
                    option = err.limit.replace("_", "-")
                    self._send(413, {"error": f"{err} (the server's {err.limit} / --{option})"}, fmt)
                    return
                except (ValueError, TypeError, KeyError) as err:
                    self._send(400, {"error": f"{type(err).__name__}: {err}"}, fmt)
                    return
                except Exception as err:  # noqa: BLE001 - report scorer failures to the client
                    self._send(500, {"error": f"{type(err).__name__}: {err}"}, fmt)
                    return
                self._send(200, {"scores": scores}, fmt)

        return Handler


def _load_reward(path: str, init_args: dict[str, Any]) -> Any:
    obj = _import_callable(path)
    if isinstance(obj, type):
        return obj(**init_args)
    if init_args:
        raise ValueError("--init-args is only for a reward class")
    return obj


def serve_main(argv: list[str] | None = None) -> int:
    """Serve a reward over HTTP: ``python -m lit_diffac.rewards.server package.module:RewardOrFn``."""
    parser = argparse.ArgumentParser(prog="python -m lit_diffac.rewards.server",
                                     description="Serve a lit_diffac reward (or a function) over HTTP for "
                                                 "RemoteReward.")
    parser.add_argument("reward",
                        help="import path of a Reward class or a function, e.g. lit_diffac.rewards:Brightness")
    parser.add_argument("--init-args", default="{}", help="JSON object of constructor arguments for a Reward class")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--idle-timeout", type=float, default=None, help="stop after this many idle seconds")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="seconds a client has to send a whole request (default 60; later: HTTP 408)")
    parser.add_argument("--max-body-bytes", type=int, default=256 * 2 ** 20,
                        help="largest request body (default 256 MiB; larger: HTTP 413)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest image, width x height (default {DEFAULT_MAX_PIXELS} = 2048x2048; larger: 413)")
    parser.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help=f"largest total of pixels in one request (default {DEFAULT_MAX_REQUEST_PIXELS} = 64 "
                             "images of 1024x1024; larger: 413)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token-env", metavar="NAME",
                      help="require 'Authorization: Bearer <token>', the token read from environment variable NAME")
    auth.add_argument("--token", help="the same with the token itself (visible to other users in the process "
                                      "list: prefer --token-env)")
    args = parser.parse_args(argv)
    token = args.token
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env {args.token_env}: the environment variable {args.token_env} is not set or empty")
    try:
        server = RewardServer(_load_reward(args.reward, json.loads(args.init_args)), host=args.host,
                              port=args.port, max_requests=args.max_requests, idle_timeout=args.idle_timeout,
                              request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                              max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels, token=token)
    except ValueError as err:
        parser.error(str(err))
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"warning: serving on {args.host} without a token: anyone who can reach this port can use "
                         "the reward (pass --token-env NAME)\n")
    sys.stdout.write(f"serving {args.reward} at {server.url}" + (" (token required)" if token else "") + "\n")
    sys.stdout.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
