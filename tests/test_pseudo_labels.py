"""Pseudo-labels: the gaps of a spot array, teachers' predictions there, and training on them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import Delaunay, cKDTree
from synthetic import spot_array_section, tiny_checkpoint
from test_training import tiny_recipe

from hifusion_model.cli import main
from hifusion_model.data.expression import select_top_genes
from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.engine.train import train
from hifusion_model.errors import ConfigError, SectionError
from hifusion_model.future.pseudo_labels import (
    gap_positions,
    lattice_of,
    pseudo_label,
    read_pseudo_labels,
)
from hifusion_model.inference.predict import (
    predict_section,
    predictions_to_anndata,
    write_predictions,
)
from hifusion_model.models.checkpoint import load_checkpoint, load_model
from hifusion_model.models.config import tiny_config

N_GENES = 12


def _rotate(xy: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return xy @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def test_gaps_of_a_rotated_jittered_square_array() -> None:
    rows, cols, pitch = 5, 6, 100.0
    grid = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2) * pitch
    jitter = np.random.default_rng(0).normal(0, 2, grid.shape)
    xy = _rotate(grid, 3) + jitter + 1000
    assert lattice_of(xy)[:2] == (pytest.approx(pitch, rel=0.03), 4)
    gaps = gap_positions(xy)
    centres = np.stack(np.meshgrid(np.arange(-1, cols) + 0.5, np.arange(-1, rows) + 0.5),
                       -1).reshape(-1, 2) * pitch
    expected = _rotate(centres, 3) + 1000  # every cell's middle, the rim's included
    assert len(gaps) == len(expected) == (rows + 1) * (cols + 1)
    error = cKDTree(expected).query(gaps)[0]  # 2 px of jitter; proposals are averaged
    assert error.max() < 8 and error.mean() < 2


def test_gaps_of_a_hex_array_are_its_triangles() -> None:
    pitch = 100.0
    xy = np.array([[c * pitch + (r % 2) * pitch / 2, r * pitch * np.sqrt(3) / 2]
                   for r in range(6) for c in range(7)])
    assert lattice_of(xy)[1] == 6
    gaps = gap_positions(xy)
    nearest = cKDTree(xy).query(gaps)[0]  # rim gaps have one or two spots, inner ones three
    np.testing.assert_allclose(nearest, pitch / np.sqrt(3), rtol=1e-6)
    triangles = xy[Delaunay(xy).simplices]
    edges = np.linalg.norm(triangles - np.roll(triangles, 1, axis=1), axis=2).max(axis=1)
    centroids = triangles[edges < 1.01 * pitch].mean(axis=1)  # not the rim's flat ones
    assert cKDTree(gaps).query(centroids)[0].max() < 1e-6


def test_a_lattice_needs_three_distinct_spots() -> None:
    with pytest.raises(SectionError, match="at least 3 spots"):
        lattice_of(np.zeros((2, 2)))
    with pytest.raises(SectionError, match="share positions"):
        lattice_of(np.zeros((5, 2)))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """40 spots of a synthetic ST array (HER2ST's geometry, image cropped around them) and two
    untrained tiny teachers for its top genes."""
    folder = tmp_path_factory.mktemp("pseudo")
    path = spot_array_section(folder)
    genes = select_top_genes([read_section(path)], N_GENES)
    teachers = [tiny_checkpoint(folder / f"t{i}.pt", genes, seed=i) for i in range(2)]
    return {"folder": folder, "section": path, "genes": genes, "teachers": teachers}


def test_teachers_label_the_gaps_with_their_mean(work: dict, tmp_path: Path) -> None:
    section = read_section(work["section"])
    slide = section_slide(section)
    teachers = [load_model(t) for t in work["teachers"]]
    pseudo = pseudo_label(section, slide, teachers, device="cpu", precision="fp32")
    assert 5 <= pseudo.n_obs < section.n_obs  # inner squares of 40 spots, on tissue, in the crop
    assert cKDTree(section.obsm["spatial"]).query(pseudo.obsm["spatial"])[0].min() > 0.6 * 290
    each = [predict_section(m, c, pseudo, slide, device="cpu", precision="fp32")
            for m, c in teachers]  # the same places, one teacher at a time
    np.testing.assert_allclose(pseudo.X, np.mean(each, axis=0), atol=1e-6)
    assert pseudo.uns["hifusion_pseudo"]["between_spots_of"] == "B4"
    write_predictions(pseudo, tmp_path / "B4.pseudo.h5ad")
    read = read_pseudo_labels(tmp_path / "B4.pseudo.h5ad")
    assert read.genes == work["genes"] and read.teachers == [str(t) for t in work["teachers"]]
    np.testing.assert_allclose(read.targets_for(read.genes[::-1], "log_relative"),
                               pseudo.X[:, ::-1])
    with pytest.raises(SectionError, match="lack 1 of the model's 2 genes"):
        read.targets_for([read.genes[0], "NOPE"], "log_relative")
    with pytest.raises(SectionError, match="pseudo-labels are log_relative"):
        read.targets_for(read.genes, "log1p_cp10k")


def test_teachers_must_agree_and_files_must_be_pseudo_labels(work: dict, tmp_path: Path) -> None:
    section = read_section(work["section"])
    slide = section_slide(section)
    other = tiny_checkpoint(tmp_path / "other.pt", work["genes"][:3])
    teachers = [load_model(work["teachers"][0]), load_model(other)]
    with pytest.raises(SectionError, match="teachers must agree"):
        pseudo_label(section, slide, teachers, device="cpu")
    ckpt = teachers[0][1]
    plain = predictions_to_anndata(section, np.zeros((section.n_obs, N_GENES)), ckpt)
    write_predictions(plain, tmp_path / "plain.pred.h5ad")
    with pytest.raises(SectionError, match="not a pseudo-label file"):
        read_pseudo_labels(tmp_path / "plain.pred.h5ad")
    with pytest.raises(SectionError, match="not found"):
        read_pseudo_labels(tmp_path / "missing.h5ad")


@pytest.mark.slow
def test_cli_pseudolabel_then_train_a_student(work: dict, capsys: pytest.CaptureFixture) -> None:
    folder, section = work["folder"], str(work["section"])
    pseudo = folder / "B4.pseudo.h5ad"
    argv = ["pseudolabel", section, "--model", *map(str, work["teachers"]), "--out", str(pseudo),
            "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    assert "spots between the 40 of B4.h5ad, the mean of 2 model(s)" in capsys.readouterr().out
    n_gaps = read_pseudo_labels(pseudo).section.n_obs

    student = folder / "student.pt"
    base = ["train", section, "--pseudo", str(pseudo), "--out", str(student), "--genes",
            str(N_GENES), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device",
            "cpu", "--model-config", str(_tiny_json(folder))]
    assert main(base) == 2
    assert "--set val_fraction=0" in capsys.readouterr().err
    assert not student.exists()
    assert main([*base, "--set", "val_fraction=0"]) == 0
    assert "epoch 1: every spot trained, no validation" in capsys.readouterr().out
    card = load_checkpoint(student).card
    measured, gaps = card["sections"]
    assert measured["n_train"] == 40 and gaps["n_train"] == n_gaps and gaps["n_val"] == 0
    assert gaps["pseudo_labels_from"] == [str(t) for t in work["teachers"]]
    assert card["data"] == ["B4", "B4 pseudo"]
    assert main(["info", str(student)]) == 0
    shown = capsys.readouterr().out
    assert re.search(rf"^Pseudo-labels +{n_gaps} spots of B4 pseudo, labelled by "
                     rf"{re.escape(str(work['teachers'][0]))}, ", shown, re.M)
    assert re.search("^Validation +none: every spot trains for the whole schedule", shown, re.M)


@pytest.mark.slow
def test_a_resumed_student_needs_its_pseudo_labels(work: dict, tmp_path: Path) -> None:
    from hifusion_model.errors import Cancelled

    section = read_section(work["section"])
    teachers = [load_model(t) for t in work["teachers"]]
    pseudo = tmp_path / "p.h5ad"
    write_predictions(pseudo_label(section, section_slide(section), teachers, device="cpu"),
                      pseudo)
    out = tmp_path / "m.pt"
    options = {"model_config": tiny_config(1), "genes": work["genes"], "device": "cpu"}
    calls = iter(range(10**6))
    with pytest.raises(Cancelled):
        train([work["section"]], out, pseudo_labels=[pseudo], should_stop=lambda: next(calls) >= 2,
              recipe=tiny_recipe(val_fraction=0.0), **options)
    with pytest.raises(ConfigError, match=r"written for sections \['B4', 'B4 pseudo'\]"):
        train([work["section"]], out, resume=True, device="cpu")
    result = train([work["section"]], out, pseudo_labels=[pseudo], resume=True, device="cpu")
    assert result.best_epoch == 2 and not result.validation


def _tiny_json(folder: Path) -> Path:
    import json

    config = tiny_config(1).to_dict()
    del config["genes"]
    path = folder / "tiny.json"
    path.write_text(json.dumps(config))
    return path
