"""The ``lit-diffac`` command line: Lightning's ``LightningCLI`` plus a recipe-first short form.

Usage::

    lit-diffac run RECIPE.yaml [--key=value ...]         # == lit-diffac fit --config RECIPE.yaml [...]
    lit-diffac fit --config RECIPE.yaml [--key=value ...]
    lit-diffac validate --config RECIPE.yaml [--ckpt_path=...]
    lit-diffac test --config RECIPE.yaml [--ckpt_path=...]
    lit-diffac <command> --help

A recipe is a LightningCLI YAML file::

    seed_everything: 0                       # the default; `true` picks a random seed
    vars:                                    # free variables for ${vars.NAME} interpolation
      steps: 10
    trainer:
      max_steps: 500
    model:
      class_path: lit_diffac.modules.toy_pretrain.ToyBasePretraining
      init_args:
        lr: 1.0e-3
        eval_steps: ${vars.steps}            # OmegaConf interpolation, resolved within the recipe file

Overrides use dotted keys (``--trainer.max_steps=3 --model.init_args.lr=1e-4``).  ``data:`` is optional:
the RL modules generate their own prompts.  Defaults that differ from plain ``LightningCLI``:

* the current folder is on ``sys.path``, as with ``python -m lit_diffac``: ``class_path: my_rewards.Saturation``
  finds ``./my_rewards.py``;
* ``seed_everything`` is ``0`` (runs are reproducible unless the recipe says otherwise);
* the logger is TensorBoard under ``runs/<name>/version_<n>``, with ``<name>`` the recipe file's stem
  (``lit_diffac`` when there is no recipe); with ``--trainer.logger=false`` the run folder (``config.yaml``,
  ``checkpoints/``) is ``runs/<name>`` instead of the current folder (unless ``trainer.default_root_dir`` is set);
* ``--trainer.enable_checkpointing=false`` drops the recipe's ``ModelCheckpoint`` callbacks (with a note)
  instead of failing;
* a ``ModelCheckpoint`` ``filename`` may use ``{iteration}``: the number of completed iterations (epochs), e.g.
  ``filename: "iteration={iteration}"`` with ``auto_insert_metric_name: false`` names the checkpoint written
  after 50 iterations ``iteration=50.ckpt`` (``{epoch}`` would say 49: Lightning counts epochs from 0);
* optimisers come from the module's own ``configure_optimizers`` (no ``--optimizer`` options);
* recipe errors (unknown or mistyped keys, wrong types) are reported as a single line naming the key, with
  the closest valid key, e.g. ``error: unknown key 'model.init_args.lrr' in recipe.yaml (did you mean
  'model.init_args.lr'?)``, and exit status 2.

After ``run``/``fit``, if the module wrote ``summary.json`` into ``trainer.log_dir``, the last line printed
is ``summary: <absolute path>``.

Commands that are not Lightning entry points (sampling, exporting, ...) register themselves in
:data:`EXTRA_COMMANDS`; ``main`` dispatches them before ``LightningCLI`` is built.

This module imports no Lightning at import time (``lit-diffac --help``, ``sample --help`` and ``export --help``
answer without it): :class:`LitDiffacCLI` is built on first use (module ``__getattr__``), and
``RecipeArgumentParser`` / ``format_parser_error`` come from :mod:`lit_diffac.cli_errors` the same way.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # imported lazily at run time (see the module docstring)
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from lit_diffac.cli_errors import RecipeArgumentParser, format_parser_error  # noqa: F401 - re-exported

__all__ = [
    "DEFAULT_RUN_NAME",
    "EXTRA_COMMANDS",
    "LitDiffacCLI",
    "RecipeArgumentParser",
    "format_parser_error",
    "lazy_command",
    "main",
    "tensorboard_logger",
]

PROG = "lit-diffac"

#: Logger name (the folder under ``runs/``) when no recipe file names the run.
DEFAULT_RUN_NAME = "lit_diffac"

#: Non-Lightning subcommands: ``name -> fn(argv_after_name) -> exit status``.  The first line of each
#: function's docstring is its description in ``lit-diffac --help``.  Register with
#: ``EXTRA_COMMANDS["sample"] = lazy_command("lit_diffac.sampling:main", "Draw sample grids ...")`` so
#: that the command's module is imported only when it runs.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {}

#: Descriptions of the Lightning subcommands in ``lit-diffac --help``.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model: lit-diffac fit --config RECIPE.yaml [overrides]",
    "validate": "run the validation loop once (e.g. on a checkpoint: --ckpt_path=...)",
    "test": "run the test loop once (e.g. on a checkpoint: --ckpt_path=...)",
}

RUN_DESCRIPTION = "train from a recipe: lit-diffac run RECIPE.yaml [overrides] (= fit --config RECIPE.yaml)"


def lazy_command(target: str, description: str) -> Callable[[list[str]], int]:
    """A command for :data:`EXTRA_COMMANDS` that imports ``"package.module:function"`` when it runs.

    Args:
        target: ``"package.module:function"``, a function ``fn(argv: list[str]) -> int``.
        description: one line for ``lit-diffac --help``.
    """
    module_name, _, attr = target.partition(":")

    def command(argv: list[str]) -> int:
        return getattr(importlib.import_module(module_name), attr)(argv)

    command.__doc__ = description
    command.__name__ = attr or module_name
    return command


EXTRA_COMMANDS["sample"] = lazy_command(
    "lit_diffac.sampling:sample_main",
    "generate images from a recipe's policy (optionally critic-steered or best-of-N) with their rewards")
EXTRA_COMMANDS["toy-eval"] = lazy_command(
    "lit_diffac.toy.evaluation:toy_eval_main",
    "report the toy world's figures: judge accuracy and each base model's held-out alignment")
EXTRA_COMMANDS["export"] = lazy_command(
    "lit_diffac.export:export_main",
    "write a checkpoint's policy (LoRA, merged or full weights, diffusers format) and critic as safetensors")
EXTRA_COMMANDS["convert-reward"] = lazy_command("lit_diffac.rewards.convert:convert_reward_main", "convert an official reward checkpoint (HPSv2, ImageReward) into a safetensors folder, offline")


def tensorboard_logger(name: str = DEFAULT_RUN_NAME, save_dir: str = "runs") -> dict[str, Any]:
    """The default ``trainer.logger``: a TensorBoard logger writing to ``<save_dir>/<name>/version_<n>``
    (no ``hp_metric = -1`` placeholder: the RL modules write the final held-out accuracy to the HParams tab)."""
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": save_dir, "name": name, "default_hp_metric": False},
    }


# --------------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------------


class LitDiffacCLIMethods:
    """``LightningCLI`` configured for lit_diffac recipes.

    * ``model`` is any ``LightningModule`` (``class_path`` + ``init_args``); ``data`` is optional;
    * recipes are read in OmegaConf mode (``${...}`` interpolation inside a recipe);
    * ``seed_everything`` defaults to ``0``; the default logger is TensorBoard under
      ``runs/<run_name>/version_<n>``;
    * no automatic optimiser options (the modules define ``configure_optimizers``);
    * readable one-line errors for unknown keys and wrong types (exit status 2);
    * after ``fit``, prints ``summary: <path>`` last when the module wrote ``summary.json`` to
      ``trainer.log_dir``.

    Args:
        args: the command line after the program name (``["fit", "--config", "r.yaml", ...]``).
        run_name: default TensorBoard run name (the logger's ``name``).
        help_command: command to suggest in error tips (default ``lit-diffac <subcommand>``).
        **kwargs: passed on to :class:`~lightning.pytorch.cli.LightningCLI` (override the defaults above).

    (These are :class:`LitDiffacCLI`'s methods; ``LitDiffacCLI`` itself, this class plus ``LightningCLI``, is
    built on first use so that importing :mod:`lit_diffac.cli` does not import Lightning.)
    """

    def __init__(self, args: list[str] | None = None, run_name: str = DEFAULT_RUN_NAME,
                 help_command: str | None = None, **kwargs: Any) -> None:
        from lit_diffac.cli_errors import RecipeArgumentParser

        self._argv = list(sys.argv[1:] if args is None else args)
        self._help_command = help_command
        self._run_name = run_name
        trainer_defaults = {"logger": tensorboard_logger(run_name), **kwargs.pop("trainer_defaults", {})}
        mode = {"parser_mode": "omegaconf"}
        parser_kwargs = {"prog": PROG, **mode, **{name: dict(mode) for name in self.subcommands()}}
        for key, value in kwargs.pop("parser_kwargs", {}).items():
            if key in parser_kwargs and isinstance(value, dict):
                parser_kwargs[key] = {**parser_kwargs[key], **value}
            else:
                parser_kwargs[key] = value
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", RecipeArgumentParser)
        super().__init__(args=self._argv, trainer_defaults=trainer_defaults, parser_kwargs=parser_kwargs,
                         **kwargs)

    def instantiate_classes(self) -> None:
        """Build the recipe's objects; a missing file (weights, pipeline, prompts) becomes one clear error line."""
        from lit_diffac.cli_errors import missing_file_cause
        from lit_diffac.errors import find_user_error

        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - re-raised unless a missing file explains it
            user_error = find_user_error(err)
            cause = str(user_error) if user_error is not None else missing_file_cause(err)
            if cause is None:
                raise
            sys.stderr.write(f"error: {cause}\n")
            raise SystemExit(2) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]):
        """``--trainer.enable_progress_bar=false`` also drops a progress bar the recipe lists in
        ``trainer.callbacks``, and ``--trainer.enable_checkpointing=false`` its ``ModelCheckpoint`` callbacks
        (with a note; Lightning would refuse either combination).  Without a logger (``--trainer.logger=false``)
        the run folder (``config.yaml``, ``checkpoints/``) is ``runs/<run_name>``, not the current folder, unless
        ``default_root_dir`` is set.  A ``ModelCheckpoint`` ``filename`` may use ``{iteration}`` (completed
        iterations: ``epoch + 1`` at the end of an epoch).

        Every checkpoint the trainer reads is weights-only and checked (``--ckpt_path`` files and URLs, also for
        ``validate``/``test``), and every one it writes carries tensor checksums: a
        :class:`~lit_diffac.checkpoints.SafeCheckpointIO` is added unless the recipe names its own
        ``CheckpointIO``, and the strategy's ``load_checkpoint`` always passes ``weights_only=True``."""
        from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

        from lit_diffac.checkpoints import guard_strategy, safe_checkpoint_plugins

        listed = config.get("callbacks")
        if listed is not None and not isinstance(listed, list):
            listed = config["callbacks"] = [listed]
        if config.get("enable_progress_bar") is False and listed:
            listed = config["callbacks"] = [c for c in listed if not isinstance(c, ProgressBar)]
        if config.get("enable_checkpointing") is False and listed:
            dropped = [c for c in listed if isinstance(c, ModelCheckpoint)]
            if dropped:
                listed = config["callbacks"] = [c for c in listed if not isinstance(c, ModelCheckpoint)]
                print(f"note: enable_checkpointing=false: dropped the recipe's {len(dropped)} ModelCheckpoint "
                      "callback(s); no checkpoint is written", file=sys.stderr, flush=True)
        if any(isinstance(c, ModelCheckpoint) and "{iteration" in (c.filename or "") for c in listed or []):
            callbacks = [*callbacks, _iteration_metric()]
        if config.get("logger") in (None, False) and config.get("default_root_dir") is None:
            config["default_root_dir"] = str(Path("runs") / self._run_name)
        config["plugins"] = safe_checkpoint_plugins(config.get("plugins"), config.get("strategy"),
                                                    config.get("accelerator"))
        trainer = super()._instantiate_trainer(config, callbacks)
        guard_strategy(trainer.strategy)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``vars``: free recipe variables for ``${vars.name}`` interpolation (used by no class)."""
        parser.add_argument(
            "--vars", type=dict[str, Any] | None, default=None,
            help="Free recipe variables, referenced elsewhere in the recipe as ${vars.NAME} (OmegaConf "
                 "interpolation, resolved when the recipe file is loaded). Not passed to any class.",
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (sampling is a separate command, not ``predict``)."""
        from lightning.pytorch.cli import LightningCLI

        subcommands = dict(LightningCLI.subcommands())
        subcommands.pop("predict", None)
        return subcommands

    def _valid_keys(self) -> list[str]:
        subcommand = self._argv[0] if self._argv else None
        parsers = getattr(self, "_subcommand_parsers", {})
        parser = parsers.get(subcommand, self.parser)
        return [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")]

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (never ``sys.argv``: :func:`main` passes it) with readable errors."""
        from lit_diffac.cli_errors import RecipeArgumentParser, config_paths, format_parser_error

        subcommand = self._argv[0] if self._argv and not self._argv[0].startswith("-") else None
        help_command = self._help_command or " ".join(filter(None, [PROG, subcommand]))

        def formatter(message: str) -> str:
            return format_parser_error(message, self._valid_keys(), self._argv)

        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for p in parsers:
            if isinstance(p, RecipeArgumentParser):
                p.error_formatter = formatter
                p.help_command = help_command
        try:
            if isinstance(args, dict):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except Exception as err:  # OmegaConf raises its own errors for bad ${...} interpolations
            if type(err).__module__.split(".")[0] != "omegaconf":
                raise
            key = getattr(err, "full_key", None)
            where = f" for '{key}'" if key else ""
            configs = config_paths(self._argv)
            where += f" in {', '.join(configs)}" if configs else ""
            reason = str(getattr(err, "msg", err)).splitlines()[0]
            parser.error(f"cannot resolve an interpolation{where}: {reason}")

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path``'s hyperparameters as ``LightningCLI`` does, but through
        :func:`lit_diffac.checkpoints.load_checkpoint` (weights-only, memory-mapped; a truncated, unreadable or
        non-weights-only file is one ``error:`` line before anything is built).  Its checksums are checked when
        the ``Trainer`` loads it."""
        from lit_diffac.checkpoints import load_checkpoint

        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = load_checkpoint(ckpt_path, verify=False, mmap=True)
        hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
        del checkpoint
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_fit(self) -> None:
        """``--ckpt_path last``: continue the newest ``version_<n>`` of this run (its ``last.ckpt``, its logs)."""
        if self.config_init.get(self.subcommand, {}).get("ckpt_path") == "last":
            print(resume_latest_version(self.trainer), file=sys.stderr, flush=True)

    def after_fit(self) -> None:
        """Print ``summary: <absolute path>`` (last) if the module wrote ``summary.json`` in the log dir."""
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or log_dir is None:
            return
        summary = Path(log_dir) / "summary.json"
        if summary.is_file():
            sys.stderr.flush()
            print(f"summary: {summary.resolve()}", flush=True)


def _import_lightning() -> None:
    """Import Lightning (its CLI module) on first use.

    Lightning gives its ``lightning`` logger a ``StreamHandler`` bound to ``sys.stderr`` *as it is at import
    time*.  Imported here lazily, that can be a stream an in-process caller put there for the moment and closes
    later (pytest's ``capsys``, ``contextlib.redirect_stderr``): every later Lightning log line would then fail
    ("--- Logging error ---").  So the handler is bound to the process's own stderr, as when Lightning is
    imported at start-up.
    """
    if "lightning.pytorch.cli" in sys.modules:
        return
    swap = "lightning" not in sys.modules and sys.__stderr__ is not None and sys.stderr is not sys.__stderr__
    saved, sys.stderr = sys.stderr, (sys.__stderr__ if swap else sys.stderr)
    try:
        importlib.import_module("lightning.pytorch.cli")
    finally:
        sys.stderr = saved


@functools.cache
def _cli_class() -> type[LightningCLI]:
    """:class:`LitDiffacCLI`: :class:`LitDiffacCLIMethods` on ``LightningCLI`` (imports Lightning)."""
    _import_lightning()
    from lightning.pytorch.cli import LightningCLI

    class LitDiffacCLI(LitDiffacCLIMethods, LightningCLI):
        __doc__ = LitDiffacCLIMethods.__doc__

    LitDiffacCLI.__module__ = __name__
    LitDiffacCLI.__qualname__ = "LitDiffacCLI"
    return LitDiffacCLI


def _iteration_metric() -> Any:
    """A callback that puts ``iteration`` (completed iterations, i.e. epochs) into ``trainer.callback_metrics``
    for ``ModelCheckpoint(filename="iteration={iteration}", auto_insert_metric_name=False)``: at the end of
    epoch index 49 it is 50 (Lightning runs ``ModelCheckpoint`` callbacks after the others)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class IterationMetric(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            trainer.callback_metrics["iteration"] = torch.tensor(trainer.current_epoch)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.callback_metrics["iteration"] = torch.tensor(trainer.current_epoch + 1)

    return IterationMetric()


def __getattr__(name: str) -> Any:
    """``LitDiffacCLI``, ``RecipeArgumentParser`` and ``format_parser_error``, imported on first use (they
    need Lightning, which ``lit-diffac --help`` and the non-Lightning commands do without)."""
    if name == "LitDiffacCLI":
        return _cli_class()
    if name in ("RecipeArgumentParser", "format_parser_error"):
        _import_lightning()
        from lit_diffac import cli_errors

        return getattr(cli_errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resume_latest_version(trainer: Any) -> str:
    """Point the trainer's logger at the newest ``version_<n>`` holding a ``checkpoints/last*.ckpt``.

    Lightning looks for ``last.ckpt`` in *this* run's checkpoint folder, which for a new logger version is
    empty; pointing the logger at the newest version that has one makes ``--ckpt_path last`` resume it (and
    its TensorBoard curves continue).  Returns a line for the log saying what happens.
    """
    logger = trainer.logger
    root = getattr(logger, "root_dir", None)
    if root is None or not hasattr(logger, "_version"):
        return "resume: --ckpt_path last uses the trainer's checkpoint folder (no versioned logger)"
    found = sorted(Path(root).glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        return f"resume: no checkpoints/last.ckpt under {Path(root).resolve()}: starting a new run"
    logger._version = int(found[-1].parent.parent.name.removeprefix("version_"))
    return f"resume: continuing {found[-1].resolve()}"


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.splitlines()[0].strip() if doc else ""


def top_level_help() -> str:
    """The text of ``lit-diffac --help``."""
    rows = [("run", RUN_DESCRIPTION), *LIGHTNING_COMMANDS.items()]
    rows += [(name, _description(fn)) for name, fn in sorted(EXTRA_COMMANDS.items())]
    width = max(len(name) for name, _ in rows) + 2
    commands = "\n".join(f"  {name:<{width}}{text}" for name, text in rows)
    return (
        f"usage: {PROG} <command> [options]\n\n"
        "Align text-to-image diffusion models with PPO (state-aligned latent actor-critic, GRPO, DDPO),\n"
        "as PyTorch Lightning modules configured by YAML recipes.\n\n"
        f"commands:\n{commands}\n\n"
        "examples:\n"
        f"  {PROG} run recipes/toy/pretrain_unet.yaml --trainer.max_steps=100\n"
        f"  {PROG} fit --config RECIPE.yaml --model.init_args.lr=1e-4\n"
        f"  {PROG} run RECIPE.yaml --print_config      # show the resolved recipe\n\n"
        f"Run '{PROG} <command> --help' for the options of a command.\n"
    )


def run_help() -> str:
    """The first lines of ``lit-diffac run --help`` (the ``fit`` options follow)."""
    return (
        f"usage: {PROG} run RECIPE.yaml [--key=value ...]\n\n"
        f"Train from a recipe. '{PROG} run RECIPE.yaml [overrides]' is '{PROG} fit --config RECIPE.yaml\n"
        "[overrides]'; overrides are dotted keys, e.g. --trainer.max_steps=3 --model.init_args.lr=1e-3.\n"
        "TensorBoard logs go to runs/<RECIPE stem>/version_<n>. A module's own options (what goes under\n"
        f"model.init_args): '{PROG} fit --model.help lit_diffac.modules.LatentActorCritic'. The options of\n"
        "'fit' follow.\n\n"
    )


def _config_stem(argv: list[str]) -> str | None:
    _import_lightning()  # before cli_errors, which imports it
    from lit_diffac.cli_errors import config_paths

    configs = config_paths(argv)
    return Path(configs[0]).stem if configs else None


def _quiet_warnings() -> None:
    """Silence warnings that do not apply to lit_diffac's RL modules (they do no heavy data loading)."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Lightning 2.6 with recent torch: a deprecation inside Lightning itself, nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches \(\d+\) is smaller than the "
                            r"logging interval.*")
    # Frozen text encoders / VAEs stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lit-diffac`` and ``python -m lit_diffac``.

    Args:
        args: the command line after the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success.  Failures raise ``SystemExit`` with a non-zero status (2 for usage and recipe
        errors, as argparse does; an extra command's own status otherwise), and ``--help`` of a
        subcommand raises ``SystemExit(0)``, so ``python -m lit_diffac`` exits correctly too.

    The current folder is put first on ``sys.path`` while the command runs, as ``python -m`` does, so that a
    recipe's ``class_path: my_rewards.Saturation`` finds ``./my_rewards.py`` from the console script too.
    """
    argv = list(sys.argv[1:] if args is None else args)
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _dispatch(argv)
    except Exception as err:
        _import_lightning()  # before cli_errors, which imports it
        from lit_diffac.cli_errors import user_error_message  # noqa: PLC0415 - the one error-formatting module

        # A LitDiffacError anywhere in the chain, or a lit_diffac constructor's own ValueError while the
        # recipe's objects were built (e.g. an out-of-range argument): one line, not a traceback.
        message = user_error_message(err)
        if message is None:
            raise
        sys.stderr.flush()
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None
    finally:  # callers in the same process (tests, notebooks) get their sys.path back
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _dispatch(argv: list[str]) -> int:
    """:func:`main` without the translation of :class:`~lit_diffac.errors.LitDiffacError` into ``error:``."""
    if not argv:
        sys.stderr.write(top_level_help())
        raise SystemExit(2)
    command = argv[0]
    asks_help = command in ("-h", "--help") or (command in EXTRA_COMMANDS and {"-h", "--help"} & set(argv[1:]))
    if not asks_help:  # every other command builds Lightning objects: import it first, as at start-up
        _import_lightning()
    if command in EXTRA_COMMANDS:
        status = int(EXTRA_COMMANDS[command](argv[1:]) or 0)
        if status:
            raise SystemExit(status)
        return 0
    if command in ("-h", "--help"):
        sys.stdout.write(top_level_help())
        return 0
    known = ["run", *LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
    if not command.startswith("-") and command not in known:
        _import_lightning()  # before cli_errors, which imports it
        from lit_diffac.cli_errors import closest

        hint = closest(command, known)
        tail = f" (did you mean '{hint}'?)" if hint else ""
        sys.stderr.write(f"tip: list the commands with: {PROG} --help\n"
                         f"error: unknown command '{command}'{tail}\n")
        raise SystemExit(2)

    _quiet_warnings()
    help_command = None
    if command == "run":
        rest = argv[1:]
        if rest and rest[0] in ("-h", "--help"):
            sys.stdout.write(run_help())
            sys.stdout.flush()
            _cli_class()(args=["fit", "--help"])
            return 0  # not reached: --help exits
        if rest and not rest[0].startswith("-") and not Path(rest[0]).is_file():
            sys.stderr.write(f"error: recipe file not found: '{rest[0]}'\n")
            raise SystemExit(2)
        if not rest or rest[0].startswith("-"):
            sys.stderr.write(f"usage: {PROG} run RECIPE.yaml [--key=value ...]\n"
                             f"error: {PROG} run needs a recipe file first"
                             f"{f', got {rest[0]!r}' if rest else ''}\n")
            raise SystemExit(2)
        argv = ["fit", "--config", rest[0], *rest[1:]]
        help_command = f"{PROG} run {rest[0]}"
    run_name = _config_stem(argv[1:]) or DEFAULT_RUN_NAME
    _cli_class()(args=argv, run_name=run_name, help_command=help_command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
