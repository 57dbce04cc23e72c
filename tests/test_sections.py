from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import tifffile

from hifusion_model.data.sections import (
    new_section,
    read_section,
    section_mpp,
    section_slide,
    section_slide_path,
    validate_section,
    write_section,
)
from hifusion_model.errors import SectionError


@pytest.fixture
def slide_path(tmp_path):
    path = tmp_path / "data" / "slide.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, np.full((60, 80, 3), 200, np.uint8), photometric="rgb")
    return path


def _section(slide, **overrides):
    kwargs = dict(
        slide=slide,
        mpp=0.5,
        spot_diameter_um=55.0,
        name="S1",
        source="test",
        obs_names=["a", "b", "c"],
        counts=np.array([[0, 2], [1, 0], [5, 7]]),
        genes=["G1", "G2"],
        array_row=[0, 0, 1],
        array_col=[0, 2, 1],
    )
    kwargs.update(overrides)
    return new_section(np.array([[10.0, 20.0], [30.0, 20.0], [20.0, 40.0]]), **kwargs)


def _stored_slide(path) -> str:
    with h5py.File(path, "r") as f:
        value = f["uns/hifusion/slide"][()]
    return value.decode() if isinstance(value, bytes) else str(value)


def test_round_trip_keeps_everything(slide_path, tmp_path):
    section = _section(slide_path)
    out = write_section(section, tmp_path / "data" / "S1.h5ad")
    assert _stored_slide(out) == "slide.tif"  # relative: the slide lies below the section's folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["S1.h5ad", "slide.tif"]  # no temp left
    back = read_section(out)
    assert list(back.obs_names) == ["a", "b", "c"] and list(back.var_names) == ["G1", "G2"]
    assert sp.issparse(back.X)
    np.testing.assert_array_equal(back.X.toarray(), [[0, 2], [1, 0], [5, 7]])
    np.testing.assert_array_equal(back.obsm["spatial"], section.obsm["spatial"])
    np.testing.assert_array_equal(back.obs["array_col"], [0, 2, 1])
    meta = back.uns["hifusion"]
    assert meta["slide_abs"] == str(slide_path.resolve())
    assert (meta["mpp"], meta["spot_diameter_um"], meta["name"], meta["source"]) == (
        0.5,
        55.0,
        "S1",
        "test",
    )
    assert section.uns["hifusion"]["slide"] == str(
        slide_path.resolve()
    )  # the input is not modified


def test_slide_outside_the_folder_is_stored_absolute(slide_path, tmp_path):
    out = write_section(_section(slide_path), tmp_path / "elsewhere" / "S1.h5ad")
    assert _stored_slide(out) == str(slide_path.resolve())
    assert read_section(out).uns["hifusion"]["slide_abs"] == str(slide_path.resolve())


def test_moving_the_folder_keeps_the_slide(slide_path, tmp_path):
    write_section(_section(slide_path), slide_path.parent / "S1.h5ad")
    moved = slide_path.parent.rename(tmp_path / "moved")
    slide = section_slide(read_section(moved / "S1.h5ad"))
    assert slide.path.resolve() == (moved / "slide.tif").resolve()
    assert slide.mpp == 0.5 and slide.shape == (60, 80)


def test_section_without_counts_is_valid(slide_path, tmp_path):
    bare = _section(slide_path, counts=None, genes=None)
    assert bare.n_vars == 0
    back = read_section(write_section(bare, tmp_path / "bare.h5ad"))
    assert back.shape == (3, 0) and section_mpp(back) == 0.5


def test_section_slide_override_and_missing_slide(slide_path, tmp_path):
    section = _section(slide_path)
    assert section_slide(section, mpp_override=0.25).mpp == 0.25
    slide_path.unlink()
    with pytest.raises(SectionError, match="slide.tif does not exist"):
        section_slide(section)


def test_section_slide_rejects_spots_off_the_slide(slide_path):
    section = _section(slide_path)
    section.obsm["spatial"] = section.obsm["spatial"] + [60, 0]
    with pytest.raises(SectionError, match=r"2 of 3 spot centres lie outside .*80×60 px"):
        section_slide(section)


def test_read_errors(tmp_path):
    with pytest.raises(SectionError, match="section file not found"):
        read_section(tmp_path / "none.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(SectionError, match="junk.h5ad: cannot read as an AnnData"):
        read_section(tmp_path / "junk.h5ad")
    ad.AnnData(np.ones((2, 2), np.float32)).write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(SectionError, match="plain.h5ad: not a hifusion section.*hifusion import"):
        read_section(tmp_path / "plain.h5ad")


def _broken(section, what):
    if what == "spatial_shape":
        section.obsm["spatial"] = np.zeros((3, 3))
    elif what == "spatial_nan":
        section.obsm["spatial"][1, 0] = np.nan
    elif what == "duplicate_ids":
        section.obs_names = ["a", "a", "c"]
    elif what == "negative":
        section.X = sp.csr_matrix(np.array([[0, -2], [1, 0], [5, 7]], np.float32))
    elif what == "nan":
        section.X = np.array([[0, np.nan], [1, 0], [5, 7]], np.float32)
    elif what == "fractional":
        section.X = np.array([[0, 0.5], [1, 0], [5, 7]], np.float32)
    elif what == "mpp":
        section.uns["hifusion"]["mpp"] = 0.0
    elif what == "no_meta":
        del section.uns["hifusion"]["spot_diameter_um"]
    return section


@pytest.mark.parametrize(
    "what, message",
    [
        ("spatial_shape", r"obsm\['spatial'\] must be \(n_spots, 2\)"),
        ("spatial_nan", "1 spot centres are NaN"),
        ("duplicate_ids", "1 duplicated spot ids"),
        ("negative", "negative values"),
        ("nan", "NaN or infinite"),
        ("fractional", "not whole numbers"),
        ("mpp", "µm/px .* must be a positive number"),
        ("no_meta", "lacks spot_diameter_um"),
    ],
)
def test_validate_section_rejects(slide_path, what, message):
    section = _broken(_section(slide_path), what)
    with pytest.raises(SectionError, match=f"my.h5ad: .*{message}"):
        validate_section(section, "my.h5ad")


def test_write_refuses_invalid_section(slide_path, tmp_path):
    section = _broken(_section(slide_path), "negative")
    with pytest.raises(SectionError, match="negative"):
        write_section(section, tmp_path / "bad.h5ad")
    assert not list(tmp_path.glob("*.h5ad*"))


def test_the_shared_synthetic_data_is_what_conftest_says(
    synthetic_slide_path, synthetic_section_path, tiny_checkpoint_path, spot_array
):
    """The generated slide, section, checkpoint and ST crop the engine tests rely on."""
    from hifusion_model.data.slide import Slide
    from hifusion_model.models.checkpoint import load_checkpoint

    with Slide.open(synthetic_slide_path) as slide:  # the µm/px comes from the OME metadata
        assert slide.mpp == pytest.approx(2.0) and len(slide.levels) == 3
        assert slide.levels[0].shape == (768, 1024, 3)
    section = read_section(synthetic_section_path)
    assert section_slide_path(section) == synthetic_slide_path.resolve()
    assert section.n_vars == 12 and section.var_names[0] == "ERBB2" and section.n_obs > 40
    assert (np.asarray(section.X.sum(axis=0)).ravel() > 0).all()
    assert load_checkpoint(tiny_checkpoint_path).genes == list(section.var_names)
    crop = read_section(spot_array)
    assert crop.n_obs == 40 and crop.n_vars == 20 and section_mpp(crop) == pytest.approx(0.6875)
    pitch = np.sort(np.linalg.norm(crop.obsm["spatial"][1:] - crop.obsm["spatial"][:1], axis=1))
    assert pitch[0] == pytest.approx(200 / 0.6875, rel=0.1)  # HER2ST's 200 µm array
    section_slide(crop)  # the spots lie on the cropped image
