"""A minimal reference server for :class:`~lit_diffac.rewards.remote.RemoteReward`.

It serves any reward (a :class:`~lit_diffac.rewards.base.Reward` or a plain function
``fn(images [B,3,H,W] in [0,1], prompts, **metadata) -> [B]``) in the wire format of
:mod:`lit_diffac.rewards.remote`, on ``POST`` to any path; ``GET /health`` answers ``{"status": "ok"}``.
It is bounded: it can stop by itself after ``max_requests`` requests or ``idle_timeout`` idle seconds,
and it refuses bodies over ``max_body_bytes``.  It listens on 127.0.0.1 unless told otherwise.

In Python (the tests do this)::

    with RewardServer(my_reward, idle_timeout=60) as server:
        reward = RemoteReward(server.url)

From the shell::

    python -m lit_diffac.rewards.server lit_diffac.rewards:Brightness --port 8000

Write your own server in any language and framework: the format is all that matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch

from lit_diffac.rewards.base import Reward, _import_callable
from lit_diffac.rewards.remote import CONTENT_TYPES, decode_png, pack, unpack

__all__ = ["RewardServer", "serve_main"]


class _QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print a traceback when a client hangs up (e.g. timed out)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class RewardServer:
    """Serve ``reward`` over HTTP in a background thread.

    Args:
        reward: a Reward or a function ``fn(images, prompts, **metadata) -> [B]``.
        host: interface to listen on (default loopback only).
        port: port (0: any free port; read :attr:`url` after :meth:`start`).
        max_requests: stop after this many scoring requests (``None``: no limit).
        idle_timeout: stop after this many seconds without a request (``None``: never).
        max_body_bytes: largest accepted request body.
    """

    def __init__(self, reward: Reward | Callable[..., Any], host: str = "127.0.0.1", port: int = 0,
                 max_requests: int | None = None, idle_timeout: float | None = None,
                 max_body_bytes: int = 256 * 2 ** 20) -> None:
        self.reward = reward
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.max_body_bytes = max_body_bytes
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

    def _score(self, payload: dict[str, Any]) -> list[float | None]:
        prompts = [str(p) for p in payload.get("prompts", [])]
        images = decode_png(list(payload.get("images", [])))
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

            def _send(self, status: int, payload: dict[str, Any], fmt: str) -> None:
                body = pack(payload, fmt)  # type: ignore[arg-type]
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPES[fmt])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("health"):
                    self._send(200, {"status": "ok"}, "json")
                else:
                    self._send(404, {"error": "POST images and prompts to score them; GET /health"}, "json")

            def do_POST(self) -> None:  # noqa: N802
                ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
                fmt = "msgpack" if ctype == CONTENT_TYPES["msgpack"] else "json"
                with server._lock:
                    server._last = time.monotonic()
                    server.requests += 1
                    server._active += 1
                try:
                    self._handle(fmt)
                finally:
                    with server._lock:
                        server._active -= 1
                        server._last = time.monotonic()

            def _handle(self, fmt: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > server.max_body_bytes:
                    self._send(413, {"error": f"request body of {length} bytes exceeds {server.max_body_bytes}"}, fmt)
                    return
                try:
                    payload = unpack(self.rfile.read(length), fmt)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - a malformed request is the client's error
                    self._send(400, {"error": f"cannot decode the {fmt} request: {err}"}, fmt)
                    return
                try:
                    scores = server._score(payload)
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
    args = parser.parse_args(argv)
    server = RewardServer(_load_reward(args.reward, json.loads(args.init_args)), host=args.host, port=args.port,
                          max_requests=args.max_requests, idle_timeout=args.idle_timeout)
    sys.stdout.write(f"serving {args.reward} at {server.url}\n")
    sys.stdout.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
