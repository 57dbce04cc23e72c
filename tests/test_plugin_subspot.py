"""The Genes panel's sub-spot view in a real viewer: tiles in µm on the slide, off the GUI thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from panel import open_in_panel

from hifusion_model.api import predict
from hifusion_model.inference.predict import write_predictions
from hifusion_model.models.checkpoint import save_checkpoint
from hifusion_model.models.registry import create_model
from napari_hifusion import _subspot
from napari_hifusion._layers import meta

pytestmark = pytest.mark.gui
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def pred_path(synthetic_section_path: Path, tiny_checkpoint_path: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prediction file of the synthetic section by the tiny checkpoint (recorded in it)."""
    pred = predict(synthetic_section_path, str(tiny_checkpoint_path), device="cpu", workers=0,
                   precision="fp32")
    return write_predictions(pred, tmp_path_factory.mktemp("pred") / "pred.h5ad", image_px=0)


@pytest.fixture
def app(make_napari_viewer, pred_path: Path):
    return open_in_panel(make_napari_viewer(), pred_path)


def subspot_layers(viewer) -> list:
    return [layer for layer in viewer.layers if meta(layer).get("kind") == _subspot.SUBSPOT]


def wait_subspot(qtbot, genes, gene: str) -> object:
    """Until the sub-spot layer of ``gene`` is shown and nothing is being read."""
    def ready() -> None:
        assert not genes.subspot.busy, "tiles are still being read"
        shown = [meta(layer)["gene"] for layer in subspot_layers(genes.viewer)]
        assert shown == [gene], shown

    qtbot.waitUntil(ready, timeout=TIMEOUT_MS)
    return subspot_layers(genes.viewer)[0]


def test_the_subspot_view_lies_on_the_slide_in_the_spots_colours(app, qtbot, errors) -> None:
    viewer, widget = app
    genes = widget.genes
    predicted = viewer.layers["synthetic predicted"]
    genes.set_gene("ERBB2")
    genes.show_subspot.setChecked(True)
    layer = wait_subspot(qtbot, genes, "ERBB2")
    assert not errors
    assert _subspot.LABEL in layer.name and "ERBB2" in layer.name
    emap = meta(layer)["map"]
    tile_um = 56 * 2.75 / 7  # the tiny model: 154 µm spots, 7 × 7 tiles
    assert tuple(layer.scale) == emap.scale == pytest.approx((tile_um, tile_um))
    assert tuple(layer.translate) == pytest.approx(emap.origin_um)
    assert str(layer.units[0]) == "micrometer"
    assert viewer.layers.index(layer) == viewer.layers.index(predicted) + 1  # right above
    assert tuple(layer.contrast_limits) == pytest.approx(meta(predicted)["limits"])
    assert layer.colormap.name == "inferno"

    # each tile of a spot is at the world µm of its centre, and its mean is about the spot
    result = genes.subspot.tiles[id(predicted)][1]
    centres = result.tile_centers_um()  # (n, 7, 7, (x, y)) µm
    s = len(centres) // 2
    for i, j in [(0, 0), (3, 3), (6, 2)]:
        x, y = centres[s, i, j]
        row, col = np.rint(layer.world_to_data((y, x))).astype(int)
        assert np.asarray(layer.data)[row, col] == pytest.approx(
            np.asarray(emap.data)[0][emap.pixel_of((x, y))])
    world = np.asarray(predicted.data_to_world(predicted.data[s]))  # (y, x) µm of the spot
    np.testing.assert_allclose(world[::-1], result.centers_um[s], atol=1e-6)

    # another gene: shown from the tiles already read, no second pass of the model
    genes.set_gene("GENE3")
    assert not genes.subspot.busy
    layer = wait_subspot(qtbot, genes, "GENE3")
    assert "GENE3" in layer.name
    assert tuple(layer.contrast_limits) == pytest.approx(meta(predicted)["limits"])
    genes.colormap.setCurrentText("viridis")
    assert subspot_layers(viewer)[0].colormap.name == "viridis"

    genes.show_subspot.setChecked(False)
    assert not subspot_layers(viewer) and predicted in viewer.layers
    genes.show_subspot.setChecked(True)  # the tiles are kept: shown at once
    assert not genes.subspot.busy and len(subspot_layers(viewer)) == 1

    viewer.layers.remove(subspot_layers(viewer)[0])  # deleted by hand: the view turns off
    assert not genes.show_subspot.isChecked() and not subspot_layers(viewer)
    genes.set_gene("GENE1")
    assert not subspot_layers(viewer)
    genes.show_subspot.setChecked(True)
    wait_subspot(qtbot, genes, "GENE1")
    assert not errors  # left on: the viewer closes with it


def test_a_spot_only_model_is_a_notification(app, qtbot, errors, tmp_path) -> None:
    viewer, widget = app
    genes = widget.genes
    predicted = viewer.layers["synthetic predicted"]
    names = list(predicted.features.columns[1:])
    torch.manual_seed(0)
    spot_only = save_checkpoint(tmp_path / "spot.pt", create_model("spot_resnet18", genes=names),
                                train_mean=torch.zeros(len(names)))
    meta(predicted)["model"] = str(spot_only)
    genes.show_subspot.setChecked(True)
    qtbot.waitUntil(lambda: not genes.subspot.busy and bool(errors), timeout=TIMEOUT_MS)
    assert "need a HiFusion model" in errors[-1] and "\n" not in errors[-1]
    assert not subspot_layers(viewer) and predicted in viewer.layers

    meta(predicted)["model"] = str(tmp_path / "gone.pt")
    genes.set_gene("GENE1")
    assert "not found" in errors[-1]
    assert not subspot_layers(viewer)


def test_a_large_layer_reads_only_the_gene_shown(app, qtbot, errors, monkeypatch) -> None:
    """Beyond the cache, each gene is read when shown; quick switches: the last one wins."""
    monkeypatch.setattr(_subspot, "CACHE_BYTES", 0)
    viewer, widget = app
    genes = widget.genes
    predicted = viewer.layers["synthetic predicted"]
    genes.set_gene("ERBB2")
    genes.show_subspot.setChecked(True)
    wait_subspot(qtbot, genes, "ERBB2")
    assert genes.subspot.tiles[id(predicted)][1].genes == ["ERBB2"]
    genes.set_gene("GENE2")
    assert genes.subspot.busy  # read again, for that gene
    wait_subspot(qtbot, genes, "GENE2")
    genes.set_gene("GENE3")
    genes.set_gene("GENE4")
    layer = wait_subspot(qtbot, genes, "GENE4")
    assert genes.subspot.tiles[id(predicted)][1].genes == ["GENE4"] and "GENE4" in layer.name
    assert not errors
