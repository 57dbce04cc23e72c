"""Reader, writer, sample-data hook and demo command of the napari plugin (no display needed)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from hifusion_model.cli import main as cli_main
from hifusion_model.errors import SectionError
from napari_hifusion import _sample_data
from napari_hifusion._layers import PREDICTION, SPOT_ID, TRUTH, section_from_points
from napari_hifusion._reader import get_reader
from napari_hifusion._testing import MPP, SHAPE, synthetic_section
from napari_hifusion._writer import export_csv, export_h5ad, write_points_h5ad


@pytest.fixture(scope="module")
def section_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_section(tmp_path_factory.mktemp("section"))


class FakePoints:
    """A points layer as the exports see it, without napari's layer machinery."""

    def __init__(self, data: np.ndarray, features: pd.DataFrame, metadata: dict, name: str = "p"):
        self.data, self.features, self.metadata, self.name = data, features, metadata, name


def test_slide_becomes_lazy_multiscale_image_in_um(section_path: Path) -> None:
    slide = section_path.parent / "slide.ome.tif"
    [(levels, kwargs, kind)] = get_reader(str(slide))(str(slide))
    assert kind == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert [lv.shape[:2] for lv in levels] == [SHAPE, (SHAPE[0] // 2, SHAPE[1] // 2), (SHAPE[0] // 4, SHAPE[1] // 4)]
    assert not isinstance(levels[0], np.ndarray)  # lazy: nothing decoded up front
    assert kwargs["scale"] == (MPP, MPP)
    lo, hi = kwargs["contrast_limits"]
    assert 0 <= lo < hi <= 255
    assert kwargs["metadata"]["hifusion"]["mpp"] == MPP


def test_section_becomes_image_and_aligned_points_with_expression(section_path: Path) -> None:
    (_, image_kw, image_kind), (yx, points_kw, points_kind) = get_reader(str(section_path))(str(section_path))
    section = ad.read_h5ad(section_path)
    assert (image_kind, points_kind) == ("image", "points")
    assert points_kw["scale"] == image_kw["scale"] == (MPP, MPP)
    np.testing.assert_allclose(yx, np.asarray(section.obsm["spatial"])[:, ::-1])
    assert points_kw["size"] == pytest.approx(55.0 / MPP)
    features = points_kw["features"]
    assert list(features[SPOT_ID]) == list(section.obs_names)
    assert set(features.columns) == {SPOT_ID, *section.var_names}
    # log_relative over the shown genes: exp of each row sums to 1
    genes = [c for c in features.columns if c != SPOT_ID]
    np.testing.assert_allclose(np.exp(features[genes].to_numpy(np.float64)).sum(axis=1), 1.0, rtol=1e-4)
    meta = points_kw["metadata"]["hifusion"]
    assert meta["kind"] == TRUTH and meta["section"].n_obs == section.n_obs
    assert points_kw["face_color"] == "ERBB2"


def test_reader_declines_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder that is neither Space Ranger nor HEST


def test_broken_section_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(SectionError, match="broken.h5ad"):
        get_reader(str(bad))(str(bad))


def test_edited_points_keep_ids_and_counts(section_path: Path) -> None:
    _, (yx, kw, _) = get_reader(str(section_path))(str(section_path))
    features = kw["features"].iloc[2:].reset_index(drop=True)  # two spots deleted
    features.loc[len(features)] = {SPOT_ID: ""}  # one added, as napari's defaults make it
    data = np.vstack([yx[2:], [[100.0, 200.0]]])
    layer = FakePoints(data, features, kw["metadata"])
    spots = section_from_points(layer)
    assert spots.n_obs == len(data) and spots.n_vars == 0 and spots.obs_names.is_unique
    assert spots.obs_names[-1].startswith("added_")
    measured = section_from_points(layer, counts=True)  # the added spot has no counts: dropped
    source = kw["metadata"]["hifusion"]["section"]
    assert measured.n_obs == len(data) - 1
    np.testing.assert_array_equal(measured.X.toarray(), source[measured.obs_names].X.toarray())


def test_writer_round_trips_a_measured_layer(section_path: Path, tmp_path: Path) -> None:
    _, (yx, kw, _) = get_reader(str(section_path))(str(section_path))
    attributes = {"name": "m", "features": kw["features"], "metadata": kw["metadata"]}
    [written] = write_points_h5ad(str(tmp_path / "out.h5ad"), yx, attributes)
    (_, kw2, _), (yx2, kw3, _) = get_reader(written)(written)
    np.testing.assert_allclose(yx2, yx)
    pd.testing.assert_frame_equal(kw3["features"], kw["features"])
    assert write_points_h5ad(str(tmp_path / "x.h5ad"), yx, {"metadata": {}}) == []  # not ours


def test_csv_export_has_ids_coordinates_and_genes(section_path: Path, tmp_path: Path) -> None:
    _, (yx, kw, _) = get_reader(str(section_path))(str(section_path))
    out = export_csv(FakePoints(yx, kw["features"], kw["metadata"]), tmp_path / "spots.csv")
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == [SPOT_ID, "x_px", "y_px", "x_um", "y_um"]
    np.testing.assert_allclose(table["x_um"], yx[:, 1] * MPP)
    assert "ERBB2" in table and len(table) == len(yx)


def test_prediction_export_needs_its_model(section_path: Path, tmp_path: Path) -> None:
    _, (yx, kw, _) = get_reader(str(section_path))(str(section_path))
    metadata = {"hifusion": {**kw["metadata"]["hifusion"], "kind": PREDICTION}}
    with pytest.raises(SectionError, match="predict again"):
        export_h5ad(FakePoints(yx, kw["features"], metadata), tmp_path / "p.h5ad")


def test_missing_sample_data_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sample_data, "SAMPLE_PACKAGE", "hifusion_model.no_such_samples")
    with pytest.raises(SectionError, match="sample data is not installed"):
        _sample_data.her2st_c4()


def test_sample_data_reads_the_packaged_section(monkeypatch: pytest.MonkeyPatch, section_path: Path) -> None:
    monkeypatch.setattr(_sample_data, "sample_section_path", lambda name="C4": section_path)
    kinds = [kind for _, _, kind in _sample_data.her2st_c4()]
    assert kinds == ["image", "points"]


def test_demo_without_display_or_xvfb_exits_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("sys.platform", "linux")
    assert cli_main(["demo", "--screenshot", "out.png"]) == 2
    assert "xvfb" in capsys.readouterr().err
    assert cli_main(["demo"]) == 2  # headless without --screenshot still needs the virtual display
    err = capsys.readouterr().err
    assert "hifusion-demo.png" in err and "xvfb" in err


def test_headless_demo_reruns_under_xvfb_with_default_screenshot(monkeypatch: pytest.MonkeyPatch) -> None:
    from hifusion_model.commands import demo as demo_command

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv(demo_command.XVFB_GUARD, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/xvfb-run")
    calls = []
    monkeypatch.setattr("subprocess.call", lambda argv, env: calls.append(argv) or 0)
    assert cli_main(["demo"]) == 0
    argv = calls[0]
    assert argv[:2] == ["xvfb-run", "-a"]
    assert argv[argv.index("--screenshot") + 1] == "hifusion-demo.png"
