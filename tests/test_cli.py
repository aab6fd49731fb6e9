"""The ``lit-diffac`` command line (``lit_diffac.cli``), with the tiny module of ``tests/helpers_cli.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_diffac import cli
from lit_diffac.cli import format_parser_error, main

TESTS_DIR = Path(__file__).resolve().parent
FAST = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false"]


def write_recipe(directory: Path, body: str, name: str = "recipe.yaml") -> str:
    path = directory / name
    path.write_text(body)
    return str(path)


BASE = """\
model:
  class_path: helpers_cli.TinyRegression
  init_args:
    lr: 0.1
trainer:
  max_steps: 2
"""


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path`` (the default logger writes to ./runs) with ``helpers_cli`` importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def expect_exit(capsys: pytest.CaptureFixture, args: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == code
    captured = capsys.readouterr()
    return captured.out + captured.err


# ---------------------------------------------------------------------------------------------- running


def test_run_fits_and_logs_to_tensorboard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, BASE, "tiny.yaml")
    assert main(["run", recipe, "--trainer.max_steps=2", *FAST]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "version_0"  # default logger: runs/<recipe stem>/version_<n>
    assert list(run_dir.glob("events.out.tfevents.*")), list(tmp_path.rglob("*"))
    assert (run_dir / "config.yaml").is_file()
    assert "summary:" not in capsys.readouterr().out  # the module wrote no summary.json
    assert main(["validate", "--config", recipe, *FAST]) == 0
    assert "val/loss" in capsys.readouterr().out


def test_summary_line_is_printed_last_and_interpolation_applies(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, """\
vars:
  width: 3
model:
  class_path: helpers_cli.TinyRegression
  init_args:
    hidden: ${vars.width}
    other: ${model.init_args.hidden}
    write_summary: true
trainer:
  max_steps: ${vars.width}
""")
    save_dir = tmp_path / "logs"
    main(["fit", "--config", recipe, f"--trainer.logger.init_args.save_dir={save_dir}", *FAST])
    summary = save_dir / "recipe" / "version_0" / "summary.json"
    assert json.loads(summary.read_text()) == {"hidden": 3, "other": 3}
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"summary: {summary.resolve()}"


def test_print_config_shows_defaults_and_resolved_interpolation(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, BASE.replace("lr: 0.1", "lr: 0.1\n    hidden: ${model.init_args.other}\n"
                                                                    "    other: 7"), "interp.yaml")
    out = expect_exit(capsys, ["run", recipe, "--print_config"], code=0)
    assert "seed_everything: 0" in out  # reproducible by default
    assert "hidden: 7" in out
    assert "class_path: lightning.pytorch.loggers.TensorBoardLogger" in out
    assert "name: interp" in out  # the run is named after the recipe


# ------------------------------------------------------------------------------------------------- help


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def sample(argv: list[str]) -> int:
        """Draw sample grids from a checkpoint."""
        return 0

    monkeypatch.setitem(cli.EXTRA_COMMANDS, "sample", sample)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "fit", "validate", "test"):
        assert f"\n  {command} " in out
    assert "Draw sample grids from a checkpoint." in out


def test_run_help_explains_recipe_and_lists_options(capsys: pytest.CaptureFixture) -> None:
    out = expect_exit(capsys, ["run", "--help"], code=0)
    assert out.startswith("usage: lit-diffac run RECIPE.yaml")
    assert "--trainer.max_steps" in out and "--model" in out and "--seed_everything" in out


def test_extra_commands_are_dispatched_before_lightning(capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def export(argv: list[str]) -> int:
        """Export a pipeline."""
        calls.append(argv)
        return 3 if "--fail" in argv else 0

    monkeypatch.setitem(cli.EXTRA_COMMANDS, "export", export)
    assert main(["export", "a", "--b=1"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["export", "--fail"])
    assert info.value.code == 3
    assert calls == [["a", "--b=1"], ["--fail"]]

    monkeypatch.setitem(cli.EXTRA_COMMANDS, "echo", cli.lazy_command("helpers_cli:echo_command", "Echo."))
    assert main(["echo", "x", "y"]) == 0
    assert capsys.readouterr().out == "echo: x y\n"


def test_python_m_help() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "lit_diffac", "--help"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "usage: lit-diffac" in result.stdout and "run" in result.stdout


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("body", "key", "suggestion"), [
    (BASE.replace("lr: 0.1", "lrr: 0.1"), "model.init_args.lrr", "model.init_args.lr"),
    (BASE.replace("max_steps: 2", "max_stepz: 2"), "trainer.max_stepz", "trainer.max_steps"),
    (BASE.replace("trainer:", "trainr:"), "trainr.max_steps", "trainer.max_steps"),
])
def test_unknown_key_in_recipe(tmp_path: Path, capsys: pytest.CaptureFixture, body: str, key: str,
                               suggestion: str) -> None:
    recipe = write_recipe(tmp_path, body)
    out = expect_exit(capsys, ["run", recipe])
    assert f"error: unknown key '{key}' in {recipe} (did you mean '{suggestion}'?)" in out
    assert "usage:" not in out  # no 60-line usage dump
    assert out.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("--model.init_args.lrr=1", "model.init_args.lrr", "model.init_args.lr"),
    ("--trainer.max_stepz=1", "trainer.max_stepz", "trainer.max_steps"),
])
def test_unknown_key_in_override(tmp_path: Path, capsys: pytest.CaptureFixture, override: str, key: str,
                                 suggestion: str) -> None:
    recipe = write_recipe(tmp_path, BASE)
    out = expect_exit(capsys, ["run", recipe, override])
    assert f"error: unknown key '{key}' in override {override} (did you mean '{suggestion}'?)" in out


def test_wrong_type_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, BASE.replace("lr: 0.1", "lr: 0.1\n    hidden: wide"))
    out = expect_exit(capsys, ["run", recipe])
    assert f"error: invalid value for 'model.init_args.hidden' in {recipe}: expected int, got 'wide'" in out
    # An override of the same key with a valid value does not hide where the bad value came from.
    out = expect_exit(capsys, ["run", recipe, "--model.init_args.hidden=4"])
    assert f"error: invalid value for 'model.init_args.hidden' in {recipe}: expected int, got 'wide'" in out
    out = expect_exit(capsys, ["run", write_recipe(tmp_path, BASE, "ok.yaml"), "--trainer.max_steps", "abc"])
    assert ("invalid value for 'trainer.max_steps' in override --trainer.max_steps abc: "
            "expected int, got 'abc'") in out


def test_bad_class_path_and_interpolation_and_missing_recipe(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, BASE.replace("TinyRegression", "TinyRegresion"))
    out = expect_exit(capsys, ["run", recipe])
    assert "cannot import class_path 'helpers_cli.TinyRegresion' for 'model'" in out
    assert "did you mean 'helpers_cli.TinyRegression'?" in out

    recipe = write_recipe(tmp_path, BASE.replace("lr: 0.1", "lr: ${vars.nope}"))
    out = expect_exit(capsys, ["run", recipe])
    assert "error: cannot resolve an interpolation for 'model.init_args.lr'" in out

    out = expect_exit(capsys, ["run", str(tmp_path / "missing.yaml")])
    assert "recipe file not found" in out
    assert "unknown command 'fitt' (did you mean 'fit'?)" in expect_exit(capsys, ["fitt"])


def test_format_parser_error_nested_subclass() -> None:
    message = (
        'Parser key "model":\n'
        "  Does not validate against any of the Union subtypes\n"
        "  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]\n"
        "  Errors:\n"
        "    - Problem with given class_path 'helpers_cli.TinyRegression':\n"
        '        Parser key "reward":\n'
        "          Problem with given class_path 'lit_diffac.rewards.JpegCompressibility':\n"
        "            Option 'qualty' is not accepted\n"
        "    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'dict'>\n"
    )
    assert format_parser_error(message) == ("unknown key 'model.init_args.reward.init_args.qualty' "
                                            "(did you mean 'model.init_args.reward.init_args.quality'?)")
    assert format_parser_error("something else entirely") == "something else entirely"


# --------------------------------------------------------------------------- user modules, trainer options

CHECKPOINTED = """\
model:
  class_path: helpers_cli.TinyRegression
trainer:
  max_epochs: 4
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_epochs: 2, save_top_k: -1, save_last: true, filename: "iteration={iteration}",
                  auto_insert_metric_name: false}
"""
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false"]


@pytest.fixture
def console_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.path`` as the console script has it: without the current folder ('' or '.')."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])


def test_user_module_in_current_folder_is_importable(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     console_sys_path: None) -> None:
    (tmp_path / "user_models_cwd.py").write_text("from helpers_cli import TinyRegression as Mine\n")
    recipe = write_recipe(tmp_path, BASE.replace("helpers_cli.TinyRegression", "user_models_cwd.Mine"))
    out = expect_exit(capsys, ["run", recipe, "--print_config"], code=0)
    assert "class_path: user_models_cwd.Mine" in out
    assert str(tmp_path) not in sys.path  # put back for the rest of this process


@pytest.mark.parametrize(("first_line", "expected"), [
    ("import package_that_is_not_installed_xyz",
     "user_models_{n}.py, line 1: No module named 'package_that_is_not_installed_xyz' (user_models_{n} imports a "
     "package that is not installed)"),
    ("raise RuntimeError('no GPU here')", "user_models_{n}.py, line 1: RuntimeError: no GPU here"),
    ("import torch; torch.no_such_function()",
     "user_models_{n}.py, line 1: AttributeError: module 'torch' has no attribute 'no_such_function'"),
])
def test_error_inside_a_user_module_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture, first_line: str,
                                             expected: str, request: pytest.FixtureRequest) -> None:
    n = request.node.callspec.indices["first_line"]
    (tmp_path / f"user_models_{n}.py").write_text(f"{first_line}\nfrom helpers_cli import TinyRegression as Mine\n")
    recipe = write_recipe(tmp_path, BASE.replace("helpers_cli.TinyRegression", f"user_models_{n}.Mine"))
    line = expect_exit(capsys, ["run", recipe]).strip().splitlines()[-1]
    assert line == (f"error: cannot import class_path 'user_models_{n}.Mine' for 'model' in {recipe}: "
                    + expected.format(n=n))


def test_missing_user_module_says_where_it_was_looked_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, BASE.replace("helpers_cli.TinyRegression", "not_here_rewards.Mine"))
    line = expect_exit(capsys, ["run", recipe]).strip().splitlines()[-1]
    assert line == (f"error: cannot import class_path 'not_here_rewards.Mine' for 'model' in {recipe}: no module "
                    "named 'not_here_rewards' (run lit-diffac from the folder that holds not_here_rewards.py, or "
                    "add that folder to PYTHONPATH)")


def test_enable_checkpointing_false_drops_the_recipes_model_checkpoint(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, CHECKPOINTED, "ckpt.yaml")
    assert main(["run", recipe, "--trainer.enable_checkpointing=false", *QUIET]) == 0
    assert "note: enable_checkpointing=false: dropped the recipe's 1 ModelCheckpoint callback(s)" in \
        capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_checkpoints_are_named_by_completed_iterations_and_logger_false_uses_the_run_folder(
        tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, CHECKPOINTED, "ckpt.yaml")
    assert main(["run", recipe, *QUIET]) == 0
    folder = tmp_path / "runs" / "ckpt" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["iteration=2.ckpt", "iteration=4.ckpt", "last.ckpt"]

    assert main(["run", recipe, "--trainer.logger=false", *QUIET]) == 0
    run = tmp_path / "runs" / "ckpt"  # not the current folder
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iteration=2.ckpt", "iteration=4.ckpt",
                                                                       "last.ckpt"]
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


HELP_SCRIPT = r"""
import sys
from lit_diffac.cli import main
for command in (["--help"], ["sample", "--help"], ["export", "--help"]):
    try:
        main(command)
    except SystemExit as exit:
        assert exit.code in (0, None), (command, exit.code)
    assert "lightning" not in sys.modules, f"{command} imported lightning"
print("ok")
"""


def test_help_does_not_import_lightning() -> None:
    path = os.pathsep.join(filter(None, [str(TESTS_DIR.parent), os.environ.get("PYTHONPATH")]))  # this checkout
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"
    assert "usage: lit-diffac sample" in result.stdout and "usage: lit-diffac export" in result.stdout
