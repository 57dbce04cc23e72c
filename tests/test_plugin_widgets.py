"""The dock widget in a real viewer: spots, prediction, gene colouring, training, cancel, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from napari.utils.colormaps import ensure_colormap
from panel import TIMEOUT_MS, open_in_panel, wait_done
from synthetic import MPP, synthetic_section, tiny_checkpoint

from napari_hifusion import _jobs, _sample_data
from napari_hifusion._layers import PREDICTION, TRUTH, kind, meta

pytestmark = pytest.mark.gui
GENES = ["ERBB2", *[f"GENE{i}" for i in range(1, 8)]]


@pytest.fixture(scope="module")
def section_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_section(tmp_path_factory.mktemp("section"), n_genes=len(GENES), pitch_um=160.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", GENES)


@pytest.fixture
def app(make_napari_viewer, section_path: Path):
    return open_in_panel(make_napari_viewer(), section_path)


def predict(qtbot, widget, model_path: Path, layer_name: str = "synthetic measured"):
    widget.predict.spots_combo.value = widget.viewer.layers[layer_name]
    widget.predict.set_model(model_path)
    widget.predict.device.setCurrentText("cpu")
    assert widget.predict.predict() is not None
    wait_done(qtbot, widget.predict.jobs)
    return widget.viewer.layers[layer_name.removesuffix(" measured") + " predicted"]


def test_opening_a_section_gives_aligned_layers(app) -> None:
    viewer, _ = app
    image, points = viewer.layers
    assert image.multiscale and image.rgb and len(image.data) == 3
    np.testing.assert_allclose(image.scale, (MPP, MPP))
    np.testing.assert_allclose(points.scale, image.scale)
    assert kind(points) == TRUTH and "ERBB2" in points.features


def test_grid_inside_a_polygon(app, qtbot, errors) -> None:
    viewer, widget = app
    # a polygon in µm over the left half of the tissue
    shapes = viewer.add_shapes([[[300, 300], [1200, 300], [1200, 1000], [300, 1000]]],
                               shape_type="polygon", name="region")
    widget.spots.shapes_combo.value = widget.viewer.layers["region"]
    widget.spots.kind.setCurrentText("square (legacy ST)")
    assert widget.spots.pitch.value() == 200.0 and widget.spots.diameter.value() == 100.0
    widget.spots.pitch.setValue(100.0)
    widget.spots.diameter.setValue(55.0)
    widget.spots.generate_grid()
    wait_done(qtbot, widget.spots.jobs)
    assert not errors
    spots = viewer.layers["synthetic H&E spots"]
    world = spots.data * MPP
    assert len(spots.data) > 10
    assert (world[:, 0] >= 300).all() and (world[:, 0] <= 1200).all()
    assert (world[:, 1] >= 300).all() and (world[:, 1] <= 1000).all()
    assert spots.size[0] == pytest.approx(55.0 / MPP)
    assert shapes in viewer.layers
    # marked as a placed grid, as `hifusion predict --grid` marks its own, so that predicting
    # it takes the same path (dense where that is the default)
    from hifusion_model.data.grids import is_grid_source
    from hifusion_model.data.sections import UNS_KEY

    from napari_hifusion._layers import section_from_points

    assert is_grid_source(section_from_points(spots).uns[UNS_KEY]["source"])


def test_a_large_grid_is_placed_only_when_the_user_agrees(app, qtbot, monkeypatch) -> None:
    from hifusion_model.data import grids

    viewer, widget = app
    monkeypatch.setattr(grids, "LARGE_GRID", 5)  # the synthetic tissue holds a few dozen
    asked: list[str] = []
    infos: list[str] = []
    monkeypatch.setattr(_jobs, "show_info", infos.append)
    from napari_hifusion._widgets import _spots

    monkeypatch.setattr(_spots, "show_info", infos.append)
    for answer in (False, True):
        monkeypatch.setattr(widget.spots, "confirm", lambda q, a=answer: asked.append(q) or a)
        widget.spots.generate_grid()
        wait_done(qtbot, widget.spots.jobs)
        assert ("synthetic H&E spots" in viewer.layers) is answer
    assert len(asked) == 2 and "h to predict on a CPU" in asked[0]
    assert any("no grid placed" in i for i in infos)


def test_prediction_layer_holds_every_gene(app, qtbot, model_path, errors) -> None:
    viewer, widget = app
    layer = predict(qtbot, widget, model_path)
    assert not errors
    assert kind(layer) == PREDICTION
    assert list(layer.features.columns) == ["spot_id", *GENES]
    truth = viewer.layers["synthetic measured"]
    assert len(layer.data) == len(truth.data)
    assert np.isfinite(layer.features[GENES].to_numpy()).all()
    # the measured layer now holds the model's genes, normalised the same way
    assert list(truth.features.columns) == ["spot_id", *GENES]
    assert widget.state.checkpoint.config.genes == GENES


def test_test_time_views_reach_the_exported_file(app, qtbot, model_path, tmp_path) -> None:
    import anndata as ad

    from napari_hifusion._writer import export_h5ad

    _, widget = app
    widget.predict.tta.setValue(2)
    try:
        layer = predict(qtbot, widget, model_path)
    finally:
        widget.predict.tta.setValue(1)
    written = ad.read_h5ad(export_h5ad(layer, tmp_path / "pred.h5ad"))
    assert written.uns["hifusion_model"]["test_time_views"] == 2


def test_gene_switch_recolours_both_layers_in_place(app, qtbot, model_path) -> None:
    viewer, widget = app
    pred = predict(qtbot, widget, model_path)
    truth = viewer.layers["synthetic measured"]
    n_layers = len(viewer.layers)
    before = pred.face_color.copy(), truth.face_color.copy()
    label = widget.genes.gene_list.item(0).text()
    assert label.startswith("ERBB2") and "val PCC +0.90" in label
    widget.genes.set_gene("GENE5")
    assert len(viewer.layers) == n_layers
    assert meta(pred)["color_by"] == meta(truth)["color_by"] == "GENE5"
    assert meta(pred)["limits"] == meta(truth)["limits"]
    lo, hi = meta(pred)["limits"]  # both layers on one scale: equal values, equal colours
    brightest = np.argmax(pred.features["GENE5"].to_numpy())
    assert pred.features["GENE5"].iloc[brightest] >= hi - 1e-6
    np.testing.assert_allclose(pred.face_color[brightest],
                               ensure_colormap(meta(pred)["colormap"]).map(np.array([1.0]))[0])
    assert not np.allclose(pred.face_color, before[0]) and not np.allclose(truth.face_color, before[1])
    pcc, n = widget.genes.pcc("GENE5")
    assert n == len(truth.data) and -1 <= pcc <= 1
    assert "GENE5: PCC(predicted, measured)" in widget.genes.pcc_label.text()
    widget.genes.search.setText("gene5")
    visible = [widget.genes.gene_list.item(i).data(0x0100) for i in range(widget.genes.gene_list.count())
               if not widget.genes.gene_list.item(i).isHidden()]
    assert visible == ["GENE5"]


@pytest.fixture(scope="module")
def noisy_model_path(section_path: Path, model_path: Path) -> Path:
    """The tiny model with a noise model fitted on the synthetic section: it has uncertainty."""
    from hifusion_model.data.sections import read_section, section_slide
    from hifusion_model.inference.uncertainty import fit_on_sections
    from hifusion_model.models.checkpoint import load_model, save_checkpoint

    model, ckpt = load_model(model_path)
    section = read_section(section_path)
    slide = section_slide(section)
    noise = fit_on_sections([(section, slide)], ckpt.config)
    slide.close()
    return save_checkpoint(model_path.with_name("noisy.pt"), model, train_mean=ckpt.train_mean,
                           card={**ckpt.card, "noise_model": noise.to_dict()})


def test_uncertainty_colours_the_predictions_where_not_to_trust_them(
    app, qtbot, model_path, noisy_model_path, tmp_path
) -> None:
    viewer, widget = app
    genes = widget.genes
    predict(qtbot, widget, model_path)
    genes.set_gene("GENE5")
    assert not genes.show_uncertainty.isEnabled()  # this model has no noise model
    pred = predict(qtbot, widget, noisy_model_path)
    genes.set_gene("GENE5")
    assert genes.show_uncertainty.isEnabled()
    table = meta(pred)["uncertainty"]
    assert list(table.columns) == GENES and len(table) == len(pred.data)
    expression = pred.face_color.copy()
    genes.show_uncertainty.setChecked(True)
    assert meta(pred)["color_by"] == "GENE5 uncertainty"
    assert genes.colorbar.label.startswith("uncertainty")
    assert meta(pred)["limits"] != meta(viewer.layers["synthetic measured"])["limits"]
    most = int(np.argmax(table["GENE5"].to_numpy()))
    np.testing.assert_allclose(pred.face_color[most],
                               ensure_colormap(meta(pred)["colormap"]).map(np.array([1.0]))[0])
    assert not np.allclose(pred.face_color, expression)
    genes.show_uncertainty.setChecked(False)
    assert meta(pred)["color_by"] == "GENE5" and genes.colorbar.label.startswith("ln")
    np.testing.assert_allclose(pred.face_color, expression)
    # the exported file keeps it, spot by spot
    import anndata as ad

    from napari_hifusion._writer import export_h5ad

    written = ad.read_h5ad(export_h5ad(pred, tmp_path / "pred.h5ad"))
    np.testing.assert_allclose(written.layers["uncertainty"],
                               table.loc[written.obs_names, GENES].to_numpy(), rtol=1e-6)


def test_the_genes_panel_saves_the_figure_of_its_gene(app, qtbot, model_path, errors,
                                                     tmp_path) -> None:
    from PIL import Image

    viewer, widget = app
    assert widget.genes.save_figure(str(tmp_path / "none.png")) is None
    assert errors and "predict first" in errors[-1] and not (tmp_path / "none.png").exists()
    predict(qtbot, widget, model_path)
    widget.genes.set_gene("GENE5")
    out = widget.genes.save_figure(str(tmp_path / "gene5.png"))
    with Image.open(out) as im:
        width, height = im.size
    assert width > 2 * height


def test_side_by_side_puts_truth_on_a_slide_copy(app, qtbot, model_path) -> None:
    viewer, widget = app
    predict(qtbot, widget, model_path)
    truth = viewer.layers["synthetic measured"]
    widget.genes.set_side_by_side(True)
    copy = viewer.layers["synthetic H&E (measured side)"]
    assert truth.translate[1] > 1024 * MPP and np.allclose(copy.translate, truth.translate)
    assert viewer.layers.index(copy) < viewer.layers.index(truth)
    widget.genes.set_side_by_side(False)
    assert "synthetic H&E (measured side)" not in viewer.layers
    assert np.allclose(truth.translate, 0)


def test_predicted_spots_are_drawn_in_colour(make_napari_viewer, section_path, qtbot, model_path) -> None:
    viewer, widget = open_in_panel(make_napari_viewer(show=True), section_path)  # hidden: no GL frame
    viewer.window.resize(1400, 900)
    viewer.layers["synthetic measured"].visible = False
    viewer.reset_view()
    qtbot.wait(50)

    def coloured(shot: np.ndarray) -> int:
        rgb = shot[..., :3].astype(int)
        return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 120).sum())  # strong chroma: not H&E pink

    base = coloured(viewer.screenshot(canvas_only=True, flash=False))
    predict(qtbot, widget, model_path)
    qtbot.wait(50)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert coloured(shot) > base + 0.005 * shot.shape[0] * shot.shape[1]


def test_training_writes_a_loadable_active_checkpoint(app, qtbot, tmp_path) -> None:
    from hifusion_model.models.checkpoint import load_model

    viewer, widget = app
    panel = widget.train
    assert panel.checked_names() == ["synthetic measured"]
    panel.architecture.setCurrentIndex(1)  # tiny
    panel.epochs.setValue(1)
    panel.n_genes.setValue(4)
    panel.batch_size.setValue(16)
    panel.refit.setChecked(True)
    panel.out.setText(str(tmp_path / "trained.pt"))
    assert panel.train() is not None
    wait_done(qtbot, panel.jobs)
    model, ckpt = load_model(tmp_path / "trained.pt")
    assert ckpt.config.n_genes == 4 and ckpt.card["refit"]["epoch"] == 1
    assert [r["refit"] for r in panel.records] == [False, True] and "refit" in panel.table.text()
    assert "refit on every spot to epoch 1" in panel.status.text()
    assert panel.save_curve(str(tmp_path / "curve.png")) == tmp_path / "curve.png"
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert len(panel.curve.figure.axes) == 2  # loss and MSE, gene PCC on its own axis
    assert widget.state.source == str(tmp_path / "trained.pt")
    assert widget.predict.model_source() == str(tmp_path / "trained.pt")
    assert widget.genes.gene_list.count() == 4


def tiny_training(panel, out: Path, epochs: int):
    """The Train panel set for a few-second run of the tiny network on 4 genes."""
    panel.architecture.setCurrentIndex(1)
    panel.epochs.setValue(epochs)
    panel.n_genes.setValue(4)
    panel.batch_size.setValue(16)
    panel.out.setText(str(out))
    return panel


def test_training_without_validation_keeps_the_last_epoch(app, qtbot, tmp_path) -> None:
    from hifusion_model.models.checkpoint import load_checkpoint
    from napari_hifusion._widgets._train import NO_VALIDATION

    panel = tiny_training(app[1].train, tmp_path / "all_spots.pt", epochs=2)
    panel.refit.setChecked(True)  # nothing held out: nothing to refit
    panel.validation.setCurrentText(NO_VALIDATION)
    assert panel.train() is not None
    wait_done(qtbot, panel.jobs)
    card = load_checkpoint(tmp_path / "all_spots.pt").card
    assert card["epoch"] == 2 and card["validation"] is None and "refit" not in card
    assert [r["best"] for r in panel.records] == [False, True]
    assert "–" in panel.table.text()
    assert "epoch 2, every spot trained, no validation" in panel.status.text()


def test_training_with_pseudo_labels(app, qtbot, tmp_path, section_path, model_path,
                                     errors) -> None:
    from hifusion_model.cli import main
    from hifusion_model.models.checkpoint import load_checkpoint
    from napari_hifusion._widgets._train import NO_VALIDATION

    panel = tiny_training(app[1].train, tmp_path / "student.pt", epochs=1)
    panel.pseudo.setText(str(tmp_path / "missing.h5ad"))
    assert panel.train() is None and "pseudo-labels" in errors[-1] and "not found" in errors[-1]
    pseudo = tmp_path / "gaps.h5ad"
    assert main(["pseudolabel", str(section_path), "--model", str(model_path), "--out",
                 str(pseudo), "--device", "cpu", "--workers", "0"]) == 0
    panel.pseudo.setText(str(pseudo))
    assert panel.train() is not None  # the core refuses held-out blocks with pseudo-labels
    wait_done(qtbot, panel.jobs)
    assert "validate nothing" in errors[-1] and not (tmp_path / "student.pt").exists()
    panel.validation.setCurrentText(NO_VALIDATION)
    assert panel.train() is not None
    wait_done(qtbot, panel.jobs)
    measured, gaps = load_checkpoint(tmp_path / "student.pt").card["sections"]
    assert gaps["pseudo_labels_from"] == [str(model_path)] and gaps["n_train"] > 0
    assert measured["n_val"] == 0 and len(errors) == 2


def test_cancel_stops_a_prediction(app, qtbot, model_path, monkeypatch) -> None:
    viewer, widget = app
    infos: list[str] = []
    monkeypatch.setattr(_jobs, "show_info", infos.append)
    widget.predict.spots_combo.value = widget.viewer.layers["synthetic measured"]
    widget.predict.set_model(model_path)
    widget.predict.batch_size.setValue(1)
    widget.predict.predict()
    widget.predict.cancel()
    wait_done(qtbot, widget.predict.jobs)
    assert infos == ["Prediction cancelled"]
    assert "synthetic measured predicted" not in viewer.layers


def test_invalid_inputs_notify_instead_of_raising(app, qtbot, errors, tmp_path) -> None:
    viewer, widget = app
    widget.predict.set_model(tmp_path / "missing.pt")
    assert widget.predict.predict() is None
    assert "checkpoint not found" in errors[-1]
    widget.spots.apply_mpp(0.0)  # spin boxes clamp; a script can still pass nonsense
    assert "µm/px must be positive" in errors[-1]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    widget.spots.import_csv(tmp_path / "bad.csv")
    assert "no spot-centre columns" in errors[-1]
    widget.export.layer_combo.value = widget.viewer.layers["synthetic measured"]
    widget.export.save_h5ad(tmp_path / "wrong.csv")
    assert "must end in .h5ad" in errors[-1]
    widget.train.encoders["region"].setText(str(tmp_path / "missing-encoder.pt"))
    assert widget.train.train() is None
    assert "region encoder weights" in errors[-1] and "not found" in errors[-1]
    weights = tmp_path / "region.pt"
    weights.write_bytes(b"checked by train(), not by the panel")
    widget.train.encoders["region"].setText(str(weights))
    assert widget.train.encoder_weights() == {"region_encoder_init": weights}
    viewer.layers.clear()
    widget.train.train()
    assert "no training section" in errors[-1]


def test_demo_shows_prediction_and_truth_side_by_side(qtbot, monkeypatch, section_path, model_path):
    from napari_hifusion.demo import build_demo

    monkeypatch.setattr(_sample_data, "sample_section_path", lambda name="C4": section_path)
    viewer, widget, worker = build_demo(str(model_path), gene="GENE2", device="cpu", show=False)
    try:
        qtbot.waitUntil(lambda: "synthetic H&E (measured side)" in viewer.layers, timeout=TIMEOUT_MS)
        assert widget.genes.current_gene == "GENE2"
        assert meta(viewer.layers["synthetic predicted"])["color_by"] == "GENE2"
    finally:
        viewer.close()
