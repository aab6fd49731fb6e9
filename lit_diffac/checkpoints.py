"""Checkpoints that load safely: weights-only unpickling (URLs included) and per-tensor checksums.

Every checkpoint lit_diffac reads goes through :func:`load_checkpoint`: ``lit-diffac run/fit/validate/test
--ckpt_path`` (the CLI installs :class:`SafeCheckpointIO` on every ``Trainer``), ``lit-diffac sample --ckpt`` and
``lit-diffac export --ckpt``.  It

* always unpickles with ``torch.load(..., weights_only=True)``, passed explicitly (whatever the installed torch's
  default), for local files, ``http(s)://`` URLs (downloaded to a temporary file first) and other ``fsspec``
  URLs alike: a file that needs any other Python object to load (e.g. a crafted one whose ``__reduce__`` calls
  ``os.system``) is refused before anything in it runs, with :class:`UnsafeCheckpointError`;
* verifies the CRC-32 of every tensor against the checksums :class:`SafeCheckpointIO` wrote next to them
  (:data:`CHECKSUM_KEY`), so bytes changed on disk are found instead of being trained or sampled from;
  a checkpoint written without checksums (older ones) still loads, after a check that its weights are finite;
* turns a truncated or unreadable file into one line, :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Any, Callable, Iterator, Mapping

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_diffac.errors import LitDiffacError

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointDownloadError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "SafeCheckpointIO",
    "UnsafeCheckpointError",
    "add_checksums",
    "guard_strategy",
    "is_url",
    "load_checkpoint",
    "safe_checkpoint_plugins",
    "tensor_checksums",
    "verify_checkpoint",
]

#: Top-level key of the ``{tensor path: CRC-32}`` table :class:`SafeCheckpointIO` adds to each checkpoint.
CHECKSUM_KEY = "lit_diffac_checksums"

#: What to do about a checkpoint that cannot be used (the end of the one-line messages).
FIX = ("use another checkpoint of the run (its checkpoints/ folder also keeps the periodic ones) or start "
       "without this one")


class UnsafeCheckpointError(LitDiffacError, ValueError):
    """A checkpoint that needs Python objects other than tensors and plain containers to load (it could run code)."""


class CorruptCheckpointError(LitDiffacError, ValueError):
    """A checkpoint that is truncated, unreadable, or whose tensors no longer match their checksums."""


class CheckpointNotFoundError(LitDiffacError, FileNotFoundError):
    """No checkpoint file at the path given."""


class CheckpointDownloadError(LitDiffacError, OSError):
    """A checkpoint URL that could not be downloaded."""


def is_url(path: Any) -> bool:
    """Whether ``path`` is an ``http://`` or ``https://`` URL."""
    return str(path).lower().startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------------


def _walk_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in nested dicts / lists / tuples, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if prefix == "" and key == CHECKSUM_KEY:
                continue
            name = key if isinstance(key, str) else f"[{key!r}]"
            yield from _walk_tensors(value, f"{prefix}/{name}" if prefix else name)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk_tensors(value, f"{prefix}[{i}]")


def _crc32(tensor: torch.Tensor) -> int | None:
    """CRC-32 of a dense tensor's bytes (``None`` for tensors without plain bytes: sparse, meta, subclasses)."""
    if (type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided
            or tensor.is_quantized or tensor.device.type == "meta"):
        return None
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return zlib.crc32(data.view(torch.uint8).numpy())


def tensor_checksums(checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """``{path: CRC-32}`` of every tensor in ``checkpoint`` (paths such as ``state_dict/value_head.out.0.weight``)."""
    sums: dict[str, int] = {}
    for path, tensor in _walk_tensors(checkpoint):
        crc = _crc32(tensor)
        if crc is not None:
            sums[path] = crc
    return sums


def add_checksums(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with :data:`CHECKSUM_KEY` holding :func:`tensor_checksums`."""
    return {**checkpoint, CHECKSUM_KEY: tensor_checksums(checkpoint)}


def _verify(checkpoint: Any, source: str) -> None:
    """Check the tensors against the stored checksums, or (no checksums) that ``state_dict`` is finite."""
    if not isinstance(checkpoint, Mapping):
        return
    stored = checkpoint.get(CHECKSUM_KEY)
    if isinstance(stored, Mapping):
        found = dict(_walk_tensors(checkpoint))
        for path, crc in stored.items():
            if path not in found:
                raise CorruptCheckpointError(
                    f"checkpoint {source} is corrupt or truncated (tensor {path}, listed in its checksums, is "
                    f"missing); {FIX}")
            actual = _crc32(found[path])
            if actual is not None and actual != crc:
                raise CorruptCheckpointError(
                    f"checkpoint {source} is corrupt or truncated (tensor {path} does not match the checksum "
                    f"written with it: the file changed after it was saved); {FIX}")
        return
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.layout == torch.strided \
                and value.device.type != "meta":
            bad = int((~torch.isfinite(value.detach())).sum())
            if bad:
                raise CorruptCheckpointError(
                    f"checkpoint {source} is corrupt or was saved after training diverged ({bad} of the "
                    f"{value.numel()} values of state_dict/{key} are NaN or infinite, and the file has no "
                    f"checksums to tell damage from divergence); {FIX}")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


_GLOBAL = re.compile(r"(?:GLOBAL|Unsupported class|unrecognized function)\s+([\w.<>]+)")


def _refusal(err: BaseException, source: str) -> LitDiffacError:
    """The one-line error for an exception of ``torch.load(..., weights_only=True)``."""
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        match = _GLOBAL.search(text)
        if match:
            return UnsafeCheckpointError(
                f"checkpoint {source} is not a weights-only checkpoint: loading it needs the Python object "
                f"{match.group(1)}, which could run code, so it was not loaded (lit-diffac loads checkpoints with "
                f"torch.load(weights_only=True) only); use a checkpoint written by lit-diffac / Lightning, or "
                "convert this one where its source is trusted")
        return CorruptCheckpointError(f"checkpoint {source} is corrupt or truncated (its pickled data cannot be "
                                      f"read: {_short(text)}); {FIX}")
    if isinstance(err, EOFError):
        reason = "the file ends early"
    elif isinstance(err, RuntimeError) and "central directory" in text:
        reason = "no zip central directory: the file is cut short"
    elif isinstance(err, (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError,
                          KeyError, TypeError, AttributeError, IndexError, OverflowError)):
        reason = _short(first)
    else:
        reason = f"{type(err).__name__}: {_short(first)}"
    return CorruptCheckpointError(f"checkpoint {source} is corrupt or truncated ({reason}); {FIX}")


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _torch_load(file: Any, source: str, map_location: Any, mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)`` with its failures as one-line errors."""
    try:
        try:
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(file, map_location=map_location, weights_only=True)  # a legacy-format file
    except (LitDiffacError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - every way a damaged file fails becomes one line
        if isinstance(err, RuntimeError) and "is_available() is False" in str(err):
            raise  # a map_location problem (CUDA tensors on a machine without CUDA), not a damaged file
        raise _refusal(err, source) from err


def _download(url: str, folder: str, timeout: float = 60.0) -> str:
    """Download ``url`` into ``folder``; returns the file's path."""
    target = os.path.join(folder, "checkpoint.ckpt")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except urllib.error.HTTPError as err:
        raise CheckpointDownloadError(f"could not download checkpoint {url}: HTTP {err.code} {err.reason}") \
            from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise CheckpointDownloadError(f"could not download checkpoint {url}: {reason}; check the URL and the "
                                      "connection, or download it and pass the file") from None
    return target


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True,
                    mmap: bool = False) -> Any:
    """Load a checkpoint weights-only, then check its tensors (see the module docstring).

    Args:
        path: a local file, an ``http(s)://`` URL (downloaded to a temporary file, deleted afterwards) or
            another ``fsspec`` URL (``s3://...``).
        map_location: as for :func:`torch.load`.
        verify: check the tensors against the stored checksums (no checksums: check ``state_dict`` is finite).
        mmap: memory-map a local file instead of reading it (for a check whose result is dropped).

    Raises:
        CheckpointNotFoundError: no file at ``path`` (a ``FileNotFoundError``).
        UnsafeCheckpointError: the file needs other Python objects than tensors and containers.
        CorruptCheckpointError: the file is truncated, unreadable or changed since it was saved.
        CheckpointDownloadError: the URL could not be downloaded.
    """
    source = str(path)
    if is_url(source):
        with tempfile.TemporaryDirectory(prefix="lit_diffac_ckpt_") as folder:
            checkpoint = _torch_load(_download(source, folder), source, map_location)
    elif "://" in source and not source.startswith("file://"):
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(source)
        if not fs.exists(source):
            raise CheckpointNotFoundError(f"checkpoint {source} not found")
        with fs.open(source, "rb") as f:
            checkpoint = _torch_load(f, source, map_location)
    else:
        local = source.removeprefix("file://")
        if not os.path.exists(local):
            raise CheckpointNotFoundError(f"checkpoint {source} not found: no such file")
        if os.path.isdir(local):
            raise CorruptCheckpointError(f"checkpoint {source} is a folder, not a checkpoint file; pass the "
                                         ".ckpt file inside it")
        checkpoint = _torch_load(local, source, map_location, mmap=mmap)
    if verify:
        _verify(checkpoint, source)
    return checkpoint


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that the checkpoint file ``path`` loads weights-only and matches its checksums (nothing is kept;
    a local file is memory-mapped).  Folders (sharded FSDP / DeepSpeed checkpoints) are not checked."""
    if not is_url(path) and os.path.isdir(str(path)):
        return
    load_checkpoint(path, mmap=True)


# ----------------------------------------------------------------------------------------------------------
# Lightning
# ----------------------------------------------------------------------------------------------------------


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes per-tensor checksums and reads with :func:`load_checkpoint`.

    ``load_checkpoint`` ignores the ``weights_only`` Lightning passes (``None`` by default, ``False`` for URLs in
    Lightning 2.6): it is always weights-only.  ``LitDiffacCLI`` puts one on every ``Trainer`` unless the recipe
    names its own ``CheckpointIO``; in Python: ``Trainer(plugins=[SafeCheckpointIO()])``.

    Args:
        checksums: write :data:`CHECKSUM_KEY` into saved checkpoints.
    """

    def __init__(self, checksums: bool = True) -> None:
        super().__init__()
        self.checksums = checksums

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self.checksums:
            checkpoint = add_checksums(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = load_checkpoint(path, map_location=map_location)
        if not isinstance(checkpoint, dict):
            raise CorruptCheckpointError(f"checkpoint {path} is not a Lightning checkpoint (it holds a "
                                         f"{type(checkpoint).__name__}, not a dict); {FIX}")
        return checkpoint


def _is_xla(strategy: Any, accelerator: Any) -> bool:
    names = f"{strategy if isinstance(strategy, str) else type(strategy).__name__} {accelerator}".lower()
    return "xla" in names or "tpu" in names


def safe_checkpoint_plugins(plugins: Any, strategy: Any = None, accelerator: Any = None) -> Any:
    """``Trainer(plugins=...)`` with a :class:`SafeCheckpointIO` added, unless a ``CheckpointIO`` is already given
    (as a plugin or on a ``Strategy`` instance: then it is kept; a wrapping one such as ``AsyncCheckpointIO``
    without its own inner ``CheckpointIO`` gets a :class:`SafeCheckpointIO` inside).  XLA (TPU) strategies,
    which need their own ``XLACheckpointIO``, are left alone."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    given = [p for p in listed if isinstance(p, CheckpointIO)]
    own = getattr(strategy, "_checkpoint_io", None)
    if own is not None:
        given.append(own)
    for io in given:
        if isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:
            io.checkpoint_io = SafeCheckpointIO()
    if given or _is_xla(strategy, accelerator):
        return plugins
    return [*listed, SafeCheckpointIO()]


def guard_strategy(strategy: Any) -> Any:
    """Make ``strategy.load_checkpoint`` weights-only whatever its ``CheckpointIO``.

    It always passes ``weights_only=True`` on (Lightning passes ``None``, or ``False`` for URLs).  Strategies that
    load files without their ``CheckpointIO`` (FSDP's full-state file is read with a plain unpickler, DeepSpeed
    with ``load_full_weights``) first have a single-file checkpoint checked by :func:`verify_checkpoint`.
    Returns ``strategy``.
    """
    from lightning.pytorch.strategies import Strategy

    if getattr(strategy, "_lit_diffac_guarded", False):
        return strategy
    original: Callable[..., Any] = strategy.load_checkpoint
    bypasses_io = type(strategy).load_checkpoint is not Strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        if bypasses_io:
            verify_checkpoint(checkpoint_path)
        return original(checkpoint_path, weights_only=True)

    strategy.load_checkpoint = load_checkpoint
    strategy._lit_diffac_guarded = True
    return strategy
