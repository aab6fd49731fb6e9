"""One smoke test per recipe: the recipe file as shipped, with tiny overrides, through the real CLI."""

from pathlib import Path

import pytest

from lit_diffac.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = {
    "pretrain": ["--trainer.max_steps=2", "--model.init_args.batch_size=8", "--model.init_args.eval_samples_per_prompt=1"],
    "value_pretrain": ["--trainer.max_epochs=1", "--model.init_args.batch_size=2",
                       "--model.init_args.minibatch_size=20"],
    "multi_reward": ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
                     "--model.init_args.evaluation.init_args.samples_per_prompt=1"],
    "grpo": ["--trainer.max_epochs=1", "--model.init_args.batch_size=4", "--model.init_args.minibatch_size=20",
             "--model.init_args.evaluation.init_args.samples_per_prompt=1"],
    "ddpo": ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
             "--model.init_args.evaluation.init_args.samples_per_prompt=1"],
    "actor_critic": ["--trainer.max_epochs=1", "--model.init_args.batch_size=2", "--model.init_args.minibatch_size=20",
                     "--model.init_args.evaluation.init_args.samples_per_prompt=1"],
}


def _kind(recipe: Path) -> str:
    return next(k for k in TINY if recipe.stem.startswith(k))


def test_sample_command_writes_images_and_rewards(tmp_path):
    import json

    recipe = RECIPES / "toy" / "actor_critic_dit.yaml"
    assert main(["sample", "--config", str(recipe), "--prompts", "toy:heldout", "--scale", "1.0",
                 "--steps", "last:2", "--out", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "rewards.json").read_text())
    assert len(report["images"]) == 20 and (tmp_path / "s" / "grid.png").is_file()
    assert {"digit_alignment", "digit_alignment_accuracy"} <= set(report["mean"])
    assert main(["sample", "--config", str(recipe), "--prompts", "toy:heldout", "--best-of", "2",
                 "--rank-by", "digit_alignment", "--out", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("recipe", sorted((RECIPES / "toy").glob("*.yaml")), ids=lambda p: p.stem)
def test_toy_recipe_runs(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["run", str(recipe), *TINY[_kind(recipe)], "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    if _kind(recipe) == "pretrain":
        args.append(f"--model.init_args.output_dir={tmp_path / 'pipeline'}")
    if _kind(recipe) == "value_pretrain":
        args.append(f"--model.init_args.output_path={tmp_path / 'head.safetensors'}")
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    if _kind(recipe) == "pretrain":
        assert (tmp_path / "pipeline" / "scheduler").is_dir()
        return
    if _kind(recipe) == "value_pretrain":
        assert (tmp_path / "head.safetensors").is_file()
    else:
        assert out[-1].startswith("summary: ")
        assert Path(out[-1].removeprefix("summary: ")).is_file()
        assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_every_recipe_family_is_covered():
    assert all(_kind(r) for r in (RECIPES / "toy").glob("*.yaml"))


def test_multi_reward_recipe_is_the_main_recipe_with_two_rewards():
    """The reward-hacking comparison runs the main recipe's critic scheme (replay, critic-chosen steps, lr)."""
    import yaml

    main_ = yaml.safe_load((RECIPES / "toy" / "actor_critic_dit.yaml").read_text())["model"]
    multi = yaml.safe_load((RECIPES / "toy" / "multi_reward_dit.yaml").read_text())["model"]
    assert multi["class_path"] == "lit_diffac.modules.MultiRewardActorCritic"
    m, d = multi["init_args"], main_["init_args"]
    assert [r["class_path"] for r in m["rewards"]] == ["lit_diffac.rewards.Brightness", *(
        r["class_path"] for r in d["rewards"])]
    own = {"rewards", "reward_weights", "value_per_reward"}
    assert {k: v for k, v in m.items() if k not in own} == {k: v for k, v in d.items() if k != "rewards"}
