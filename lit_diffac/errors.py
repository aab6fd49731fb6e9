"""Errors a user can fix: their message is the whole story (what went wrong and what to do).

``lit-diffac`` prints such an error as one line, ``error: <message>``, and exits with status 2 (the table of
them is ``docs/errors.md``).  Each class also derives from the built-in exception a Python caller would
expect (``ValueError``, ``OSError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "HubUnavailableError",
    "LitDiffacError",
    "PipelineNotFoundError",
    "PromptFileError",
    "RewardOutputError",
    "TrainingHalted",
    "find_user_error",
]


class LitDiffacError(Exception):
    """Base class: an error whose message names the problem and the fix (the CLI shows it as one line)."""


class ConfigError(LitDiffacError, ValueError):
    """A constructor argument out of range, or arguments that do not go together (checked at construction,
    before any model is run); the message names the class, the argument and the allowed range."""


class PromptFileError(LitDiffacError, ValueError):
    """A prompt source that is unusable: a file that is empty or not UTF-8 text, an unknown ``toy:`` set."""


class RewardOutputError(LitDiffacError, ValueError, TypeError):
    """A reward returned something other than a float tensor of one score per image."""


class CheckpointMismatchError(LitDiffacError, ValueError):
    """A checkpoint written by a different model (another backbone, value head or reward set)."""


class PipelineNotFoundError(LitDiffacError, FileNotFoundError):
    """Pipeline weights that are neither a local folder nor loadable from the hub (one-line message)."""


class HubUnavailableError(PipelineNotFoundError):
    """A Hugging Face Hub id was named but the hub is offline or unreachable."""


class TrainingHalted(LitDiffacError, RuntimeError):
    """Training stopped on purpose (e.g. too many consecutive non-finite iterations); a checkpoint was saved."""


def find_user_error(err: BaseException | None) -> LitDiffacError | None:
    """The first :class:`LitDiffacError` in ``err``'s cause / context chain (``err`` itself included), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, LitDiffacError):
            return err
        err = err.__cause__ or err.__context__
    return None
