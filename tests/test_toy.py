"""The toy digits world: data, prompts, tokenizer, judge, base-model pretraining and the shipped weights."""

import json

import lightning as L
import pytest
import torch

from lit_diffac.rewards.toy import DigitAlignment
from lit_diffac.toy.classifier import DigitClassifier, accuracy
from lit_diffac.toy.digits import load_digits
from lit_diffac.toy.prompts import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, digit_of, make_prompt, prompt_table
from lit_diffac.toy.text import write_tokenizer


def test_split_is_fixed_disjoint_and_stratified():
    train, heldout = load_digits("train"), load_digits("heldout")
    assert (len(train), len(heldout)) == (1438, 359)
    assert train.images.shape[1:] == (1, 16, 16)
    assert -1.0 <= train.images.min() and train.images.max() <= 1.0
    assert torch.equal(load_digits("heldout").labels, heldout.labels)
    assert set(heldout.labels.tolist()) == set(range(10))
    # no held-out image appears in the training split
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:, :, ::4, ::4]}
    assert sum(tuple(x.flatten().tolist()) in flat_train for x in heldout.images[:, :, ::4, ::4]) < 5
    with pytest.raises(ValueError, match="split"):
        load_digits("test")


def test_prompts_and_digit_parsing():
    assert make_prompt(7, "the number {word}") == "the number seven"
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    for split in ("train", "heldout"):
        for prompt, digit in prompt_table(split):
            assert digit_of(prompt) == digit
    with pytest.raises(ValueError, match="names no digit"):
        digit_of("a cat")


def test_tokenizer_one_token_per_word_and_unknown_words_still_tokenise(tmp_path):
    tokenizer = write_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    ids = tokenizer("the number seven").input_ids
    assert len(ids) == 5 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in tokenizer("zebra crossing").input_ids[1:-1]


def test_shipped_judge_accuracy_and_reward_on_real_digits():
    judge = DigitClassifier.from_pretrained(
        __import__("lit_diffac.rewards.toy", fromlist=["x"]).DEFAULT_CLASSIFIER)
    heldout = load_digits("heldout")
    assert accuracy(judge, heldout.images, heldout.labels) >= 0.97
    reward = DigitAlignment()
    images = ((heldout.images[:20] + 1) / 2).expand(-1, 3, -1, -1)
    right = [f"the digit {int(d)}" for d in heldout.labels[:20]]
    wrong = [f"the digit {(int(d) + 1) % 10}" for d in heldout.labels[:20]]
    assert reward(images, right).mean() > 0.9 > 0.1 > reward(images, wrong).mean()
    assert reward.accuracy(images, right).mean() >= 0.9


def test_missing_judge_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no digit classifier"):
        DigitClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_pretraining_step_saves_a_loadable_pipeline(family, tmp_path):
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.modules import ToyBasePretraining

    L.seed_everything(0)
    module = ToyBasePretraining(family=family, output_dir=str(tmp_path / family), batch_size=8,
                                eval_every_n_steps=0, eval_samples_per_prompt=1)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module)
    provenance = json.loads((tmp_path / family / "lit_diffac.json").read_text())
    assert provenance["steps"] == 2 and 0 <= provenance["final_eval"]["alignment_accuracy"] <= 1
    backbone = (UNetBackbone if family == "unet" else DiTBackbone)(str(tmp_path / family))
    x = torch.randn(2, *backbone.latent_shape)
    out = backbone(x, torch.tensor([10, 900]), backbone.encode_prompts(["the digit 1", "handwritten two"]))
    assert out.prediction.shape == x.shape


@pytest.mark.parametrize("alias", ["toy-unet", "toy-dit"])
def test_shipped_toy_models_load_with_from_pretrained_and_generate(alias):
    from lit_diffac.backbones import DiTBackbone, UNetBackbone
    from lit_diffac.evaluation import default_sampler, generate

    backbone = (UNetBackbone if alias == "toy-unet" else DiTBackbone)(alias)
    images = generate(backbone, default_sampler(backbone), ["the digit 3", "the number five"], seed=0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert images.std() > 0.1  # not a blank canvas
