"""Reader, writer, sample-data hook and demo command of the napari plugin (no display needed)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from synthetic import MPP, SHAPE, synthetic_section, tiny_checkpoint

from hifusion_model.cli import main as cli_main
from hifusion_model.errors import SectionError
from napari_hifusion import _sample_data
from napari_hifusion._layers import PREDICTION, SPOT_ID, TRUTH, kind, section_from_points
from napari_hifusion._reader import get_reader
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
    monkeypatch.setattr("hifusion_model.samples.SAMPLE_NAME", "no_such_sample")
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
    from hifusion_model.cli import demo as demo_command

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


# -- a good napari citizen --------------------------------------------------------------------
def _manifest_readers(path: str) -> set[str]:
    from importlib.metadata import entry_points
    from importlib.resources import files

    from npe2 import PluginManager, PluginManifest

    [entry] = [e for e in entry_points(group="napari.manifest") if e.name == "napari-hifusion"]
    module, _, name = entry.value.partition(":")
    manifest = files(module) / name
    assert manifest.is_file() and not Path(str(manifest)).is_symlink()  # the packaged file is real
    pm = PluginManager()
    pm.register(PluginManifest.from_file(str(manifest)))
    return {r.plugin_name for r in pm.iter_compatible_readers([path])}


def test_manifest_claims_only_its_own_files(tmp_path: Path) -> None:
    assert not (Path(__file__).parents[1] / "napari.yaml").exists()  # one manifest, in the package
    for theirs in ("a.csv", "a.png", "a.npy", "a.tif", "a.jpg", "notes.txt", "points.json"):
        assert _manifest_readers(str(tmp_path / theirs)) == set(), theirs
    for ours in ("s.h5ad", "s.ome.tif", "s.OME.TIFF", "s.svs", "s.ndpi", "s.mrxs", "s.scn"):
        assert _manifest_readers(str(tmp_path / ours)) == {"napari-hifusion"}, ours
        assert get_reader(str(tmp_path / ours)) is not None, ours  # and the reader takes it


def test_get_reader_declines_foreign_paths_without_reading_them(tmp_path: Path) -> None:
    (tmp_path / "store.zarr" / "spatial").mkdir(parents=True)  # even a store that looks like ours
    (tmp_path / "store.zarr" / "spatial" / "tissue_positions.csv").write_text("barcode\n")
    (tmp_path / "plain").mkdir()
    for name in ("a.csv", "a.npy", "a.json"):
        (tmp_path / name).write_text("x")
    for p in ("store.zarr", "plain", "a.csv", "a.npy", "a.json", "missing.txt"):
        assert get_reader(str(tmp_path / p)) is None, p
    assert get_reader([str(tmp_path / "a.csv"), str(tmp_path / "s.h5ad")]) is None
    assert get_reader(str(tmp_path / "not-yet-read.h5ad")) is not None  # decided by name alone


# -- prediction files reopen ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_section(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_section(tmp_path_factory.mktemp("small"), n_genes=6, pitch_um=300.0)


def test_prediction_file_from_the_cli_reopens_as_prediction_layers(
    small_section: Path, tmp_path: Path
) -> None:
    genes = list(ad.read_h5ad(small_section).var_names)
    model = tiny_checkpoint(tmp_path / "tiny.pt", genes[:4])
    out = tmp_path / "s.pred.h5ad"
    argv = ["predict", str(small_section), "--model", str(model), "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    assert cli_main(argv) == 0
    pred = ad.read_h5ad(out)
    (_, image_kw, image_kind), (_, truth_kw, _), (yx_p, pred_kw, kind) = (
        get_reader(str(out))(str(out)))
    assert (image_kind, kind) == ("image", "points") and image_kw["scale"] == (MPP, MPP)
    assert (truth_kw["name"], pred_kw["name"]) == ("synthetic measured", "synthetic predicted")
    info = pred_kw["metadata"]["hifusion"]
    assert info["kind"] == PREDICTION and truth_kw["metadata"]["hifusion"]["kind"] == TRUTH
    assert info["spots_layer"] == "synthetic measured" and info["model"] == str(model)
    np.testing.assert_allclose(yx_p, np.asarray(pred.obsm["spatial"])[:, ::-1])
    np.testing.assert_allclose(pred_kw["features"][genes[:4]].to_numpy(), pred.X)
    np.testing.assert_allclose(truth_kw["features"][genes[:4]].to_numpy(), pred.layers["truth"])
    assert list(pred_kw["features"][SPOT_ID]) == list(pred.obs_names)
    assert pred_kw["size"] == pytest.approx(55.0 / MPP)

    # the plugin's writer writes it again, spots moved and deleted as on the layer
    features = pred_kw["features"].iloc[1:].reset_index(drop=True)
    features.loc[0, genes[0]] = 7.0
    moved = yx_p[1:] + [0.0, 5.0]
    attributes = {"name": pred_kw["name"], "features": features, "metadata": pred_kw["metadata"]}
    [again] = write_points_h5ad(str(tmp_path / "again.h5ad"), moved, attributes)
    back = ad.read_h5ad(again)
    assert list(back.obs_names) == list(pred.obs_names[1:]) and back.X[0, 0] == 7.0
    np.testing.assert_allclose(back.obsm["spatial"], moved[:, ::-1])
    np.testing.assert_allclose(back.layers["truth"], pred.layers["truth"][1:])
    assert back.uns["hifusion_model"]["source"] == str(model)
    layers = get_reader(again)(again)
    assert [kw["metadata"]["hifusion"]["kind"] for _, kw, _ in layers] == ["slide", TRUTH, PREDICTION]


def test_prediction_file_without_its_slide_says_so(small_section: Path, tmp_path: Path) -> None:
    import shutil

    from hifusion_model.data.sections import read_section
    from hifusion_model.inference.predict import predictions_to_anndata, write_predictions
    from hifusion_model.models.checkpoint import load_checkpoint

    section = read_section(small_section)
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt", list(section.var_names[:2])))
    adata = predictions_to_anndata(section, np.zeros((section.n_obs, 2)), ckpt)
    out = write_predictions(adata, tmp_path / "p.h5ad")
    shutil.copy(out, tmp_path / "elsewhere.h5ad")
    adata.uns["hifusion"]["slide_abs"] = str(tmp_path / "gone.ome.tif")
    with pytest.warns(UserWarning, match="cannot read the slide"):
        write_predictions(adata, tmp_path / "orphan.h5ad")
    with pytest.raises(SectionError, match="gone.ome.tif does not exist"):
        get_reader(str(tmp_path / "orphan.h5ad"))(str(tmp_path / "orphan.h5ad"))


# -- scanpy / squidpy, Space Ranger and HEST folders -------------------------------------------
def test_scanpy_visium_h5ad_and_spaceranger_folders_open(tmp_path: Path) -> None:
    from spaceranger import write_spaceranger
    from test_importers import scanpy_visium

    outs = write_spaceranger(tmp_path, mpp=4.0)
    adata, _ = scanpy_visium(outs, source_image=True)
    adata.write_h5ad(tmp_path / "visium.h5ad")
    (_, image_kw, _), (_, points_kw, _) = get_reader(str(tmp_path / "visium.h5ad"))(
        str(tmp_path / "visium.h5ad"))
    assert image_kw["scale"][0] == pytest.approx(4.0, rel=0.01)
    assert points_kw["metadata"]["hifusion"]["kind"] == TRUTH
    for folder in (outs, outs.parent):  # outs/ and the run folder above it
        (_, kw, _), _ = get_reader(str(folder))(str(folder))
        assert kw["scale"][0] == pytest.approx(4.0, rel=0.01)


def test_gui_errors_speak_gui_not_cli_flags(tmp_path: Path) -> None:
    from spaceranger import write_spaceranger

    from hifusion_model.data.importers import ScaleMismatchWarning
    from hifusion_model.errors import SlideError

    outs = write_spaceranger(tmp_path, mpp=4.0, fullres=False)
    for png in (outs / "spatial").glob("*.png"):
        png.unlink()
    with pytest.raises(SlideError) as caught:
        get_reader(str(outs))(str(outs))
    message = str(caught.value)
    assert "--" not in message and "leave exactly one full-resolution image" in message
    from napari_hifusion._reader import gui_message

    outs = write_spaceranger(tmp_path / "55", spot_diameter_um=55.0)
    with pytest.warns(ScaleMismatchWarning) as warned:  # warnings, too, speak GUI
        get_reader(str(outs))(str(outs))
    [message] = [str(w.message) for w in warned if w.category is ScaleMismatchWarning]
    assert "--" not in message and "set µm/px in the HiFusion Spots panel" in message
    assert "--" not in gui_message("img.tif: unknown µm/px (the image does not record it); "
                                   "pass --mpp, or a spot table with new_x/new_y columns to "
                                   "derive it")


def test_a_folder_of_many_hest_samples_lists_them(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    for sample in ("TENX95", "NCBI785", "MEND139"):
        (tmp_path / "st" / f"{sample}.h5ad").write_bytes(b"")
    with pytest.raises(SectionError, match=r"3 samples \(MEND139, NCBI785, TENX95\); open one"):
        get_reader(str(tmp_path))(str(tmp_path))


@pytest.mark.gui
def test_viewer_opens_foreign_files_with_napari_and_predictions_with_us(
    make_napari_viewer, small_section: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from hifusion_model.data.sections import read_section
    from hifusion_model.inference.predict import predictions_to_anndata, write_predictions
    from hifusion_model.models.checkpoint import load_checkpoint

    viewer = make_napari_viewer()
    (tmp_path / "points.csv").write_text("index,axis-0,axis-1\n0,10,20\n1,30,40\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "picture.png")
    np.save(tmp_path / "array.npy", np.zeros((4, 4)))
    # plugin=None: napari chooses as in the GUI, and raises MultipleReaderError on a tie
    for name in ("points.csv", "picture.png", "array.npy"):  # one reader each: napari's own
        [layer] = viewer.open(str(tmp_path / name), plugin=None)
        assert "hifusion" not in layer.metadata
    section = read_section(small_section)
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt", list(section.var_names[:3])))
    pred = np.random.default_rng(0).normal(size=(section.n_obs, 3))
    out = write_predictions(predictions_to_anndata(section, pred, ckpt), tmp_path / "p.pred.h5ad")
    layers = viewer.open(str(out), plugin=None)
    assert [kind(layer) for layer in layers] == ["slide", TRUTH, PREDICTION]
