"""Sub-spot estimates: the per-tile read-out, its identity with the level prediction, µm placement."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch

from hifusion_model.api import predict
from hifusion_model.cli import main
from hifusion_model.cli import subspot as subspot_cli
from hifusion_model.data.dataset import SpotDataset, as_unit_float
from hifusion_model.data.sections import read_section, section_slide, write_section
from hifusion_model.errors import ConfigError, SectionError
from hifusion_model.inference import subspot
from hifusion_model.inference.maps import read_map, write_map
from hifusion_model.inference.predict import predict_section, write_predictions
from hifusion_model.inference.subspot import (
    SUBSPOT_LAYER,
    SubspotPrediction,
    subspot_map,
    subspot_predictions,
)
from hifusion_model.models.backbones import use_level
from hifusion_model.models.checkpoint import save_checkpoint
from hifusion_model.models.hifusion import zscore_per_channel
from hifusion_model.models.registry import create_model

N_SPOTS = 6


@pytest.fixture(scope="module")
def section_and_slide(synthetic_section_path: Path):
    """The first spots of the synthetic section and its open slide."""
    section = read_section(synthetic_section_path)[:N_SPOTS].copy()
    slide = section_slide(section)
    yield section, slide
    slide.close()


def tiny(genes: list[str], **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("hifusion_tiny", genes=genes, **overrides).eval()


def test_docstring_examples_run() -> None:
    for module in (subspot, subspot_cli):
        assert doctest.testmod(module).failed == 0


def test_the_tile_mean_is_the_level_prediction_when_the_level_map_needs_no_alignment(
        section_and_slide) -> None:
    """224-px spots (as released): 7 × 7 tiles of 32 px give 1 × 1 features each, a 7 × 7 map
    the size of level 1's, so the mean of the per-tile read-outs is the level-7 prediction."""
    section, slide = section_and_slide
    genes = list(section.var_names)
    model = tiny(genes, spot_px=224, spot_um=154.0)
    r = subspot_predictions(model, section, slide, device="cpu", precision="fp32", workers=0)
    assert r.tiles.shape == (N_SPOTS, 7, 7, len(genes)) and r.tiles.dtype == np.float32
    assert r.exact and r.k == 7 and r.tile_um == pytest.approx(22.0)
    np.testing.assert_allclose(r.tile_mean, r.level, atol=1e-5)
    agreement = r.agreement()
    assert agreement["level"]["max_abs"] < 1e-5
    assert agreement["final"]["max_abs"] > 1e-3  # another head: it differs, and the report says so
    # the final prediction is the one predict_section gives
    final = predict_section(model, model.config, section, slide, device="cpu", precision="fp32",
                            workers=0)
    np.testing.assert_allclose(r.prediction, final, atol=1e-5)


def test_each_tile_is_the_level_head_on_that_tile_alone(section_and_slide) -> None:
    """Tile (i, j) is row i (y) and column j (x) of the spot patch, read with level 7's
    BatchNorm statistics; a model whose level map is pooled down says the identity is only
    approximate."""
    section, slide = section_and_slide
    genes = list(section.var_names)
    model = tiny(genes, level_norm="per_level")
    r = subspot_predictions(model, section, slide, genes=["GENE3", "ERBB2"], device="cpu",
                            precision="fp32", workers=0)
    assert r.genes == ["GENE3", "ERBB2"] and not r.exact  # 56-px spots: 7×7 max-pooled to 2×2
    patch = as_unit_float(SpotDataset(section, slide, model.config, raw=True)[2]["spot"][None])
    spot = zscore_per_channel(patch)
    t = model.config.spot_px // 7
    columns = [genes.index("GENE3"), genes.index("ERBB2")]
    with torch.inference_mode(), use_level(model.spot_encoder, model.config.levels.index(7)):
        for i, j in [(0, 0), (0, 6), (5, 1), (3, 3)]:
            tile = spot[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t]
            want = model.level_head(model.spot_encoder(tile).mean(dim=(-2, -1)))[0, columns]
            np.testing.assert_allclose(r.tiles[2, i, j], want.numpy(), atol=1e-5)


def test_tiles_lie_in_um_where_the_model_read_them() -> None:
    """Each tile's value is at the map pixel of its centre; nothing outside the spots."""
    k, tile_um = 7, 22.0
    centers = np.array([[1000.0, 2000.0], [1400.0, 2000.0], [1200.0, 2346.4]])  # apart, x ≠ y
    tiles = np.random.default_rng(0).normal(size=(3, k, k, 2)).astype(np.float32)
    r = SubspotPrediction(tiles=tiles, level=tiles.mean(axis=(1, 2)), prediction=tiles[:, 0, 0],
                          genes=["A", "B"], centers_um=centers, tile_um=tile_um, exact=True)
    emap = subspot_map(r, "B")
    assert emap.genes == ["B"] and emap.layer == SUBSPOT_LAYER
    assert emap.scale == (tile_um, tile_um) and emap.data.dtype == np.float32
    oy, ox = emap.origin_um
    assert oy / tile_um == pytest.approx(round(oy / tile_um)) and oy != ox
    where = r.tile_centers_um()
    np.testing.assert_allclose(where[1, 0, 6], [1400.0 + 3 * tile_um, 2000.0 - 3 * tile_um])
    for s in range(3):
        for i in range(k):
            for j in range(k):
                row, col = emap.pixel_of(where[s, i, j])
                assert emap.data[0, row, col] == pytest.approx(tiles[s, i, j, 1])
                # the pixel's centre is within half a pixel of the tile's
                centre = np.array([ox + col * tile_um, oy + row * tile_um])
                assert np.abs(centre - where[s, i, j]).max() <= tile_um / 2 + 1e-9
    assert np.isfinite(emap.data).sum() == 3 * k * k  # no overlap, nothing else
    assert np.isnan(emap.data[0, 0, 0])

    fine = subspot_map(r, "B", px_per_tile=2)  # each tile fills 2 × 2 pixels
    assert fine.um_per_px == pytest.approx(tile_um / 2)
    assert np.isfinite(fine.data).sum() == 3 * k * k * 4
    row, col = fine.pixel_of(where[0, 4, 2] + tile_um / 4)
    assert fine.data[0, row, col] == pytest.approx(tiles[0, 4, 2, 1])


def test_the_spread_sets_tiles_beside_spots() -> None:
    flat = np.stack([np.full((3, 3, 1), v) for v in (1.0, 3.0)]).astype(np.float32)
    r = SubspotPrediction(tiles=flat, level=flat.mean(axis=(1, 2)), prediction=flat[:, 0, 0],
                          genes=["A"], centers_um=np.zeros((2, 2)), tile_um=20.0, exact=True)
    assert r.spread() == {"within_spot_sd": 0.0, "across_spot_sd": 1.0}
    r.tiles = flat + np.array([-1.0, 1.0] * 4 + [0.0], np.float32).reshape(1, 3, 3, 1)
    assert r.spread()["within_spot_sd"] == pytest.approx(np.sqrt(8 / 9))


def test_overlapping_patches_are_averaged() -> None:
    tiles = np.stack([np.zeros((3, 3, 1)), np.full((3, 3, 1), 2.0)]).astype(np.float32)
    r = SubspotPrediction(tiles=tiles, level=tiles.mean(axis=(1, 2)), prediction=tiles[:, 0, 0],
                          genes=["A"], centers_um=np.array([[100.0, 100.0], [120.0, 100.0]]),
                          tile_um=20.0, exact=True)
    emap = subspot_map(r)
    row, col = emap.pixel_of((100.0, 100.0))  # both spots' tiles
    assert emap.data[0, row, col] == pytest.approx(1.0)
    assert emap.data[0, row, col - 1] == 0.0 and emap.data[0, row, col + 2] == 2.0


def test_a_spot_only_network_is_refused_in_one_line(section_and_slide) -> None:
    section, slide = section_and_slide
    model = create_model("spot_resnet18", genes=list(section.var_names))
    with pytest.raises(ConfigError, match="need a HiFusion model") as e:
        subspot_predictions(model, section, slide, device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not one of the model's tiled HISM levels"):
        subspot_predictions(tiny(list(section.var_names)), section, slide, level=3)
    with pytest.raises(SectionError, match="no gene 'NOPE'"):
        subspot_predictions(tiny(list(section.var_names)), section, slide, genes=["NOPE"])


def test_the_command_writes_a_map_file_that_reads_back(
        synthetic_section_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    section = read_section(synthetic_section_path)[:N_SPOTS].copy()
    small = write_section(section, tmp_path / "small.h5ad")
    genes = list(section.var_names)
    model = save_checkpoint(tmp_path / "m.pt", tiny(genes), train_mean=torch.zeros(len(genes)))
    out = tmp_path / "tiles.ome.tif"
    argv = ["subspot", str(small), "--model", str(model), "--genes", "ERBB2,GENE2",
            "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "6 spots × 7×7 tiles" in text and "tile mean vs level-7 prediction" in text
    assert "SD over a spot's tiles" in text
    emap = read_map(out)
    assert emap.genes == ["ERBB2", "GENE2"] and emap.layer == SUBSPOT_LAYER
    assert emap.um_per_px == pytest.approx(model_tile_um(genes))
    assert main(argv) == 2  # exists: refused, one line
    assert "exists" in capsys.readouterr().err

    spot_only = save_checkpoint(tmp_path / "s.pt", create_model("spot_resnet18", genes=genes),
                                train_mean=torch.zeros(len(genes)))
    assert main([*argv[:3], str(spot_only), *argv[4:], "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "need a HiFusion model" in err
    assert main([*argv[:-4], "--out", str(tmp_path / "x.png")]) == 2
    assert ".ome.tif" in capsys.readouterr().err


def test_the_command_reads_a_prediction_with_the_model_that_made_it(
        synthetic_section_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    section = read_section(synthetic_section_path)[:N_SPOTS].copy()
    genes = list(section.var_names)
    model = save_checkpoint(tmp_path / "m.pt", tiny(genes), train_mean=torch.zeros(len(genes)))
    pred = predict(section, str(model), device="cpu", workers=0, precision="fp32")
    path = write_predictions(pred, tmp_path / "pred.h5ad", image_px=0)
    out = tmp_path / "t.ome.tif"
    assert main(["subspot", str(path), "--out", str(out), "--device", "cpu",
                 "--workers", "0", "--precision", "fp32"]) == 0
    assert f"{N_SPOTS} spots" in capsys.readouterr().out
    emap = read_map(out)
    result = subspot_predictions(tiny(genes), section, section_slide(section), genes=["ERBB2"],
                                 device="cpu", precision="fp32", workers=0)
    np.testing.assert_allclose(emap.data, subspot_map(result).data, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(result.prediction[:, 0], pred[:, "ERBB2"].X[:, 0], atol=1e-5)

    model.unlink()
    assert main(["subspot", str(path), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "which is not found; give the checkpoint with --model" in err
    assert main(["subspot", str(path), "--grid", "hex:100", "--out", str(out),
                 "--overwrite"]) == 2
    assert "drop --grid" in capsys.readouterr().err


def model_tile_um(genes: list[str]) -> float:
    return create_model("hifusion_tiny", genes=genes).config.spot_um / 7


def test_a_written_map_keeps_what_it_holds(tmp_path: Path) -> None:
    tiles = np.arange(2 * 9, dtype=np.float32).reshape(2, 3, 3, 1)
    r = SubspotPrediction(tiles=tiles, level=tiles.mean(axis=(1, 2)), prediction=tiles[:, 0, 0],
                          genes=["ERBB2"], centers_um=np.array([[50.0, 80.0], [150.0, 80.0]]),
                          tile_um=20.0, exact=True, name="two spots")
    emap = subspot_map(r)
    back = read_map(write_map(emap, tmp_path / "t.ome.tif"))
    np.testing.assert_array_equal(back.data, emap.data)
    assert back.origin_um == emap.origin_um and back.layer == SUBSPOT_LAYER
    assert back.name == "two spots"
