"""Whole user workflows through the console entry point (``lit_diffac.cli:main``, and the installed
``lit-diffac`` script): the README's own reward run from the user's folder, sampling from a run folder, value
pretraining's output, and what the package declares it needs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch
import yaml

from lit_diffac.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES = ROOT / "recipes"
TINY_RL = ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
           "--model.init_args.evaluation.init_args.samples_per_prompt=1", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]


def readme_block(marker: str) -> str:
    """The fenced code block right after ``<!-- test: marker -->`` in the README."""
    match = re.search(rf"<!-- test: {marker} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"README.md has no block marked {marker!r}"
    return match.group(1)


def user_folder(folder: Path, rewards_module: str | None = None) -> Path:
    """``folder`` as the README has the user set it up: ``my_rewards.py`` and ``my_recipe.yaml`` (the main job
    with its ``rewards:`` replaced by the README's recipe lines)."""
    (folder / "my_rewards.py").write_text(rewards_module or readme_block("reward-example"))
    recipe = yaml.safe_load((RECIPES / "toy" / "actor_critic_dit.yaml").read_text())
    recipe["model"]["init_args"].update(yaml.safe_load(textwrap.dedent(readme_block("reward-recipe-lines"))))
    (folder / "my_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "my_recipe.yaml"


@pytest.fixture
def in_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder is ``tmp_path``, and ``sys.path`` is the console script's: the folder is not on it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    for name in ("my_rewards",):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_readme_reward_runs_from_the_users_folder_then_samples_from_the_run(in_user_folder: Path, capsys) -> None:
    from lit_diffac.rewards.base import ConstantRewardWarning

    user_folder(in_user_folder)
    with pytest.warns(ConstantRewardWarning, match="reward 'saturation' gave all .* the same score \\(0\\)"):
        assert main(["run", "my_recipe.yaml", *TINY_RL]) == 0
    assert str(in_user_folder) not in sys.path
    run = in_user_folder / "runs" / "my_recipe" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert {"eval/saturation", "eval/prompt_length"} <= set(summary["final"])  # the keys the README names

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward/saturation_mean", "reward/saturation_std", "eval/saturation",
            "reward/prompt_length_mean"} <= tags, sorted(tags)

    # `lit-diffac sample` finds the run's config.yaml next to checkpoints/, as export does
    capsys.readouterr()
    with pytest.warns(ConstantRewardWarning):  # the sampled module's own Saturation instance
        assert main(["sample", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", "samples"]) == 0
    assert f"recipe: {(run / 'config.yaml').resolve()}" in capsys.readouterr().err
    report = json.loads((in_user_folder / "samples" / "rewards.json").read_text())
    assert {"saturation", "prompt_length"} <= set(report["mean"]) and len(report["images"]) == 20


def test_sample_without_config_names_what_is_missing(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2
    assert "pass --config RECIPE.yaml" in capsys.readouterr().err
    lone = tmp_path / "checkpoints" / "lone.ckpt"  # a checkpoints/ folder without the run's config.yaml
    lone.parent.mkdir()
    lone.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(lone), "--out", str(tmp_path / "s")])
    assert f"no recipe: {tmp_path / 'config.yaml'} does not exist" in capsys.readouterr().err


def lit_diffac_script() -> Path:
    script = Path(sys.executable).parent / "lit-diffac"
    if not script.is_file():
        pytest.skip("no installed lit-diffac console script next to this Python")
    return script


def test_installed_console_script_imports_the_users_module(tmp_path: Path) -> None:
    """The real ``lit-diffac`` script (sys.path[0] is its bin folder, not the current folder)."""
    script = lit_diffac_script()
    user_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(script), "run", "my_recipe.yaml", "--print_config"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: my_rewards.Saturation" in done.stdout

    # an import error inside the user's module is shown as such, with its line
    (tmp_path / "my_rewards.py").write_text("import colour_science_not_installed\n" + readme_block("reward-example"))
    done = subprocess.run([str(script), "run", "my_recipe.yaml"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: cannot import class_path 'my_rewards.Saturation' for 'model.init_args.rewards' in my_recipe.yaml: "
        "my_rewards.py, line 1: No module named 'colour_science_not_installed' (my_rewards imports a package "
        "that is not installed)")


def test_value_pretraining_writes_the_head_into_its_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["run", str(RECIPES / "toy" / "value_pretrain_dit.yaml"), "--trainer.max_epochs=1",
            "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
            "--model.init_args.output_path=null", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    assert main(args) == 0
    head = tmp_path / "runs" / "value_pretrain_dit" / "version_0" / "value_head.safetensors"
    assert head.is_file(), sorted(str(p) for p in tmp_path.rglob("*"))
    assert f"saved value head to {head.resolve()}" in capsys.readouterr().out


def test_rl_recipes_name_checkpoints_by_iteration() -> None:
    for recipe in sorted(RECIPES.glob("*/*.yaml")):
        config = yaml.safe_load(recipe.read_text()) or {}
        for callback in (config.get("trainer") or {}).get("callbacks") or []:
            if callback["class_path"].endswith("ModelCheckpoint"):
                init = callback.get("init_args", {})
                assert init.get("filename") == "iteration={iteration}", recipe
                assert init.get("auto_insert_metric_name") is False, recipe


# ------------------------------------------------------------------------------------------ install hygiene

#: Import names whose distribution is not found by ``packages_distributions`` in every environment.
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


class _Imports(ast.NodeVisitor):
    """Top-level names of the absolute imports of a module, leaving out those in a ``try`` whose ``except``
    catches ``ImportError`` (optional, with a fallback)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Try(self, node: ast.Try) -> None:
        caught = {getattr(h.type, "id", None) for h in node.handlers} | {
            getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
        if not caught & {"ImportError", "ModuleNotFoundError"}:
            self.generic_visit(node)
            return
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name.split(".")[0] for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.names.add(node.module.split(".")[0])


def imported_top_level_names() -> set[str]:
    visitor = _Imports()
    for path in (ROOT / "lit_diffac").rglob("*.py"):
        visitor.visit(ast.parse(path.read_text(), str(path)))
    return {n for n in visitor.names if n not in sys.stdlib_module_names and n not in ("lit_diffac", "__future__")}


def test_every_imported_package_is_declared_and_private_apis_are_pinned() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r): r for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    installed = packages_distributions()
    undeclared = []
    for name in sorted(imported_top_level_names()):
        candidates = {DISTRIBUTION_OF.get(name, name).lower().replace("_", "-")}
        candidates |= {d.lower().replace("_", "-") for d in installed.get(name, [])}
        if not candidates & (set(core) | extras):
            undeclared.append(name)
    assert not undeclared, f"imported by lit_diffac but not declared in pyproject.toml: {undeclared}"
    for name in ("huggingface-hub", "pyyaml"):
        assert name in core, name
    # private APIs: jsonargparse (cli_errors.py) and peft internals (backbones/lora.py) bounded to the tested minor
    for name in ("jsonargparse", "peft"):
        assert "<" in core[name], core[name]
    # the main job needs no extra: dev / ocr / remote packages are not core dependencies
    assert not {"pytest", "matplotlib", "msgpack", "rapidocr", "onnxruntime"} & set(core)


HIDE_EXTRAS = r"""
import importlib.metadata as md
import sys

HIDDEN = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "msgpack": "msgpack", "rapidocr": "rapidocr",
          "onnxruntime": "onnxruntime", "pytest": "pytest"}
for module in HIDDEN:
    sys.modules[module] = None  # `import module` fails and find_spec says absent, as when not installed
hidden = {d.lower().replace("_", "-") for d in HIDDEN.values()}


def hide(lookup):
    def wrapper(name, *args, **kwargs):
        if name.lower().replace("_", "-") in hidden:
            raise md.PackageNotFoundError(name)
        return lookup(name, *args, **kwargs)
    return wrapper


md.version, md.distribution = hide(md.version), hide(md.distribution)
from lit_diffac.cli import main

main(sys.argv[1:])
"""


def test_main_job_needs_neither_dev_extras_nor_scikit_learn(tmp_path: Path) -> None:
    """The README's main job (shrunk) with pytest, matplotlib, scikit-learn and the optional reward back-ends
    hidden as if not installed."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's lit_diffac
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", HIDE_EXTRAS, "run", str(RECIPES / "toy" / "actor_critic_dit.yaml"),
                           *TINY_RL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("summary: ")


def test_optimizer_and_schedule_come_from_the_recipe(tmp_path: Path, monkeypatch) -> None:
    """The README's optimiser / schedule lines, as command-line overrides: SGD with momentum, halved per iteration."""
    monkeypatch.chdir(tmp_path)
    args = ["run", str(RECIPES / "toy" / "actor_critic_dit.yaml"), *TINY_RL, "--trainer.max_epochs=2",
            "--model.init_args.optimizer.class_path=torch.optim.SGD",
            "--model.init_args.optimizer.init_args.momentum=0.9",
            "--model.init_args.lr_scheduler.class_path=torch.optim.lr_scheduler.StepLR",
            "--model.init_args.lr_scheduler.init_args.step_size=1",
            "--model.init_args.lr_scheduler.init_args.gamma=0.5",
            "--model.init_args.critic_replay=null"]
    assert main(args) == 0
    run = tmp_path / "runs" / "actor_critic_dit" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    groups = [state["param_groups"][0] for state in ckpt["optimizer_states"]]
    assert [g["momentum"] for g in groups] == [0.9, 0.9] and "betas" not in groups[0]  # SGD, not AdamW
    assert [g["lr"] for g in groups] == [1e-4 * 0.25, 1e-3 * 0.25]  # two steps of the schedule (recipe: 1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/actor_lr")] == pytest.approx([1e-4, 5e-5])
