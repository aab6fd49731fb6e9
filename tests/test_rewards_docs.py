"""The reward extension API as documented in docs/rewards.md: the example runs as written, recipes name
rewards by ``class_path``, and a recipe that names missing weights fails saying which file and where to
get it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lit_diffac.rewards import Reward

DOC = Path(__file__).resolve().parent.parent / "docs" / "rewards.md"


def doc_block(marker: str) -> str:
    """The fenced code block right after ``<!-- test: marker -->`` in docs/rewards.md."""
    match = re.search(rf"<!-- test: {marker} -->\n```\w+\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/rewards.md has no block marked {marker!r}"
    return match.group(1)


@pytest.fixture
def my_rewards(tmp_path, monkeypatch):
    """The documented example saved as ``my_rewards.py`` and importable, as a user would have it."""
    (tmp_path / "my_rewards.py").write_text(doc_block("reward-example"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    import sys

    sys.modules.pop("my_rewards", None)
    yield importlib.import_module("my_rewards")
    sys.modules.pop("my_rewards", None)


def instantiate(entry: dict) -> Reward:
    """Instantiate one ``rewards:`` entry of a recipe the way the CLI does (jsonargparse ``class_path``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    return parser.instantiate_classes(parser.parse_object({"reward": entry})).reward


def test_readme_example_is_short_and_runs_as_written(my_rewards):
    assert len(doc_block("reward-example").strip().splitlines()) <= 20
    images = torch.zeros(2, 3, 8, 8)
    images[1, 0] = 1.0  # pure red: saturation 1
    reward = my_rewards.Saturation()
    assert reward.name == "saturation"
    torch.testing.assert_close(reward(images, ["a", "b"]), torch.tensor([0.0, 1.0]))
    assert my_rewards.prompt_length(images, ["ab", "abc"]).tolist() == [2.0, 3.0]


def test_recipe_rewards_by_class_path(my_rewards):
    rewards = yaml.safe_load(doc_block("reward-recipe"))["model"]["init_args"]["rewards"]
    saturation, length = instantiate(rewards[0]), instantiate(rewards[1])
    assert isinstance(saturation, my_rewards.Saturation) and saturation.gamma == 0.5
    assert [saturation.name, length.name] == ["saturation", "prompt_length"]  # metric keys reward/<name>
    images = torch.rand(3, 3, 8, 8)
    assert length(images, ["a", "bb", "ccc"]).tolist() == [1.0, 2.0, 3.0]


def test_documented_recipe_with_missing_weights_names_the_file_and_where_to_get_it(my_rewards):
    from lit_diffac.rewards.clip import WeightsNotFoundError

    pickscore = yaml.safe_load(doc_block("reward-recipe"))["model"]["init_args"]["rewards"][2]
    assert not Path(pickscore["init_args"]["pretrained"]).exists()
    with pytest.raises(WeightsNotFoundError) as err:
        instantiate(pickscore)
    assert "/models/PickScore_v1" in str(err.value)
    assert "https://huggingface.co/yuvalkirstain/PickScore_v1" in str(err.value)


def test_cli_recipe_with_missing_weights_fails_with_the_message(my_rewards, tmp_path, capsys):
    """The toy recipe with the documented rewards added, through ``lit-diffac run``."""
    from lit_diffac.cli import main

    recipe = yaml.safe_load((DOC.parent.parent / "recipes" / "toy" / "actor_critic_unet.yaml").read_text())
    documented = yaml.safe_load(doc_block("reward-recipe"))["model"]["init_args"]
    recipe["model"]["init_args"]["rewards"] = documented["rewards"]
    recipe["model"]["init_args"]["reward_weights"] = documented["reward_weights"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as err:
        main(["run", str(path)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # one line: which file, where to get it
    assert line.startswith("error: PickScore weights not found: folder '/models/PickScore_v1' does not exist")
    assert "https://huggingface.co/yuvalkirstain/PickScore_v1" in line


def test_readme_shows_the_same_tested_example():
    readme = (DOC.parent.parent / "README.md").read_text()
    match = re.search(r"<!-- test: reward-example -->\n```\w+\n(.*?)```", readme, re.S)
    assert match and match.group(1) == doc_block("reward-example")
