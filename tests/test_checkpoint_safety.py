"""Checkpoint safety (docs/errors.md): every checkpoint load is weights-only, URLs included, so a crafted
checkpoint runs nothing; a corrupt or truncated checkpoint is one ``error:`` line (exit status 2), not a silent
NaN run or a traceback."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch

from lit_diffac.checkpoints import (CHECKSUM_KEY, CorruptCheckpointError, SafeCheckpointIO, UnsafeCheckpointError,
                                    guard_strategy, load_checkpoint, safe_checkpoint_plugins, tensor_checksums)
from lit_diffac.cli import LitDiffacCLI, main

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from helpers_faults import error_line, write_tiny_recipe  # noqa: E402

UNSAFE = "is not a weights-only checkpoint: loading it needs the Python object posix.system"
CORRUPT = "is corrupt or truncated ("


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``: what the crafted checkpoint of the issue did."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs/ goes to tmp_path
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(toy_pipelines, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DiT recipe and the ``last.ckpt`` of its 1-iteration run (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_tiny_recipe(root, toy_pipelines, family="dit", reward="brightness", name="dit.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["run", str(recipe), "--trainer.max_epochs=1"]) == 0
    ckpt = root / "runs" / "dit" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return recipe, ckpt



@contextlib.contextmanager
def serve(folder: Path):
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def crafted_copy(ckpt: Path, path: Path, marker: Path) -> Path:
    """``ckpt`` with a :class:`Payload` in its hyperparameters, saved with ``torch.save`` to ``path``; checks that
    a plain ``torch.load(weights_only=False)`` of it does run the payload (then removes the marker)."""
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"] = {"payload": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    torch.load(path, weights_only=False)  # the file is armed ...
    assert marker.exists()
    marker.unlink()  # ... and nothing below may run it again
    return path


def tensor_offset(path: Path, tensor: torch.Tensor) -> int:
    """Byte offset of ``tensor``'s data inside the checkpoint file (its record in the zip, stored uncompressed)."""
    data = path.read_bytes()
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    offset = data.find(raw)
    assert offset >= 0 and data.find(raw, offset + 1) < 0
    return offset


def damaged_copy(ckpt: Path, path: Path, kind: str, payload: bytes | None = None) -> Path:
    """A copy of ``ckpt`` with 64 bytes overwritten in the middle of the policy's largest tensor ("bytes"), or cut
    to half its size ("truncated")."""
    data = bytearray(ckpt.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    name, tensor = max(((k, v) for k, v in state.items() if ".denoiser." in k), key=lambda kv: kv[1].numel())
    at = tensor_offset(ckpt, tensor) + tensor.numel() * tensor.element_size() // 2
    data[at:at + 64] = payload if payload is not None else struct.pack("<16f", *[1e30] * 16)  # finite values
    path.write_bytes(bytes(data))
    return path


# ----------------------------------------------------------------------------------------------------------
# Point 1: a crafted checkpoint runs nothing
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "url"])
def test_a_crafted_checkpoint_runs_nothing(where, trained, tmp_path, capsys):
    recipe, ckpt = trained
    marker = tmp_path / "MARKER"
    crafted = crafted_copy(ckpt, tmp_path / "served" / "x.ckpt", marker)
    with serve(crafted.parent) as base:
        source = f"{base}/x.ckpt" if where == "url" else str(crafted)
        commands = [
            ["run", str(recipe), "--ckpt_path", source, "--trainer.max_epochs=2"],
            ["sample", "--config", str(recipe), "--ckpt", source, "--out", str(tmp_path / "s")],
            ["export", "--config", str(recipe), "--ckpt", source, "--out", str(tmp_path / "e")],
            ["validate", "--model", "helpers_cli.TinyRegression", "--ckpt_path", source],
            ["test", "--model", "helpers_cli.TinyRegression", "--ckpt_path", source],
        ]
        for args in commands:
            line = error_line(capsys, args)
            assert line.startswith(f"error: checkpoint {source} {UNSAFE}"), (args[0], line)
            assert not marker.exists(), args[0]
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_a_crafted_last_ckpt_runs_nothing(trained, tmp_path, capsys):
    """``--ckpt_path last`` (the newest version's last.ckpt, found by Lightning) goes through the same loader."""
    recipe, ckpt = trained
    marker = tmp_path / "MARKER"
    last = crafted_copy(ckpt, tmp_path / "runs" / "dit" / "version_0" / "checkpoints" / "last.ckpt", marker)
    line = error_line(capsys, ["run", str(recipe), "--ckpt_path", "last", "--trainer.max_epochs=2"])
    assert line.startswith(f"error: checkpoint {last.resolve()} {UNSAFE}") or \
        line.startswith(f"error: checkpoint {last} {UNSAFE}"), line
    assert not marker.exists()


def test_a_good_checkpoint_resumes_and_samples_from_a_url_and_every_load_is_weights_only(
        trained, tmp_path, monkeypatch, caplog, capsys):
    recipe, ckpt = trained
    calls: list[object] = []
    load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    caplog.set_level("INFO")
    with serve(ckpt.parent) as base:
        url = f"{base}/last.ckpt"
        assert main(["run", str(recipe), "--ckpt_path", url, "--trainer.max_epochs=2"]) == 0
        assert main(["sample", "--config", str(recipe), "--ckpt", url, "--out", str(tmp_path / "s")]) == 0
        assert main(["run", str(recipe), "--ckpt_path", str(ckpt), "--trainer.max_epochs=2"]) == 0
        line = error_line(capsys, ["run", str(recipe), "--ckpt_path", f"{base}/missing.ckpt"])
        assert line == f"error: could not download checkpoint {base}/missing.ckpt: HTTP 404 File not found", line
    assert (tmp_path / "s" / "rewards.json").is_file()
    assert f"Restored all states from the checkpoint at {url}" in caplog.text
    assert f"Restored all states from the checkpoint at {ckpt}" in caplog.text
    resumed = torch.load(tmp_path / "runs" / "dit" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert CHECKSUM_KEY in resumed
    assert calls and all(w is True for w in calls), calls  # explicit weights_only=True, whatever torch's default


def test_the_cli_trainer_loads_weights_only_even_when_asked_otherwise(trained, tmp_path):
    recipe, ckpt = trained
    marker = tmp_path / "MARKER"
    crafted = crafted_copy(ckpt, tmp_path / "x.ckpt", marker)
    cli = LitDiffacCLI(["--config", str(recipe), "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    with pytest.raises(UnsafeCheckpointError):
        cli.trainer.strategy.load_checkpoint(crafted, weights_only=False)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(crafted, weights_only=False)
    assert not marker.exists()
    assert cli.trainer.strategy.load_checkpoint(ckpt)["global_step"] > 0


def test_checkpoint_io_plugins_given_by_the_user_are_kept():
    from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO

    added = safe_checkpoint_plugins(None)
    assert len(added) == 1 and isinstance(added[0], SafeCheckpointIO)
    assert isinstance(safe_checkpoint_plugins("bf16-mixed")[-1], SafeCheckpointIO)
    own = TorchCheckpointIO()
    assert safe_checkpoint_plugins([own]) == [own]
    wrapper = AsyncCheckpointIO()
    assert safe_checkpoint_plugins(wrapper) is wrapper and isinstance(wrapper.checkpoint_io, SafeCheckpointIO)
    wrapper.teardown()


def test_strategies_that_load_files_themselves_are_checked_first(trained, tmp_path):
    """FSDP reads a full-state checkpoint file with a plain unpickler: the guard checks the file first."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class PlainUnpickling(SingleDeviceStrategy):
        def load_checkpoint(self, checkpoint_path, weights_only=None):
            self.seen = weights_only
            return torch.load(checkpoint_path, weights_only=False)

    _, ckpt = trained
    marker = tmp_path / "MARKER"
    crafted = crafted_copy(ckpt, tmp_path / "x.ckpt", marker)
    strategy = guard_strategy(PlainUnpickling(device=torch.device("cpu")))
    with pytest.raises(UnsafeCheckpointError):
        strategy.load_checkpoint(crafted)
    assert not marker.exists()
    assert strategy.load_checkpoint(ckpt)["global_step"] > 0 and strategy.seen is True


# ----------------------------------------------------------------------------------------------------------
# Point 6: corrupt and truncated checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_a_missing_checkpoint_is_one_error_line(trained, tmp_path, capsys):
    recipe, _ = trained
    missing = tmp_path / "nope.ckpt"
    for args in (["run", str(recipe), "--ckpt_path", str(missing)],
                 ["sample", "--config", str(recipe), "--ckpt", str(missing), "--out", str(tmp_path / "s")]):
        assert error_line(capsys, args) == f"error: checkpoint {missing} not found: no such file"


def test_checkpoints_carry_a_checksum_of_every_tensor(trained):
    _, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    stored = checkpoint.pop(CHECKSUM_KEY)
    assert stored == tensor_checksums(checkpoint)
    assert any(k.startswith("state_dict/") for k in stored) and any(k.startswith("optimizer_states") for k in stored)


@pytest.mark.parametrize("kind", ["bytes", "truncated"])
def test_a_damaged_checkpoint_is_one_error_line_for_resume_and_sample(kind, trained, tmp_path, capsys):
    recipe, ckpt = trained
    bad = damaged_copy(ckpt, tmp_path / "bad.ckpt", kind)
    expected = f"error: checkpoint {bad} {CORRUPT}"
    line = error_line(capsys, ["run", str(recipe), "--ckpt_path", str(bad), "--trainer.max_epochs=2"])
    assert line.startswith(expected), line
    if kind == "bytes":
        assert "does not match the checksum written with it" in line and "state_dict/backbone.denoiser." in line
    line = error_line(capsys, ["sample", "--config", str(recipe), "--ckpt", str(bad), "--out", str(tmp_path / "s")])
    assert line.startswith(expected), line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing trained
    with pytest.raises(CorruptCheckpointError):
        SafeCheckpointIO().load_checkpoint(bad)


def test_a_checkpoint_without_checksums_loads_and_non_finite_weights_are_caught(trained, tmp_path, capsys):
    recipe, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint[CHECKSUM_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)  # as written before checksums
    assert load_checkpoint(old)["global_step"] > 0
    bad = damaged_copy(old, tmp_path / "old_nan.ckpt", "bytes", payload=b"\xff" * 64)  # NaNs
    line = error_line(capsys, ["run", str(recipe), "--ckpt_path", str(bad), "--trainer.max_epochs=2"])
    assert line.startswith(f"error: checkpoint {bad} is corrupt or was saved after training diverged ("), line
    assert "are NaN or infinite" in line
    truncated = damaged_copy(old, tmp_path / "old_cut.ckpt", "truncated")
    with pytest.raises(CorruptCheckpointError, match="is corrupt or truncated"):
        load_checkpoint(truncated)


def test_value_head_files_are_safetensors_and_damage_is_one_line(tmp_path):
    from lit_diffac.value_heads.io import load_value_head, save_value_head

    head = torch.nn.Linear(64, 64)
    path = save_value_head(head, tmp_path / "head.safetensors")
    load_value_head(torch.nn.Linear(64, 64), path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="is corrupt or truncated, or not a safetensors file"):
        load_value_head(torch.nn.Linear(64, 64), cut)
    marker = tmp_path / "MARKER"
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"weight": Payload(marker)}, pickled)
    with pytest.raises(CorruptCheckpointError):
        load_value_head(torch.nn.Linear(64, 64), pickled)
    assert not marker.exists()
    nan = tmp_path / "nan.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64
    nan.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="non-finite values"):
        load_value_head(torch.nn.Linear(64, 64), nan)
