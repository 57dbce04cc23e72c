"""SpatialData stores in and out: stores built with spatialdata's own API, as a user's would be."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from synthetic import MPP, SHAPE, tissue_image

sd = pytest.importorskip("spatialdata")
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, get_transformation

from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.data.spatialdata_io import (
    is_spatialdata_store,
    is_zarr_image,
    looks_like_spatialdata_store,
    read_spatialdata,
    write_spatialdata,
)
from hifusion_model.errors import Cancelled, OutputError, SectionError


def make_store(path: Path, section_path: Path, *, physical: bool = False, grid: bool = True,
               tables: int = 1, hires: bool = True, twin: bool = False) -> Path:
    """A Visium-like store as spatialdata-io writes one: ``global`` in full-resolution pixels
    (the full image's own), a 2× smaller hires image, spots as circles, counts in the table.
    ``physical`` adds a µm coordinate system; ``grid`` keeps array_row/array_col; ``twin`` adds
    a second full-resolution image (``stain2``), so no image is the one finest."""
    section = read_section(section_path)
    full = tissue_image(SHAPE).transpose(2, 0, 1)
    um = {"physical": Scale([MPP, MPP], axes=("y", "x"))} if physical else {}
    images = {"full": Image2DModel.parse(full, dims=("c", "y", "x"), scale_factors=[2],
                                         transformations={"global": Identity(), **um})}
    if hires:
        images["hires"] = Image2DModel.parse(
            full[:, ::2, ::2], dims=("c", "y", "x"),
            transformations={"global": Scale([2.0, 2.0], axes=("y", "x")),
                             **({"physical": Scale([2 * MPP, 2 * MPP], axes=("y", "x"))}
                                if physical else {})})
    if twin:
        images["stain2"] = Image2DModel.parse(full, dims=("c", "y", "x"),
                                              transformations={"global": Identity(), **um})
    xy = np.asarray(section.obsm["spatial"])
    diameter_px = section.uns["hifusion"]["spot_diameter_um"] / MPP
    spots = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), diameter_px / 2),
                              index=pd.Index(np.arange(len(xy)) + 100),
                              transformations={"global": Identity(),
                                               **({"physical": Scale([MPP, MPP], axes=("x", "y"))}
                                                  if physical else {})})
    table = section.copy()
    del table.uns["hifusion"]
    table.obs = pd.DataFrame({"region": pd.Categorical(["spots"] * table.n_obs),
                              "spot_id": np.arange(table.n_obs) + 100,
                              **({c: section.obs[c] for c in ("array_row", "array_col")}
                                 if grid else {})}, index=section.obs_names)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    sdata = sd.SpatialData(images=images, shapes={"spots": spots},
                           tables={f"table{i or ''}": table.copy() for i in range(tables)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(path)
    return path


def test_visium_like_store_reads_as_a_section_on_the_full_image(
    tmp_path: Path, synthetic_section_path: Path
) -> None:
    truth = read_section(synthetic_section_path)
    store = make_store(tmp_path / "visium.zarr", synthetic_section_path)
    assert is_spatialdata_store(store) and looks_like_spatialdata_store(store)
    assert is_zarr_image(store / "images" / "full") and not is_spatialdata_store(
        store / "images" / "full")  # a plain OME-Zarr image is not a store
    section = read_spatialdata(store)
    meta = section.uns["hifusion"]
    assert meta["spatialdata"]["image"] == "full"  # the finest of full and hires
    assert meta["mpp"] == pytest.approx(MPP, rel=0.01) and "lattice" in meta["mpp_source"]
    assert meta["spot_diameter_um"] == pytest.approx(truth.uns["hifusion"]["spot_diameter_um"],
                                                     rel=0.01)
    np.testing.assert_allclose(section.obsm["spatial"], truth.obsm["spatial"])
    assert list(section.obs_names) == list(truth.obs_names)
    np.testing.assert_array_equal(section.X.toarray(), truth.X.toarray())
    with section_slide(section) as slide:  # the image element itself is the slide
        assert slide.shape == SHAPE and slide.mpp == pytest.approx(MPP, rel=0.01)
        x, y = np.round(section.obsm["spatial"][5]).astype(int)
        patch = slide.read_region_px((x + 0.5, y + 0.5), 1, 1)
        np.testing.assert_array_equal(patch[0, 0], tissue_image(SHAPE)[y, x])


def test_chosen_image_and_physical_scale(tmp_path: Path, synthetic_section_path: Path) -> None:
    truth = read_section(synthetic_section_path)
    store = make_store(tmp_path / "um.zarr", synthetic_section_path, physical=True, grid=False)
    section = read_spatialdata(store, image="hires")
    assert section.uns["hifusion"]["mpp"] == pytest.approx(2 * MPP)
    assert section.uns["hifusion"]["mpp_source"] == "coordinate system 'physical'"
    np.testing.assert_allclose(section.obsm["spatial"], truth.obsm["spatial"] / 2)
    assert read_spatialdata(store, mpp=1.5).uns["hifusion"]["mpp"] == 1.5


def test_prediction_round_trips_through_spatialdata(
    tmp_path: Path, synthetic_section_path: Path, tiny_checkpoint_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hifusion_model.api import predict
    from hifusion_model.data import spatialdata_write

    monkeypatch.setattr(spatialdata_write, "MIN_LEVEL_PX", 256)  # a pyramid even on a small slide

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False)
    pred = predict(store, tiny_checkpoint_path, device="cpu", workers=0, batch_size=64)
    pred.layers["uncertainty"] = np.abs(pred.X) + 1  # kept whether or not the model has one
    out = write_spatialdata(pred, tmp_path / "pred.zarr")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    back = sd.read_zarr(out)
    table = back.tables["table"]
    np.testing.assert_allclose(table.X, pred.X)
    np.testing.assert_allclose(table.layers["truth"], pred.layers["truth"])
    np.testing.assert_allclose(table.layers["uncertainty"], pred.layers["uncertainty"])
    [image] = back.images.values()
    assert [image[f"scale{i}"]["image"].shape for i in range(3)] == [
        (3, h // 2**i, w // 2**i) for i in range(3) for h, w in [SHAPE]]
    assert get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] \
        == pytest.approx(pred.uns["hifusion"]["mpp"])
    [circles] = back.shapes.values()
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]),
                               pred.obsm["spatial"])
    assert circles["radius"].iloc[0] * 2 * pred.uns["hifusion"]["mpp"] == pytest.approx(
        pred.uns["hifusion"]["spot_diameter_um"])
    again = read_spatialdata(out)  # our own store: µm from its global system, no counts
    assert again.uns["hifusion"]["mpp_source"] == "coordinate system 'global'"
    np.testing.assert_allclose(again.obsm["spatial"], pred.obsm["spatial"])
    assert again.n_vars == 0
    with pytest.raises(OutputError, match="already exists; add overwrite=True"):
        write_spatialdata(pred, out)
    write_spatialdata(pred, out, overwrite=True)
    with pytest.raises(SectionError, match="no raw counts"):
        read_spatialdata(out, require_counts=True)


def test_bad_stores_say_what_is_wrong(tmp_path: Path, synthetic_section_path: Path) -> None:
    two = make_store(tmp_path / "two.zarr", synthetic_section_path, tables=2)
    with pytest.raises(SectionError, match=r"2 tables \('table', 'table1'\); choose one with --table \(table= "):
        read_spatialdata(two)
    assert read_spatialdata(two, table="table1").n_obs > 0
    bare = make_store(tmp_path / "bare.zarr", synthetic_section_path, grid=False)
    with pytest.raises(SectionError, match="no physical scale.*--mpp"):
        read_spatialdata(bare)
    empty = tmp_path / "empty.zarr"
    sdata = sd.read_zarr(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes)).write(empty)
    with pytest.raises(SectionError, match="holds no table"):
        read_spatialdata(empty)
    with pytest.raises(SectionError, match="no image 'nope'.*'full', 'hires'"):
        read_spatialdata(two, table="table", image="nope")
    with pytest.raises(SectionError, match="not a SpatialData store"):
        read_spatialdata(tmp_path)


def test_cli_predicts_a_store_into_a_store(
    tmp_path: Path, synthetic_section_path: Path, tiny_checkpoint_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hifusion_model.cli import main

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False, grid=False)
    out = tmp_path / "pred.zarr"
    args = ["predict", str(store), "--model", str(tiny_checkpoint_path), "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    assert main(args) == 2  # no physical scale: the one-line error names --mpp
    assert "--mpp" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--mpp", str(MPP)]) == 0
    back = sd.read_zarr(out)
    assert back.tables["table"].n_obs == read_section(synthetic_section_path).n_obs


def test_napari_reader_opens_stores_but_not_plain_ome_zarr(
    tmp_path: Path, synthetic_section_path: Path
) -> None:
    from napari_hifusion._reader import get_reader

    store = make_store(tmp_path / "visium.zarr", synthetic_section_path, hires=False)
    assert get_reader(str(store / "images" / "full")) is None  # an OME-Zarr image stays napari's
    image, points = get_reader(str(store))(str(store))
    assert image[2] == "image" and points[2] == "points"
    truth = read_section(synthetic_section_path)
    assert len(points[0]) == truth.n_obs
    np.testing.assert_allclose(points[0], truth.obsm["spatial"][:, ::-1])  # (row, col) px
    assert points[1]["scale"] == pytest.approx((MPP, MPP), rel=0.01)  # drawn in µm


def test_prediction_store_reopens_in_napari_with_its_values(
    tmp_path: Path, synthetic_section_path: Path, tiny_checkpoint_path: Path,
) -> None:
    """``hifusion predict … --out PRED.zarr`` reopens as a prediction file does: the store's
    image, the measured spots and the predicted spots with their values."""
    from hifusion_model.cli import main
    from napari_hifusion._layers import PREDICTION, SPOT_ID, TRUTH
    from napari_hifusion._reader import get_reader
    from napari_hifusion._writer import export_h5ad

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False)
    out = tmp_path / "pred.zarr"
    assert main(["predict", str(store), "--model", str(tiny_checkpoint_path), "--out", str(out),
                 "--device", "cpu", "--workers", "0"]) == 0
    assert main(["evaluate", str(out), "--json"]) == 0  # scored as a prediction file is
    table = sd.read_zarr(out).tables["table"]
    (_, image_kw, _), (_, truth_kw, _), (yx, pred_kw, _) = get_reader(str(out))(str(out))
    kinds = [kw["metadata"]["hifusion"]["kind"] for kw in (image_kw, truth_kw, pred_kw)]
    assert kinds == ["slide", TRUTH, PREDICTION]
    assert Path(image_kw["metadata"]["hifusion"]["path"]).parent == out / "images"
    genes = list(table.var_names)
    np.testing.assert_allclose(pred_kw["features"][genes].to_numpy(), table.X)
    np.testing.assert_allclose(truth_kw["features"][genes].to_numpy(), table.layers["truth"])
    assert list(pred_kw["features"][SPOT_ID]) == list(table.obs_names)
    np.testing.assert_allclose(yx, read_section(synthetic_section_path).obsm["spatial"][:, ::-1])
    assert pred_kw["scale"] == pytest.approx((MPP, MPP))

    # saved from napari as a prediction file, it names the store's image as its slide
    layer = type("Layer", (), {"name": pred_kw["name"], "data": yx,
                               "features": pred_kw["features"],
                               "metadata": pred_kw["metadata"]})()
    again = export_h5ad(layer, tmp_path / "again.h5ad")
    layers = get_reader(str(again))(str(again))
    np.testing.assert_allclose(layers[2][1]["features"][genes].to_numpy(), table.X)


def test_a_section_store_is_no_prediction(tmp_path: Path, synthetic_section_path: Path) -> None:
    from hifusion_model.data.spatialdata_io import read_spatialdata_prediction

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False)
    with pytest.raises(SectionError, match=r"holds no predictions.*--out PRED\.zarr"):
        read_spatialdata_prediction(store)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_cli_replaces_a_store_only_with_overwrite_and_never_an_input(
    tmp_path: Path, synthetic_section_path: Path, tiny_checkpoint_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hifusion_model.cli import main

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False)
    out = tmp_path / "pred.zarr"
    args = ["--model", str(tiny_checkpoint_path), "--device", "cpu", "--workers", "0"]
    assert main(["predict", str(synthetic_section_path), "--out", str(out), *args]) == 0
    before = _snapshot(out)
    assert main(["predict", str(store), "--out", str(out), *args]) == 2
    assert "already exists; add --overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["predict", str(store), "--out", str(out), "--overwrite", *args]) == 0
    assert _snapshot(out) != before and sd.read_zarr(out).tables["table"].n_obs > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "pred.zarr"]  # no leftovers

    inputs = _snapshot(store)
    for argv in (["predict", str(store), "--out", str(store), "--overwrite"],  # itself
                 ["predict", str(store / "images" / "full"), "--grid", "hex:100",  # inside it
                  "--out", str(store), "--overwrite"]):
        assert main([*argv, *args]) == 2
        assert "inputs" in capsys.readouterr().err
    plain = tmp_path / "folder.zarr"  # a folder that is no zarr store is never replaced
    (plain / "notes.txt").parent.mkdir()
    (plain / "notes.txt").write_text("keep me")
    assert main(["predict", str(store), "--out", str(plain), "--overwrite", *args]) == 2
    assert "existing folder" in capsys.readouterr().err
    assert (plain / "notes.txt").read_text() == "keep me" and _snapshot(store) == inputs


def test_a_failed_or_cancelled_overwrite_keeps_the_old_store(
    tmp_path: Path, synthetic_section_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    section = read_section(synthetic_section_path)
    out = write_spatialdata(section, tmp_path / "s.zarr")
    before = _snapshot(out)
    answers = iter([False, False, True])  # stop once the new store is written, before the swap
    with pytest.raises(Cancelled):
        write_spatialdata(section, out, overwrite=True, should_stop=lambda: next(answers))
    assert _snapshot(out) == before

    def half_then_fail(self, path, *a, **k):
        (Path(path) / "images").mkdir(parents=True)
        (Path(path) / "zarr.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sd.SpatialData, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_spatialdata(section, out, overwrite=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary folder left


def test_a_store_is_not_written_over_its_own_image(
    tmp_path: Path, synthetic_section_path: Path,
) -> None:
    from hifusion_model.data.spatialdata_io import read_spatialdata

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, hires=False)
    before = _snapshot(store)
    section = read_spatialdata(store)  # its slide is store/images/full
    with pytest.raises(OutputError, match="holds one of the inputs"):
        write_spatialdata(section, store, overwrite=True)
    assert _snapshot(store) == before


def test_cli_chooses_a_stores_elements_by_name(
    tmp_path: Path, synthetic_section_path: Path, tiny_checkpoint_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hifusion_model.cli import main

    store = make_store(tmp_path / "in.zarr", synthetic_section_path, twin=True, tables=2)
    args = ["--model", str(tiny_checkpoint_path), "--device", "cpu", "--workers", "0"]
    out = tmp_path / "p.h5ad"

    def refused(*argv: str) -> str:
        assert main(["predict", *argv, "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
        return err

    assert "2 tables ('table', 'table1'); choose one with --table" in refused(str(store))
    err = refused(str(store), "--table", "table1")
    assert ("3 images ('full', 'hires', 'stain2')" not in err
            and "2 images ('full', 'stain2') at the finest resolution; choose one with --image"
            in err)
    assert "no image 'nope'; it holds 'full', 'hires', 'stain2'" in refused(
        str(store), "--table", "table", "--image", "nope")
    assert "no table 'nope'; it holds 'table', 'table1'" in refused(
        str(store), "--table", "nope")
    assert "no shapes element 'nope'; it holds 'spots'" in refused(
        str(store), "--table", "table", "--image", "full", "--shapes", "nope")
    err = refused(str(synthetic_section_path), "--image", "full")
    assert "--image choose elements of a SpatialData .zarr store" in err

    assert main(["predict", str(store), "--table", "table1", "--image", "hires",
                 "--out", str(out), *args]) == 0
    pred = anndata.read_h5ad(out)
    assert Path(pred.uns["hifusion"]["slide"]).name == "hires"
    assert pred.uns["hifusion"]["mpp"] == pytest.approx(2 * MPP, rel=0.01)
    np.testing.assert_allclose(pred.obsm["spatial"],
                               read_section(synthetic_section_path).obsm["spatial"] / 2)


def test_a_large_slide_streams_into_a_pyramid(
    tmp_path: Path, synthetic_section_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 4096 px tiled OME-TIFF becomes a three-scale image while under half its decoded size
    is ever held: the levels are computed window by window, never from the whole slide."""
    import tracemalloc

    import dask
    import tifffile

    from hifusion_model.data import spatialdata_write
    from hifusion_model.data.sections import new_section

    with monkeypatch.context() as m:  # every import the pyramid needs, before measuring
        m.setattr(spatialdata_write, "MIN_LEVEL_PX", 256)
        write_spatialdata(read_section(synthetic_section_path), tmp_path / "warm.zarr")
    side, tile = 4096, tissue_image((256, 256))
    slide = tmp_path / "large.ome.tif"  # 48 MB decoded, in 256 px tiles, no pyramid of its own
    tifffile.imwrite(slide, np.tile(tile, (side // 256, side // 256, 1)), photometric="rgb",
                     tile=(256, 256), ome=True, metadata={
                         "axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP,
                         "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    section = new_section(np.array([[side / 2, side / 2]]), slide=slide, mpp=MPP,
                          spot_diameter_um=55.0, name="large", source="test")
    tracemalloc.start()
    try:
        with dask.config.set(num_workers=1):  # each worker holds a window or two more
            out = write_spatialdata(section, tmp_path / "large.zarr")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < side * side * 3 / 2, f"{peak / 1e6:.0f} MB held while writing"
    [image] = sd.read_zarr(out).images.values()
    assert [image[f"scale{i}"]["image"].shape for i in range(3)] == [
        (3, side // 2**i, side // 2**i) for i in range(3)]
    assert list(image) == ["scale0", "scale1", "scale2"]
    np.testing.assert_array_equal(  # the pixels themselves, across a tile's edge
        image["scale0"]["image"][:, 2050:2054, 1020:1030].values.transpose(1, 2, 0),
        tile[np.arange(2050, 2054)[:, None] % 256, np.arange(1020, 1030)[None, :] % 256])


def test_napari_says_how_to_choose_in_napari_terms(
    tmp_path: Path, synthetic_section_path: Path
) -> None:
    from napari_hifusion._reader import get_reader

    two = make_store(tmp_path / "two.zarr", synthetic_section_path, tables=2)
    bare = make_store(tmp_path / "bare.zarr", synthetic_section_path, grid=False)
    for store, said in ((two, "read_spatialdata(path, table=NAME)"),
                        (bare, "read_spatialdata(path, mpp=")):
        with pytest.raises(SectionError) as caught:
            get_reader(str(store))(str(store))
        assert said in str(caught.value) and "--" not in str(caught.value)
