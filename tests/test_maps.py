"""Expression maps: values at the spots, NaN off the tissue, µm alignment, pyramid, OME-TIFF, CLI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from hifusion_model.cli import main
from hifusion_model.errors import ConfigError, SectionError
from hifusion_model.inference.maps import (
    expression_map,
    interpolate_spots,
    is_map_file,
    map_pyramid,
    read_map,
    write_map,
)

PITCH = 100.0
MPP = 0.5


def hex_grid(rows: int, cols: int, pitch: float = PITCH) -> np.ndarray:
    """Spot centres ``(x, y)`` µm of a Visium-like hex array."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    x = xx * pitch + (yy % 2) * pitch / 2 + 3 * pitch
    y = yy * pitch * np.sqrt(3) / 2 + 3 * pitch
    return np.c_[x.ravel(), y.ravel()]


def prediction(xy_um: np.ndarray, values: np.ndarray, genes: list[str], mpp: float = MPP,
               **layers: np.ndarray) -> ad.AnnData:
    """A prediction AnnData as ``predictions_to_anndata`` lays it out (px centres, µm/px in uns)."""
    return ad.AnnData(
        X=np.asarray(values, np.float32),
        obs=pd.DataFrame(index=[f"spot_{i:05d}" for i in range(len(xy_um))]),
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        obsm={"spatial": np.asarray(xy_um, np.float64) / mpp},
        layers={k: np.asarray(v, np.float32) for k, v in layers.items()},
        uns={"hifusion": {"slide": "slide.ome.tif", "mpp": mpp, "spot_diameter_um": 55.0,
                          "name": "grid", "source": "grid:hex"},
             "hifusion_model": {"source": "test", "n_genes": len(genes)}},
    )


def at_spots(emap, xy_um: np.ndarray, channel: int = 0) -> np.ndarray:
    rows, cols = np.array([emap.pixel_of(p) for p in xy_um]).T
    return emap.data[channel, rows, cols]


def test_the_map_at_each_spot_is_about_its_value() -> None:
    xy = hex_grid(20, 24)
    values = np.random.default_rng(0).normal(size=(len(xy), 2))
    emap = interpolate_spots(xy, values, ["A", "B"])
    assert emap.pitch_um == pytest.approx(PITCH) and emap.um_per_px == pytest.approx(20.0)
    got = at_spots(emap, xy)
    assert np.isfinite(got).all()
    # independent neighbours, the worst case: within a tenth of their spread on average
    assert np.abs(got - values[:, 0]).mean() < 0.1
    assert np.corrcoef(got, values[:, 0])[0, 1] > 0.98
    # a constant is a constant everywhere on the tissue
    flat = interpolate_spots(xy, np.full((len(xy), 1), 2.5), ["A"]).data[0]
    np.testing.assert_allclose(flat[np.isfinite(flat)], 2.5, rtol=1e-5)


def test_nan_away_from_the_tissue_and_in_holes() -> None:
    xy = hex_grid(10, 10)
    hole = np.argmin(np.hypot(*(xy - xy.mean(axis=0)).T))  # one spot missing in the middle
    centre = xy[hole]
    left = np.delete(xy, hole, axis=0)
    emap = interpolate_spots(left, np.ones((len(left), 1)), ["A"], pitch_um=PITCH)
    image = emap.data[0]
    assert np.isnan(image[emap.pixel_of(centre)])           # 1 pitch from every spot: a hole
    assert np.isnan(image[0, 0]) and np.isnan(image[-1, -1])  # beyond reach of the rim
    assert np.isfinite(image[emap.pixel_of(left[0] + [30, 0])])  # within reach of a spot
    # every pixel farther than reach_um from all spots is empty
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    py, px = emap.origin_um[0] + yy * emap.um_per_px, emap.origin_um[1] + xx * emap.um_per_px
    from scipy.spatial import cKDTree

    nearest = cKDTree(left).query(np.c_[px.ravel(), py.ravel()])[0].reshape(image.shape)
    assert np.isnan(image[nearest > emap.reach_um + emap.um_per_px]).all()
    assert np.isfinite(image[nearest < emap.reach_um - emap.um_per_px]).all()


def test_a_spot_lands_on_its_micrometres() -> None:
    xy = hex_grid(8, 8) + [1234.0, 56.0]  # x and y differ: a swap would show
    values = np.zeros((len(xy), 1))
    k = 27
    values[k] = 10.0
    pred = prediction(xy, values, ["ERBB2"], mpp=MPP)
    emap = expression_map(pred, "ERBB2", um_per_px=10)
    row, col = np.unravel_index(np.nanargmax(emap.data[0]), emap.shape)
    # the brightest pixel's centre, in µm of the slide's frame (px × µm/px), is the spot's
    y_um = emap.origin_um[0] + row * emap.um_per_px
    x_um = emap.origin_um[1] + col * emap.um_per_px
    x_px, y_px = pred.obsm["spatial"][k]
    assert abs(x_um - x_px * MPP) <= emap.um_per_px / 2
    assert abs(y_um - y_px * MPP) <= emap.um_per_px / 2
    assert emap.origin_um[0] % 10 == 0 and emap.origin_um[1] % 10 == 0  # a shared lattice
    assert emap.slide == "slide.ome.tif" and emap.name == "grid"


def test_layers_and_bad_inputs() -> None:
    xy = hex_grid(4, 4)
    v = np.arange(len(xy), dtype=float)[:, None]
    pred = prediction(xy, v, ["ERBB2"], uncertainty=v * 0 + 0.3)
    u = expression_map(pred, ["ERBB2"], layer="uncertainty")
    np.testing.assert_allclose(u.data[0][np.isfinite(u.data[0])], 0.3, rtol=1e-5)
    with pytest.raises(SectionError, match="has no truth"):
        expression_map(pred, "ERBB2", layer="truth")
    with pytest.raises(SectionError, match="no gene 'ERBB3'.*ERBB2"):
        expression_map(pred, "ERBB3")
    with pytest.raises(ConfigError, match="coarser than the 100 µm between spots"):
        expression_map(pred, "ERBB2", um_per_px=150)
    with pytest.raises(ConfigError, match="would be .* px"):
        expression_map(pred, "ERBB2", um_per_px=0.01)
    no_mpp = pred.copy()
    del no_mpp.uns["hifusion"]["mpp"]
    with pytest.raises(SectionError, match="has no µm/px"):
        expression_map(no_mpp, "ERBB2")
    with pytest.raises(SectionError, match="no spots"):
        expression_map(pred[:0].copy(), "ERBB2")
    # a spot without a value (added by hand) is left out of that gene's map only
    values = np.c_[v, v]
    values[5, 0] = np.nan
    part = interpolate_spots(xy, values, ["A", "B"], pitch_um=PITCH)
    without = interpolate_spots(np.delete(xy, 5, axis=0), np.delete(v, 5, axis=0), ["A"],
                                pitch_um=PITCH)
    assert part.shape == without.shape  # the spot is not on the rim, so the frame is the same
    np.testing.assert_allclose(part.data[0], without.data[0], rtol=1e-5, atol=1e-6)
    assert np.isnan(part.data[0][part.pixel_of(xy[5])])
    assert np.isfinite(part.data[1][part.pixel_of(xy[5])])


def test_pyramid_levels_halve_exactly() -> None:
    data = np.random.default_rng(1).random((2, 1100, 700)).astype(np.float32)
    data[:, :10] = np.nan
    levels = map_pyramid(data, min_px=256)
    assert [lv.shape for lv in levels] == [(2, 1104, 704), (2, 552, 352), (2, 276, 176),
                                           (2, 138, 88)]
    np.testing.assert_array_equal(levels[0][:, :1100, :700], data)
    assert np.isnan(levels[0][:, 1100:]).all()
    block = data[0, 10:12, 4:6]
    assert levels[1][0, 5, 2] == pytest.approx(block.mean())  # 2 × 2 means
    data[0, 20, 0] = np.nan
    levels = map_pyramid(data, min_px=256)
    assert levels[1][0, 10, 0] == pytest.approx(np.nanmean(data[0, 20:22, 0:2]))  # NaN left out
    assert np.isnan(levels[1][0, 0, 0])
    assert len(map_pyramid(data[:, :200, :200], min_px=256)) == 1


def test_ome_tiff_round_trip(tmp_path: Path) -> None:
    xy = hex_grid(30, 40)
    values = np.random.default_rng(2).normal(size=(len(xy), 2))
    emap = interpolate_spots(xy, values, ["ERBB2", "KRT19"], um_per_px=4)
    path = write_map(emap, tmp_path / "map.ome.tif", min_px=256)
    assert is_map_file(path) and not list(tmp_path.glob(".*tmp"))
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == "CYX" and series.dtype == np.float32
        shapes = [lv.shape for lv in series.levels]
        assert shapes[0][0] == 2 and len(shapes) == 4
        assert all(a[1] == 2 * b[1] and a[2] == 2 * b[2] for a, b in pairwise(shapes))
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        root = ET.fromstring(tif.ome_metadata)
        base = np.asarray(series.levels[0].asarray())
    ns = {"o": root.tag.split("}")[0].strip("{")}
    pixels = root.find(".//o:Pixels", ns)
    assert float(pixels.get("PhysicalSizeX")) == 4.0 and pixels.get("PhysicalSizeXUnit") == "µm"
    assert float(pixels.get("PhysicalSizeY")) == 4.0
    assert [c.get("Name") for c in pixels.findall("o:Channel", ns)] == ["ERBB2", "KRT19"]
    plane = pixels.find("o:Plane", ns)
    assert float(plane.get("PositionX")) == emap.origin_um[1]
    assert float(plane.get("PositionY")) == emap.origin_um[0]
    h, w = emap.shape
    np.testing.assert_array_equal(base[:, :h, :w], emap.data)
    back = read_map(path)
    assert back.genes == ["ERBB2", "KRT19"] and back.um_per_px == 4.0
    assert back.origin_um == emap.origin_um and len(back.pyramid()) == 4
    np.testing.assert_array_equal(back.data[:, :h, :w], emap.data)
    assert not is_map_file(tmp_path / "missing.tif")


def test_a_prediction_of_the_tiny_model_maps(synthetic_section_path, tiny_checkpoint_path) -> None:
    """The AnnData ``predict`` returns is what the map reads (spots in px, µm/px in uns)."""
    from hifusion_model import api

    pred = api.predict(synthetic_section_path, model=str(tiny_checkpoint_path), device="cpu",
                       workers=0)
    emap = expression_map(pred, ["ERBB2", "GENE1"], layer="truth")
    xy_um = np.asarray(pred.obsm["spatial"]) * pred.uns["hifusion"]["mpp"]
    truth = pred[:, "ERBB2"].layers["truth"].ravel()
    got = at_spots(emap, xy_um)
    assert np.corrcoef(got, truth)[0, 1] > 0.9


# -- the command -------------------------------------------------------------------------------
@pytest.fixture
def pred_file(tmp_path: Path) -> Path:
    xy = hex_grid(12, 12)
    values = np.random.default_rng(3).normal(size=(len(xy), 3))
    path = tmp_path / "pred.h5ad"
    prediction(xy, values, ["ERBB2", "KRT19", "GENE2"]).write_h5ad(path)
    return path


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_writes_the_map(pred_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "map.ome.tif"
    argv = ["map", str(pred_file), "--genes", "ERBB2,KRT19", "--um-per-px", "20",
            "--out", str(out)]
    assert main(argv) == 0
    assert "ERBB2, KRT19 of 144 spots" in capsys.readouterr().out
    emap = read_map(out)
    assert emap.genes == ["ERBB2", "KRT19"] and emap.um_per_px == 20.0
    assert "already exists; add --overwrite" in _error(capsys, argv)
    assert main([*argv, "--overwrite", "--genes", "GENE2"]) == 0
    assert read_map(out).genes == ["GENE2"]


def test_cli_errors_are_one_line(pred_file: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "m.ome.tif")
    err = _error(capsys, ["map", str(pred_file), "--genes", "ERBB3", "--out", out])
    assert "no gene 'ERBB3'" in err and "ERBB2" in err
    assert "must end in .ome.tif" in _error(capsys, ["map", str(pred_file), "--out",
                                                     str(tmp_path / "m.png")])
    assert "--um-per-px must be a positive" in _error(
        capsys, ["map", str(pred_file), "--um-per-px", "0", "--out", out])
    assert "not found" in _error(capsys, ["map", str(tmp_path / "nope.h5ad"), "--out", out])
    pred = ad.read_h5ad(pred_file)
    empty = tmp_path / "empty.h5ad"
    pred[:0].copy().write_h5ad(empty)
    assert "no spots to map" in _error(capsys, ["map", str(empty), "--out", out])
    del pred.uns["hifusion"]["mpp"]
    no_mpp = tmp_path / "no_mpp.h5ad"
    pred.write_h5ad(no_mpp)
    assert "has no µm/px" in _error(capsys, ["map", str(no_mpp), "--out", out])
    assert not Path(out).exists()
