"""Weight averages of runs from one start: data_seed, the soup's checks, its validation, the CLI.

Tiny models (``tiny_config``) trained on 40 real HER2ST spots, as in ``test_training``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import her2st_crop, tiny_recipe

from hifusion_model.checkpoint import load_checkpoint, load_model, save_checkpoint
from hifusion_model.cli import main as cli
from hifusion_model.config import tiny_config
from hifusion_model.errors import CheckpointError, HiFusionError
from hifusion_model.held_out import held_out_sections, validate
from hifusion_model.soups import average_state, save_soup
from hifusion_model.training import train


@pytest.fixture(scope="module")
def runs(her2st_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 2-epoch runs: seed 0 with data_seed 0 and 1, and seed 1."""
    folder = tmp_path_factory.mktemp("soups")
    section = her2st_crop(her2st_dir, folder)
    paths = {}
    for name, changes in {"d0": {}, "d1": {"data_seed": 1}, "s1": {"seed": 1}}.items():
        paths[name] = train([section], folder / f"{name}.pt", model_config=tiny_config(1),
                            genes=8, device="cpu", recipe=tiny_recipe(**changes)).checkpoint
    return paths


def test_data_seed_keeps_the_start_and_the_split_and_changes_the_order(runs) -> None:
    d0, d1, s1 = (load_checkpoint(runs[k]) for k in ("d0", "d1", "s1"))
    split = [s["n_val"] for s in d0.card["sections"]]
    assert [s["n_val"] for s in d1.card["sections"]] == split
    torch.testing.assert_close(d1.train_mean, d0.train_mean)  # the same training spots
    assert not torch.allclose(d1.state_dict["head.2.weight"], d0.state_dict["head.2.weight"])
    assert not torch.allclose(s1.train_mean, d0.train_mean)  # another seed: another split


def test_average_state_means_floats_and_keeps_counters() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    mean = average_state([a, b])
    torch.testing.assert_close(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["n"] == 4


def test_a_model_averaged_with_itself_validates_as_its_card_says(runs, tmp_path: Path) -> None:
    path, validation = save_soup([runs["d0"], runs["d0"]], tmp_path / "same.pt")
    card = load_checkpoint(runs["d0"]).card
    assert validation["mse"] == pytest.approx(card["validation"]["mse"], rel=1e-5)
    assert validation["gene_pcc"] == pytest.approx(card["validation"]["gene_pcc"], abs=1e-5)
    assert load_checkpoint(path).card["validation"] == validation


def test_soup_of_two_data_seeds_is_their_mean_and_is_validated(runs, tmp_path: Path) -> None:
    path, validation = save_soup([runs["d0"], runs["d1"]], tmp_path / "soup.pt", half=True)
    soup, parts = load_checkpoint(path), [load_checkpoint(runs[k]) for k in ("d0", "d1")]
    key = "head.2.weight"
    expected = (parts[0].state_dict[key] + parts[1].state_dict[key]) / 2
    torch.testing.assert_close(soup.state_dict[key], expected, atol=2e-3, rtol=1e-3)  # fp16
    assert [c["data_seed"] for c in soup.card["soup"]] == [None, 1]
    assert soup.card["soup"][1]["validation"] == parts[1].card["validation"]
    model, ckpt = load_model(path)  # measured in fp32, stored in fp16: close, not equal
    again = validate(model, ckpt, held_out_sections(ckpt.card))
    assert again["mse"] == pytest.approx(validation["mse"], rel=1e-2)
    assert again["n_spots"] == validation["n_spots"] == parts[0].card["validation"]["n_spots"]


def test_soups_refuse_what_has_no_common_start(runs, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="at least two"):
        save_soup([runs["d0"]], tmp_path / "one.pt")
    with pytest.raises(CheckpointError, match="other spots"):  # seed 1 held out other spots
        save_soup([runs["d0"], runs["s1"]], tmp_path / "x.pt")
    model, ckpt = load_model(runs["d1"])  # the same spots, but a card that says another seed
    card = {**ckpt.card, "recipe": {**ckpt.card["recipe"], "seed": 7}}
    reseeded = save_checkpoint(tmp_path / "reseeded.pt", model, train_mean=ckpt.train_mean,
                               card=card)
    with pytest.raises(CheckpointError, match="other weights .* seed"):
        save_soup([runs["d0"], reseeded], tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="overwrite its ingredient"):
        save_soup([runs["d0"], runs["d1"]], runs["d1"])
    assert not (tmp_path / "x.pt").exists()


def test_held_out_sections_need_the_files_the_card_lacks(runs, her2st_dir: Path,
                                                         tmp_path: Path) -> None:
    card = dict(load_checkpoint(runs["d0"]).card)
    card["sections"] = [{**s, "path": None} for s in card["sections"]]
    with pytest.raises(HiFusionError, match="give the sections"):
        held_out_sections(card)
    other = her2st_crop(her2st_dir, tmp_path, n_spots=30)
    with pytest.raises(HiFusionError, match="not the ones the model trained on"):
        held_out_sections(card, [other])


def test_soup_command_writes_and_reports_or_fails_cleanly(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.pt"
    assert cli(["soup", str(runs["d0"]), str(runs["d1"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the average: validation MSE" in printed and out.is_file()
    card = load_checkpoint(out).card  # the soup's command; each run keeps its own
    assert card["command"] is None and [c["command"] for c in card["soup"]] == [None, None]
    assert cli(["soup", str(runs["d0"]), str(runs["s1"]), "--out", str(tmp_path / "x.pt")]) == 2
    assert "trained on other spots" in capsys.readouterr().err
