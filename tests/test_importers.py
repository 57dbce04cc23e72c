from __future__ import annotations

import gzip
import importlib.util
import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from spaceranger import GENES as SR_GENES
from spaceranger import HIRES_SCALEF, LOWRES_SCALEF, array_um, write_spaceranger

from hifusion_model.cli import main
from hifusion_model.data.importers import (
    VISIUM_STEP_UM,
    CoarseImageWarning,
    ScaleMismatchWarning,
    SpotMismatchWarning,
    import_csv,
    import_her2st,
    import_hest,
    import_scanpy_visium,
    import_visium,
    lattice_mpp,
)
from hifusion_model.data.sections import read_section
from hifusion_model.errors import SectionError, SlideError

H, W = 300, 400
GENES = ["G0", "G1", "G2", "G3"]


def _image(path, mpp=None):
    """A small RGB TIFF; with ``mpp`` its resolution tags record µm/px."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = (
        {}
        if mpp is None
        else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    tifffile.imwrite(path, np.full((H, W, 3), 230, np.uint8), photometric="rgb", **kwargs)
    return path


# ------------------------------------------------------------------------------- HER2ST


@pytest.fixture
def st(tmp_path):
    """Legacy ST files: 20 px per 200 µm array step (10 µm/px); spots (x, y) on a 6×4 lattice."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(2, 8), np.arange(2, 6))
    table = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel()})
    table["new_x"] = table.x + rng.normal(0, 0.02, len(table))
    table["new_y"] = table.y + rng.normal(0, 0.02, len(table))
    table["pixel_x"] = 20 * table.new_x + 10
    table["pixel_y"] = 20 * table.new_y + 15
    table["selected"] = 1
    table.loc[0, "selected"] = 0  # 2x2 is not under tissue
    ids = [f"{x}x{y}" for x, y in zip(table.x, table.y, strict=True)]
    counts = pd.DataFrame(rng.integers(0, 9, (len(ids), len(GENES))), index=ids, columns=GENES)
    counts = counts.drop(index="5x4")  # in the spot table only
    counts.loc["9x9"] = 1  # in the counts only
    return {
        "image": _image(tmp_path / "img.tif"),
        "counts": tmp_path / "S1.tsv.gz",
        "spots": tmp_path / "S1_selection.tsv",
        "table": table,
        "matrix": counts,
    }


def _write_st(st):
    st["table"].to_csv(st["spots"], sep="\t", index=False)
    st["matrix"].to_csv(st["counts"], sep="\t")
    return st["image"], st["counts"], st["spots"]


def test_her2st_matches_tables_and_derives_mpp(st):
    section = import_her2st(*_write_st(st))
    expected = [
        f"{x}x{y}"
        for x, y in zip(st["table"].x, st["table"].y, strict=True)
        if f"{x}x{y}" not in ("2x2", "5x4")
    ]
    assert sorted(section.obs_names) == sorted(expected)
    assert list(section.var_names) == GENES
    row = (
        st["table"]
        .set_index(st["table"].x.astype(str) + "x" + st["table"].y.astype(str))
        .loc["3x4"]
    )
    i = section.obs_names.get_loc("3x4")
    np.testing.assert_allclose(section.obsm["spatial"][i], [row.pixel_x, row.pixel_y])
    assert (section.obs["array_row"].iloc[i], section.obs["array_col"].iloc[i]) == (4, 3)
    np.testing.assert_array_equal(section.X[i].toarray().ravel(), st["matrix"].loc["3x4"])
    meta = section.uns["hifusion"]
    assert meta["mpp"] == pytest.approx(10.0, rel=0.01)
    assert "array geometry" in meta["mpp_source"]
    assert (meta["name"], meta["source"], meta["spot_diameter_um"]) == ("S1", "her2st", 100.0)


def test_her2st_mpp_precedence(st, tmp_path):
    image, counts, spots = _write_st(st)
    assert import_her2st(image, counts, spots, mpp=0.7).uns["hifusion"]["mpp"] == 0.7
    tagged = _image(tmp_path / "tagged.tif", mpp=2.0)
    section = import_her2st(tagged, counts, spots)
    assert section.uns["hifusion"]["mpp"] == pytest.approx(2.0)
    assert section.uns["hifusion"]["mpp_source"] == "image metadata"


def test_her2st_without_any_mpp(st):
    st["table"] = st["table"].drop(columns=["new_x", "new_y"])
    with pytest.raises(SlideError, match=r"img.tif: unknown µm/px.*pass --mpp"):
        import_her2st(*_write_st(st))


def test_her2st_missing_corrupt_and_foreign_images(st, tmp_path):
    _, counts, spots = _write_st(st)
    with pytest.raises(SlideError, match="nope.jpg: image not found"):
        import_her2st(tmp_path / "nope.jpg", counts, spots)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(SlideError, match="broken.jpg"):
        import_her2st(tmp_path / "broken.jpg", counts, spots)
    (tmp_path / "slide.xyz").write_bytes(b"data")
    with pytest.raises(SlideError, match="slide.xyz: unknown image format"):
        import_her2st(tmp_path / "slide.xyz", counts, spots)


def test_her2st_spots_outside_the_slide(st):
    st["table"].loc[3, "pixel_x"] = W + 50
    with pytest.raises(
        SectionError, match=r"S1_selection.tsv: 1 of 22 spot centres lie outside .*img.tif"
    ):
        import_her2st(*_write_st(st))


def test_her2st_duplicated_spots(st):
    st["table"] = pd.concat([st["table"], st["table"].iloc[[7]]])
    with pytest.raises(
        SectionError, match=r"S1_selection.tsv: 1 duplicated spot ids in the spot table .*e.g. 3x3"
    ):
        import_her2st(*_write_st(st))


def test_her2st_duplicated_count_rows(st):
    st["matrix"] = pd.concat([st["matrix"], st["matrix"].iloc[[0]]])
    with pytest.raises(SectionError, match=r"S1.tsv.gz: 1 duplicated spot ids in the count matrix"):
        import_her2st(*_write_st(st))


def test_her2st_tables_that_do_not_match(st):
    st["matrix"].index = [f"{i}x0" for i in range(len(st["matrix"]))]
    with pytest.raises(
        SectionError,
        match=r"S1.tsv.gz \(24 spots\) and .*S1_selection.tsv \(23 spots\) share only 0",
    ):
        import_her2st(*_write_st(st))


def _shared(st, n_shared, n_foreign):
    """Rewrite the counts to share ``n_shared`` spots with the (23 selected) spot table."""
    selected = st["table"][st["table"].selected == 1]
    ids = [
        f"{x}x{y}"
        for x, y in zip(selected.x, selected.y, strict=True)
        if f"{x}x{y}" in st["matrix"].index
    ]
    rows = st["matrix"].loc[ids[:n_shared]]
    foreign = pd.DataFrame(1, index=[f"{i}x0" for i in range(n_foreign)], columns=GENES)
    pd.concat([rows, foreign]).to_csv(st["counts"], sep="\t")


def test_her2st_partial_overlap(st):
    image, counts, spots = _write_st(st)
    _shared(st, 14, 6)
    with pytest.warns(SpotMismatchWarning, match="share only 14 of 20 and 23 spots"):
        section = import_her2st(image, counts, spots)
    assert section.n_obs == 14 and section.uns["hifusion"]["spots_without_counts"] == 9
    _shared(st, 5, 15)  # a quarter in common: another section on the same array
    with pytest.raises(SectionError, match="share only 5 spot ids"):
        import_her2st(image, counts, spots)


@pytest.mark.parametrize("value, message", [(-1, "negative values"), (np.nan, "NaN or empty")])
def test_her2st_bad_counts(st, value, message):
    st["matrix"] = st["matrix"].astype(float)
    st["matrix"].iloc[2, 1] = value
    with pytest.raises(SectionError, match=f"S1.tsv.gz: the counts hold {message}"):
        import_her2st(*_write_st(st))


def test_her2st_missing_columns(st):
    st["table"] = st["table"].drop(columns=["pixel_y"])
    with pytest.raises(SectionError, match="spot table lacks column.*pixel_y"):
        import_her2st(*_write_st(st))


# ------------------------------------------------------------------------------- Visium

BARCODES = ["AAAC-1", "AAAG-1", "AACC-1", "AAGG-1", "ACCC-1"]
IN_TISSUE = [1, 1, 0, 1, 1]


def _visium(root, version):
    """A Space Ranger run: 5 spots (one off tissue), 3 genes + 1 antibody, 10 µm/px."""
    outs = root / "run" / "outs"
    (outs / "spatial").mkdir(parents=True)
    positions = pd.DataFrame(
        {
            "barcode": BARCODES,
            "in_tissue": IN_TISSUE,
            "array_row": [0, 0, 1, 1, 2],
            "array_col": [0, 2, 1, 3, 0],
            # a hex array at 10 µm/px: 5 px per half pitch along a row, 8.66 px per row
            "pxl_row_in_fullres": 50 + 5 * np.sqrt(3) * np.array([0, 0, 1, 1, 2]),
            "pxl_col_in_fullres": [100, 110, 105, 115, 100],
        }
    )
    if version == 2:
        positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    else:
        positions.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {"spot_diameter_fullres": 6.5, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}
        )
    )
    # barcodes in another order than the positions; features GA, GB, GA, CD3 (antibody)
    barcodes = ["AAGG-1", "AAAC-1", "ACCC-1", "AAAG-1"]
    dense = np.array([[1, 0, 2, 0], [3, 4, 0, 0], [0, 5, 6, 1], [9, 9, 9, 9]])
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        csc = sp.csc_matrix(dense)
        m["data"], m["indices"], m["indptr"], m["shape"] = (
            csc.data,
            csc.indices,
            csc.indptr,
            dense.shape,
        )
        m["barcodes"] = np.array(barcodes, dtype="S")
        feats = m.create_group("features")
        feats["name"] = np.array(["GA", "GB", "GA", "CD3"], dtype="S")
        feats["id"] = np.array(["E1", "E2", "E3", "A1"], dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * 3 + ["Antibody Capture"], dtype="S")
    _image(root / "run" / "fullres.tif")
    return outs


@pytest.mark.parametrize("version", [1, 2])
def test_visium_import(tmp_path, version):
    outs = _visium(tmp_path, version)
    section = import_visium(outs)
    assert list(section.obs_names) == ["AAGG-1", "AAAC-1", "ACCC-1", "AAAG-1"]
    assert list(section.var_names) == ["GA", "GB", "GA-1"]
    # counts per barcode follow the matrix columns: AAAC-1 is column 1 of the dense matrix
    np.testing.assert_array_equal(section[["AAAC-1"]].X.toarray().ravel(), [0, 4, 5])
    np.testing.assert_array_equal(section[["AAAC-1"]].obsm["spatial"][0], [100, 50])
    assert section.obs.loc["ACCC-1", "array_row"] == 2
    meta = section.uns["hifusion"]
    assert meta["mpp"] == pytest.approx(10.0) and "spot lattice" in meta["mpp_source"]
    assert (meta["name"], meta["spot_diameter_um"], meta["source"]) == ("run", 55.0, "visium")
    assert meta["slide_abs"] == str((tmp_path / "run" / "fullres.tif").resolve())


def test_visium_image_errors(tmp_path):
    outs = _visium(tmp_path, 2)
    (tmp_path / "run" / "fullres.tif").unlink()
    with pytest.raises(SlideError, match="no full-resolution image.*pass --image"):
        import_visium(outs)
    _image(tmp_path / "a.tif")
    _image(tmp_path / "run" / "b.tif"), _image(tmp_path / "run" / "c.tif")
    with pytest.raises(SlideError, match=r"several candidate images \(b.tif, c.tif\)"):
        import_visium(outs)
    assert (
        import_visium(tmp_path / "run", image=tmp_path / "a.tif", mpp=0.3).uns["hifusion"]["mpp"]
        == 0.3
    )


def test_visium_not_an_outs_folder(tmp_path):
    with pytest.raises(SectionError, match="not a Space Ranger outs/ folder"):
        import_visium(tmp_path)


# --------------------------------------------------- Visium: real-shaped Space Ranger outputs


@pytest.mark.parametrize(
    ("positions", "matrix", "mpp", "rotation"),
    [("csv", "h5", 4.0, 1.2), ("list", "mtx", 5.5, -0.4)],
)
def test_spaceranger_mpp_is_the_lattice_within_one_percent(
    tmp_path, positions, matrix, mpp, rotation
):
    outs = write_spaceranger(
        tmp_path, mpp=mpp, positions=positions, matrix=matrix, rotation_deg=rotation
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleMismatchWarning)  # lattice and scalefactors agree
        section = import_visium(outs)
    meta = section.uns["hifusion"]
    assert meta["mpp"] == pytest.approx(mpp, rel=0.01)
    assert meta["mpp_source"] == "spot lattice: 100 µm hex pitch over 4992 spots"
    table = pd.read_csv(next((outs / "spatial").glob("tissue_positions*")), header=None)
    n_tissue = int((table[1].astype(str) == "1").sum())
    assert section.n_obs == n_tissue and meta["spot_diameter_um"] == 55.0
    assert list(section.var_names) == [*SR_GENES[:-1], "ACTB-1"]  # the antibody is left out
    assert Path(meta["slide_abs"]).name == "image.tif"


def test_lattice_fit_follows_rotation_and_flips_and_refuses_other_arrays():
    grid, xy_um = array_um(rotation_deg=7.0)
    rc = grid[["array_row", "array_col"]].to_numpy(float)
    flipped = xy_um * [-1, 1] + [20000, 0]  # a mirrored scan
    fit = lattice_mpp(rc, flipped / 0.37, VISIUM_STEP_UM)
    assert fit.mpp == pytest.approx(0.37, rel=1e-6) and fit.residual_px < 1e-6
    with pytest.raises(ValueError, match="different scales"):  # a square array read as hex
        lattice_mpp(rc, rc[:, ::-1] * 10, VISIUM_STEP_UM)
    with pytest.raises(ValueError, match="one line"):
        lattice_mpp(np.array([[0, 0], [1, 1], [2, 2]]), np.array([[0, 0], [1, 1], [2, 2]]), (1, 1))
    with pytest.raises(ValueError, match="less than one array step"):
        lattice_mpp(np.zeros((3, 2)), np.zeros((3, 2)), (1, 1))


def test_scalefactors_that_disagree_with_the_lattice_warn(tmp_path):
    # spot_diameter_fullres computed for 55 µm (the old assumption) is 18 % off
    outs = write_spaceranger(tmp_path, mpp=4.0, spot_diameter_um=55.0)
    with pytest.warns(ScaleMismatchWarning, match=r"differs by 18 % from 4 from the spot lattice"):
        section = import_visium(outs)
    assert section.uns["hifusion"]["mpp"] == pytest.approx(4.0, rel=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleMismatchWarning)
        assert import_visium(outs, mpp=4.2).uns["hifusion"]["mpp"] == 4.2  # the caller's word


def test_scalefactors_serve_when_the_array_gives_no_scale(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0)
    path = outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(path)
    table["array_col"] = table["array_row"] = 0  # array coordinates lost
    table.to_csv(path, index=False)
    with pytest.warns(ScaleMismatchWarning, match="less than one array step.*; using 4 from"):
        meta = import_visium(outs).uns["hifusion"]
    assert meta["mpp"] == pytest.approx(4.0, rel=1e-6)
    assert meta["mpp_source"].startswith("scalefactors: 65 µm / spot_diameter_fullres")


def test_outs_with_only_the_hires_and_lowres_images(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0, fullres=False)
    with pytest.warns(CoarseImageWarning, match="placed on spatial/tissue_hires_image.png"):
        section = import_visium(outs)
    meta = section.uns["hifusion"]
    assert meta["mpp"] == pytest.approx(4.0 / HIRES_SCALEF, rel=0.01)
    assert meta["fullres_scale"] == HIRES_SCALEF
    assert Path(meta["slide_abs"]).name == "tissue_hires_image.png"
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode")
    first = positions.loc[section.obs_names[0]]
    np.testing.assert_allclose(
        section.obsm["spatial"][0],
        HIRES_SCALEF * first[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
    )
    lowres = import_visium(outs, image=outs / "spatial" / "tissue_lowres_image.png")
    assert lowres.uns["hifusion"]["mpp"] == pytest.approx(4.0 / LOWRES_SCALEF, rel=0.01)
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    (outs / "spatial" / "tissue_lowres_image.png").unlink()
    with pytest.raises(SlideError, match="no full-resolution image.*tissue_hires_image.png"):
        import_visium(outs)


def test_parquet_positions_without_pyarrow_say_what_to_install(tmp_path, monkeypatch):
    outs = write_spaceranger(tmp_path, mpp=4.0)
    (outs / "spatial" / "tissue_positions.csv").rename(outs / "spatial" / "elsewhere.csv")
    (outs / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name in ("pyarrow", "fastparquet") else real(name, *a),
    )
    with pytest.raises(SectionError, match=r"tissue_positions.parquet: .*needs pyarrow"):
        import_visium(outs)


def test_parquet_positions(tmp_path):
    pytest.importorskip("pyarrow")
    outs = write_spaceranger(tmp_path, mpp=4.0, positions="parquet")
    assert import_visium(outs).uns["hifusion"]["mpp"] == pytest.approx(4.0, rel=0.01)


def test_visium_hd_square_bins(tmp_path):
    """A Visium HD binned output (square_008um/): a square array of 8 µm bins."""
    binned = tmp_path / "binned_outputs" / "square_008um"
    (binned / "spatial").mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
    theta = np.deg2rad(0.8)
    x_um, y_um = 8.0 * cols.ravel() + 60, 8.0 * rows.ravel() + 60
    mpp = 0.85
    px = np.column_stack([np.cos(theta) * x_um - np.sin(theta) * y_um,
                          np.sin(theta) * x_um + np.cos(theta) * y_um]) / mpp
    ids = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows.ravel(), cols.ravel(), strict=True)]
    pd.DataFrame({"barcode": ids, "in_tissue": 1, "array_row": rows.ravel(),
                  "array_col": cols.ravel(), "pxl_row_in_fullres": px[:, 1],
                  "pxl_col_in_fullres": px[:, 0]}).to_csv(
        binned / "spatial" / "tissue_positions.csv", index=False)
    (binned / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "bin_size_um": 8.0, "microns_per_pixel": 0.8, "spot_diameter_fullres": 8.0 / 0.8,
        "tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05}))
    counts = sp.csc_matrix(np.random.default_rng(0).poisson(1.0, (3, len(ids))))
    with h5py.File(binned / "filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"], m["shape"] = (
            counts.data, counts.indices, counts.indptr, counts.shape)
        m["barcodes"] = np.array(ids, dtype="S")
        m.create_group("features")
        m["features"]["name"] = np.array(["A", "B", "C"], dtype="S")
        m["features"]["id"] = np.array(["1", "2", "3"], dtype="S")
    tifffile.imwrite(tmp_path / "he.tif", np.full((600, 600, 3), 200, np.uint8), photometric="rgb")
    # the recorded microns_per_pixel (0.8) is 6 % off the bins' 0.85: the lattice wins, with a word
    with pytest.warns(ScaleMismatchWarning, match="microns_per_pixel differs by 6 %"):
        section = import_visium(binned, image=tmp_path / "he.tif")
    meta = section.uns["hifusion"]
    assert meta["mpp"] == pytest.approx(mpp, rel=1e-6) and meta["spot_diameter_um"] == 8.0
    assert meta["mpp_source"] == "spot lattice: 8 µm square bins over 2000 spots"


def test_mtx_folder_that_does_not_match_its_lists(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0, matrix="mtx")
    with gzip.open(outs / "filtered_feature_bc_matrix" / "barcodes.tsv.gz", "wt") as f:
        f.write("AAAC-1\n")
    with pytest.raises(SectionError, match="belong to different runs"):
        import_visium(outs)
    (outs / "filtered_feature_bc_matrix" / "barcodes.tsv.gz").unlink()
    with pytest.raises(SectionError, match=r"no barcodes.tsv\(.gz\)"):
        import_visium(outs)


# ------------------------------------------------------------------ scanpy / squidpy AnnData


def scanpy_visium(outs, *, normalised=True, source_image=False):
    """The AnnData ``scanpy.read_visium(outs)`` makes (then log-normalised, counts kept)."""
    from PIL import Image

    section = import_visium(outs)  # the counts and spots, keyed by barcode
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col="barcode")
    positions = positions.loc[section.obs_names]
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    images = {
        kind: np.asarray(Image.open(outs / "spatial" / f"tissue_{kind}_image.png"), np.float32)
        / 255
        for kind in ("hires", "lowres")
    }
    meta = {"chemistry_description": "Spatial 3' v1", "software_version": "spaceranger-2.0.0"}
    if source_image:
        meta["source_image_path"] = str(outs.parent / "image.tif")
    counts = sp.csr_matrix(section.X)
    adata = ad.AnnData(
        X=counts,
        obs=positions[["in_tissue", "array_row", "array_col"]].copy(),
        var=pd.DataFrame(index=section.var_names.copy()),
        obsm={"spatial": positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()},
        uns={"spatial": {"V1_Breast": {"images": images, "scalefactors": factors,
                                       "metadata": meta}}},
    )
    if normalised:
        adata.layers["counts"] = counts.copy()
        adata.X = sp.csr_matrix(np.log1p(counts.toarray() / 3.0))
    return adata, section


def test_scanpy_visium_anndata_on_its_own_hires_image(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0, fullres=False)
    with pytest.warns(UserWarning):
        adata, measured = scanpy_visium(outs)
    path = tmp_path / "visium.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(CoarseImageWarning, match=r"its own hires image \(saved as visium.V1_Breast"):
        section = import_visium(path)  # `hifusion import visium X.h5ad` takes it as well
    meta = section.uns["hifusion"]
    assert (meta["source"], meta["name"], meta["library_id"]) == ("scanpy", "V1_Breast", "V1_Breast")
    assert meta["mpp"] == pytest.approx(4.0 / HIRES_SCALEF, rel=0.01)
    assert Path(meta["slide_abs"]) == tmp_path / "visium.V1_Breast.hires.png"
    np.testing.assert_array_equal(section.X.toarray(), measured.X.toarray())  # layers['counts']
    np.testing.assert_allclose(section.obsm["spatial"], adata.obsm["spatial"] * HIRES_SCALEF)
    np.testing.assert_allclose(section.obsm["spatial"], measured.obsm["spatial"])  # as the outs'
    assert section.uns["hifusion"]["mpp"] == pytest.approx(measured.uns["hifusion"]["mpp"], rel=1e-3)


def test_scanpy_visium_anndata_with_its_source_image(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0)
    adata, measured = scanpy_visium(outs, normalised=False, source_image=True)
    adata.write_h5ad(tmp_path / "visium.h5ad")
    section = import_scanpy_visium(tmp_path / "visium.h5ad")
    assert section.uns["hifusion"]["mpp"] == pytest.approx(4.0, rel=0.01)
    assert Path(section.uns["hifusion"]["slide_abs"]).name == "image.tif"
    np.testing.assert_allclose(section.obsm["spatial"], measured.obsm["spatial"])


def test_scanpy_anndata_errors(tmp_path):
    outs = write_spaceranger(tmp_path, mpp=4.0)
    adata, _ = scanpy_visium(outs)
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.raises(SectionError, match="normalised values and neither layers"):
        import_scanpy_visium(tmp_path / "normalised.h5ad")
    adata.uns["spatial"]["second"] = adata.uns["spatial"]["V1_Breast"]
    adata.write_h5ad(tmp_path / "two.h5ad")
    with pytest.raises(SectionError, match=r"2 libraries \(V1_Breast, second\)"):
        import_scanpy_visium(tmp_path / "two.h5ad")
    del adata.uns["spatial"]
    adata.write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(SectionError, match="not a scanpy/squidpy Visium AnnData"):
        import_scanpy_visium(tmp_path / "plain.h5ad")


def test_scanpy_read_visium_imports(tmp_path):
    sc = pytest.importorskip("scanpy")
    outs = write_spaceranger(tmp_path, mpp=4.0)
    adata = sc.read_visium(outs)
    adata.var_names_make_unique()
    adata.write_h5ad(tmp_path / "sc.h5ad")
    with pytest.warns(CoarseImageWarning, match="its own hires image"):
        section = import_visium(tmp_path / "sc.h5ad")
    assert section.uns["hifusion"]["mpp"] == pytest.approx(4.0 / HIRES_SCALEF, rel=0.01)


# --------------------------------------------------------------------------------- HEST


def _hest(root, spatial_in_obs=False):
    for d in ("st", "metadata", "wsis"):
        (root / d).mkdir(parents=True)
    counts = np.array([[1, 0, 2], [0, 3, 0]], np.float32)
    obs = pd.DataFrame({"array_row": [3, 4], "array_col": [5, 6]}, index=["s1", "s2"])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=["A", "B", "C"]))
    xy = np.array([[40.0, 30.0], [60.0, 30.0]])
    if spatial_in_obs:
        adata.obs["pxl_col_in_fullres"], adata.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    else:
        adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / "TENX1.h5ad")
    (root / "metadata" / "TENX1.json").write_text(
        json.dumps(
            {
                "id": "TENX1",
                "pixel_size_um_estimated": 0.5,
                "pixel_size_um_embedded": 0.6,
                "st_technology": "Visium",
            }
        )
    )
    _image(root / "wsis" / "TENX1.tif")
    return root / "st" / "TENX1.h5ad"


def test_hest_finds_its_metadata_and_image(tmp_path):
    section = import_hest(_hest(tmp_path))
    meta = section.uns["hifusion"]
    assert (meta["mpp"], meta["spot_diameter_um"], meta["name"]) == (0.5, 55.0, "TENX1")
    assert meta["slide_abs"] == str((tmp_path / "wsis" / "TENX1.tif").resolve())
    np.testing.assert_array_equal(section.obsm["spatial"], [[40, 30], [60, 30]])
    np.testing.assert_array_equal(section.X.toarray(), [[1, 0, 2], [0, 3, 0]])
    assert list(section.obs["array_col"]) == [5, 6]


def test_hest_obs_coordinates_and_explicit_files(tmp_path):
    h5ad = _hest(tmp_path, spatial_in_obs=True)
    meta_path = tmp_path / "other.json"
    meta_path.write_text(json.dumps({"pixel_size_um_embedded": 0.25, "spot_diameter": 100}))
    section = import_hest(h5ad, meta_path, image=_image(tmp_path / "x.tif"))
    assert (
        section.uns["hifusion"]["mpp"] == 0.25
        and section.uns["hifusion"]["spot_diameter_um"] == 100
    )
    np.testing.assert_array_equal(section.obsm["spatial"][1], [60, 30])


def test_hest_without_metadata(tmp_path):
    h5ad = _hest(tmp_path)
    (tmp_path / "metadata" / "TENX1.json").unlink()
    with pytest.raises(SlideError, match="TENX1.h5ad: unknown µm/px.*--metadata"):
        import_hest(h5ad)


def test_hest_normalised_counts_are_rejected(tmp_path):
    h5ad = _hest(tmp_path)
    adata = ad.read_h5ad(h5ad)
    adata.X = np.log1p(adata.X)
    adata.write_h5ad(h5ad)
    with pytest.raises(SectionError, match="TENX1.h5ad: counts .* not whole numbers"):
        import_hest(h5ad)


# ---------------------------------------------------------------------------------- CSV


def test_csv_in_micrometres_and_pixels(tmp_path):
    image = _image(tmp_path / "img.tif", mpp=2.0)
    path = tmp_path / "spots.csv"
    pd.DataFrame({"barcode": ["a", "b"], "x_um": [20.0, 40.0], "y_um": [10.0, 10.0]}).to_csv(
        path, index=False
    )
    section = import_csv(path, image)
    np.testing.assert_array_equal(section.obsm["spatial"], [[10, 5], [20, 5]])
    assert list(section.obs_names) == ["a", "b"] and section.n_vars == 0
    assert section.uns["hifusion"]["mpp_source"] == "image metadata"
    pd.DataFrame({"x": [20.0, 40.0], "y": [10.0, 10.0]}).to_csv(path, index=False)
    np.testing.assert_array_equal(
        import_csv(path, image, mpp=4.0, units="um").obsm["spatial"], [[5, 2.5], [10, 2.5]]
    )
    np.testing.assert_array_equal(import_csv(path, image).obsm["spatial"], [[20, 10], [40, 10]])


def test_csv_errors(tmp_path):
    image = _image(tmp_path / "img.tif")
    path = tmp_path / "spots.csv"
    pd.DataFrame({"x": [1.0], "y": [2.0]}).to_csv(path, index=False)
    with pytest.raises(SlideError, match="img.tif: unknown µm/px"):
        import_csv(path, image)
    pd.DataFrame({"id": ["a", "a"], "x": [1.0, 2.0], "y": [2.0, 2.0]}).to_csv(path, index=False)
    with pytest.raises(SectionError, match="1 duplicated spot ids"):
        import_csv(path, image, mpp=1)
    pd.DataFrame({"col": [1.0], "row": [2.0]}).to_csv(path, index=False)
    with pytest.raises(SectionError, match="spots.csv: no spot-centre columns"):
        import_csv(path, image, mpp=1)


# ---------------------------------------------------------------------------------- CLI


def _her2st_argv(image, counts, spots, out, *extra: str) -> list[str]:
    """``hifusion import her2st`` arguments for files written by ``_write_st``."""
    return ["import", "her2st", "--image", str(image), "--counts", str(counts),
            "--spots", str(spots), *extra, "--out", str(out)]


def test_cli_her2st(st, tmp_path, capsys):
    image, counts, spots = _write_st(st)
    out = tmp_path / "S1.h5ad"
    rc = main(_her2st_argv(image, counts, spots, str(out)))
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "22 spots, 4 genes" in line and "array geometry" in line and "\n" not in line
    section = read_section(out)
    assert section.n_obs == 22 and section.uns["hifusion"]["slide"] == "img.tif"


def test_cli_visium_and_scanpy_anndata(tmp_path, capsys):
    outs = write_spaceranger(tmp_path, mpp=4.0, fullres=False, spot_diameter_um=55.0)
    out = tmp_path / "run.h5ad"
    assert main(["import", "visium", str(outs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert " µm/px (spot lattice: 100 µm hex pitch" in captured.out and " 8.000" in captured.out
    err = captured.err.splitlines()
    assert len(err) == 2 and all(e.startswith("hifusion import: warning: ") for e in err)
    assert "differs by 18 %" in captured.err and "tissue_hires_image.png" in captured.err
    adata, _ = scanpy_visium(outs)
    adata.write_h5ad(tmp_path / "scanpy.h5ad")
    capsys.readouterr()
    argv = ["import", "visium", str(tmp_path / "scanpy.h5ad"), "--out", str(tmp_path / "s.h5ad")]
    assert main(argv) == 0
    assert read_section(tmp_path / "s.h5ad").uns["hifusion"]["source"] == "scanpy"


def test_cli_reports_dropped_spots_and_mismatch(st, tmp_path, capsys):
    image, counts, spots = _write_st(st)
    _shared(st, 14, 6)
    rc = main(_her2st_argv(image, counts, spots, str(tmp_path / "S1.h5ad"), "--mpp", "0.5"))
    captured = capsys.readouterr()
    assert rc == 0 and "(--mpp)" in captured.out
    assert "left out: 9 spots without counts, 6 counts without spot" in captured.out
    assert captured.err.startswith("hifusion import: warning:") and "share only 14" in captured.err


def test_cli_refuses_to_overwrite_an_input(tmp_path, capsys):
    h5ad = _hest(tmp_path)
    before = h5ad.read_bytes()
    rc = main(["import", "hest", str(h5ad), "--out", str(h5ad)])
    assert rc == 2 and "--out is one of the inputs" in capsys.readouterr().err
    assert h5ad.read_bytes() == before
    rc = main(["import", "hest", str(h5ad), "--out", str(tmp_path / "s.zarr")])
    assert rc == 2 and "must end in .h5ad" in capsys.readouterr().err


def test_cli_errors_are_one_line(st, capsys):
    st["table"] = st["table"].drop(columns=["new_x", "new_y"])
    image, counts, spots = _write_st(st)
    rc = main(_her2st_argv(image, counts, spots, str(image.with_name("x.h5ad"))))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown µm/px" in err
    assert not image.with_name("x.h5ad").exists()
    with pytest.raises(SystemExit):
        main(["import", "xenium", "thing"])


# ----------------------------------------------------------------------------- real data


@pytest.mark.her2st
@pytest.mark.parametrize("name, n_spots", [("B4", 283), ("C2", 187)])
def test_real_her2st(her2st_dir, name, n_spots):
    section = import_her2st(
        her2st_dir / "images" / f"{name}.jpg",
        her2st_dir / "counts" / f"{name}.tsv.gz",
        her2st_dir / "spots" / f"{name}_selection.tsv",
    )
    assert section.n_obs == n_spots and section.n_vars > 15000
    assert section.uns["hifusion"]["mpp"] == pytest.approx(0.69, abs=0.03)
    assert "array geometry" in section.uns["hifusion"]["mpp_source"]


def test_a_scanpy_visium_anndata_predicts_in_one_command(tmp_path, capsys):
    from synthetic import tiny_checkpoint

    outs = write_spaceranger(tmp_path, mpp=4.0)
    adata, measured = scanpy_visium(outs, normalised=False, source_image=True)
    adata.write_h5ad(tmp_path / "visium.h5ad")
    model = tiny_checkpoint(tmp_path / "tiny.pt", list(adata.var_names[:3]))
    argv = ["predict", str(tmp_path / "visium.h5ad"), "--model", str(model), "--out",
            str(tmp_path / "pred.h5ad"), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.n_obs == measured.n_obs and "truth" in pred.layers
    np.testing.assert_allclose(pred.obsm["spatial"], measured.obsm["spatial"])
