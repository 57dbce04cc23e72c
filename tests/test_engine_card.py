"""The model card: typed, written by the trainer, and still read from cards that described the
validation split in words (the bundled model's among them)."""

from __future__ import annotations

import copy

import pytest

from hifusion_model.data.splits import ValidationSplit
from hifusion_model.engine.card import ModelCard, Refit
from hifusion_model.engine.recipes import TrainConfig
from hifusion_model.engine.train import train
from hifusion_model.errors import CheckpointError, ConfigError, HiFusionError
from hifusion_model.evaluation.held_out import held_out_sections
from hifusion_model.models import checkpoint
from hifusion_model.models.checkpoint import bundled_model_path, load_checkpoint

SENTENCES = [
    ("sections B4-copy, C2", ValidationSplit("sections", sections=("B4-copy", "C2"))),
    ("spatial blocks: 4x4 per section, >= 15% of spots held out",
     ValidationSplit("spatial_blocks", fraction=0.15, grid=4)),
    ("none: every spot trains (refit to the epoch a selection run chose)",
     ValidationSplit("none", refit=True)),
    ("none: every spot trains for the whole schedule (val_fraction 0)",
     ValidationSplit("none", refit=False)),
]


@pytest.fixture(scope="module")
def bundled_card() -> dict:
    return load_checkpoint(bundled_model_path()).card


@pytest.mark.parametrize(("sentence", "split"), SENTENCES)
def test_a_split_in_words_reads_as_the_typed_split_that_says_it(sentence, split):
    assert ValidationSplit.from_sentence(sentence) == split
    assert split.describe() == sentence
    assert ValidationSplit.from_dict(split.to_dict()) == split


def test_unknown_splits_are_refused():
    with pytest.raises(ConfigError, match="'random spots' is not one napari-hifusion wrote"):
        ValidationSplit.from_sentence("random spots")
    with pytest.raises(ConfigError, match="unknown validation split 'random'"):
        ValidationSplit("random")


def test_the_bundled_card_reads_typed_and_writes_back_what_it_held(bundled_card):
    card = ModelCard.from_dict(bundled_card)
    assert card.split == ValidationSplit("none", refit=True)
    assert card.outcome.refit.split == ValidationSplit("spatial_blocks", fraction=0.15, grid=4)
    assert card.outcome.refit.validation == bundled_card["validation"]
    assert sorted(card.encoder_init) == ["region", "spot"] and card.recipe.refit
    assert set(card.extra) == {"software", "test"}
    written = card.to_dict()
    # the same card, now with the typed splits beside the sentences
    assert written.pop("split") == {"kind": "none", "refit": True}
    assert written["refit"].pop("selection_split") == {"kind": "spatial_blocks",
                                                       "fraction": 0.15, "grid": 4}
    # and without the recipe fields since removed, which the bundled card holds off
    retired = {k: bundled_card["recipe"].pop(k) for k in TrainConfig._retired}
    assert retired == TrainConfig._retired
    assert written == bundled_card


def test_an_old_resume_states_refit_reads_its_sentence():
    old = {"epoch": 3, "validation": {"mse": 0.5}, "selection": "m.selection.pt",
           "validation_split": SENTENCES[1][0], "selection_command": "hifusion train"}
    refit = Refit.from_dict(old)
    assert refit.split == SENTENCES[1][1] and refit.epoch == 3
    assert Refit.from_dict(refit.to_dict()) == refit


def test_a_card_not_written_by_training_is_named_so():
    with pytest.raises(CheckpointError, match="has no recipe: it was not written by hifusion"):
        ModelCard.from_dict({"data": ["A1"], "sections": [], "validation_split": "none: x"})


def test_held_out_spots_are_drawn_only_for_a_spatial_split(bundled_card):
    with pytest.raises(HiFusionError, match="a refit model has trained on its validation spots"):
        held_out_sections(bundled_card)
    selection = copy.deepcopy(bundled_card)
    del selection["refit"]
    selection["validation_split"] = SENTENCES[0][0]
    with pytest.raises(HiFusionError, match="validated on 'sections B4-copy, C2'"):
        held_out_sections(selection)


def test_a_missing_bundled_model_is_one_clear_error_wherever_it_is_asked_for(
        tmp_path, monkeypatch, spot_array):
    monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="bundled model is missing from this installation"):
        checkpoint.resolve_checkpoint_path("bundled")
    with pytest.raises(CheckpointError, match="bundled model is missing from this installation"):
        train([spot_array], tmp_path / "m.pt", init="bundled", device="cpu")
    assert not (tmp_path / "m.pt").exists()
