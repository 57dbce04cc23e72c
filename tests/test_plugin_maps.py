"""Expression maps in a real viewer: the map layer lies on the slide and follows the Genes panel."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from panel import open_in_panel

from hifusion_model.data.expression import counts_matrix, normalize_counts
from hifusion_model.data.sections import read_section, section_slide_path
from napari_hifusion import _maps
from napari_hifusion._layers import meta

pytestmark = pytest.mark.gui
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def pred_path(synthetic_section_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prediction file of the synthetic section as ``hifusion predict`` lays it out: the
    truth is the normalised counts and the "prediction" a smooth distortion of it."""
    section = read_section(synthetic_section_path)
    genes = list(section.var_names)
    truth = normalize_counts(counts_matrix(section, genes), "log_relative")
    meta_ = dict(section.uns["hifusion"])
    uns = {"hifusion": {k: meta_[k] for k in ("mpp", "spot_diameter_um", "name", "source")}
           | {"slide": str(section_slide_path(section))},
           "hifusion_model": {"source": "test", "n_genes": len(genes),
                              "normalization": "log_relative", "test_time_views": 1}}
    pred = ad.AnnData(X=(truth * 0.8 + 0.1).astype(np.float32),
                      obs=pd.DataFrame(index=section.obs_names.copy()),
                      var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
                      obsm={"spatial": np.asarray(section.obsm["spatial"], np.float64)},
                      layers={"truth": truth.astype(np.float32)}, uns=uns)
    path = tmp_path_factory.mktemp("pred") / "pred.h5ad"
    pred.write_h5ad(path)
    return path


@pytest.fixture
def app(make_napari_viewer, pred_path: Path):
    return open_in_panel(make_napari_viewer(), pred_path)


def map_layers(viewer) -> dict[str, object]:
    return {layer.name: layer for layer in viewer.layers if meta(layer).get("kind") == _maps.MAP}


def wait_maps(qtbot, genes, gene: str, n: int = 2) -> None:
    """Until ``n`` maps of ``gene`` are shown and none is being built (else the last reason)."""
    def ready() -> None:
        assert not genes.maps.busy, "a map is still being built"
        shown = {layer.name: meta(layer)["gene"] for layer in genes.maps.layers()}
        assert len(shown) == n and set(shown.values()) == {gene}, shown

    qtbot.waitUntil(ready, timeout=TIMEOUT_MS)


def value_at(layer, world: np.ndarray) -> np.ndarray:
    """The layer's level-0 values at world points (µm), nearest pixel."""
    data = layer.data[0] if layer.multiscale else layer.data
    idx = np.array([np.rint(layer.world_to_data(w)).astype(int) for w in world])
    return np.asarray(data)[idx[:, 0], idx[:, 1]]


def check_aligned(viewer, points, gene: str, slide: str = "synthetic H&E") -> None:
    """Each spot's world position (µm) reads, on the map, about the spot's value; and lies on
    the slide pixel of its centre."""
    slide = viewer.layers[slide]
    layer = map_layers(viewer)[f"{points.name} map"]
    world = np.array([points.data_to_world(p) for p in points.data])
    on_slide = np.array([slide.world_to_data(w) for w in world])
    np.testing.assert_allclose(on_slide, points.data, atol=1e-6)
    got = value_at(layer, world)
    want = points.features[gene].to_numpy()
    assert np.isfinite(got).all()
    assert np.corrcoef(got, want)[0, 1] > 0.9
    assert np.abs(got - want).mean() < 0.25 * want.std()


def test_the_map_lies_on_the_slide_and_follows_the_gene(app, qtbot, errors, monkeypatch) -> None:
    viewer, widget = app
    genes = widget.genes
    predicted, measured = viewer.layers["synthetic predicted"], viewer.layers["synthetic measured"]
    genes.set_gene("ERBB2")
    genes.show_map.setChecked(True)
    wait_maps(qtbot, genes, "ERBB2")
    assert not errors
    maps = map_layers(viewer)
    layer = maps["synthetic predicted map"]
    emap = meta(layer)["map"]
    assert tuple(layer.scale) == emap.scale == (20.0, 20.0) and tuple(layer.translate) == emap.origin_um
    assert str(layer.units[0]) == "micrometer"
    assert np.isnan(np.asarray(layer.data)[0, 0])  # off the tissue: empty (transparent)
    # under its spots, with their colours and limits
    assert viewer.layers.index(layer) == viewer.layers.index(predicted) - 1
    assert tuple(layer.contrast_limits) == pytest.approx(meta(predicted)["limits"])
    assert layer.colormap.name == "inferno"
    check_aligned(viewer, predicted, "ERBB2")
    check_aligned(viewer, measured, "ERBB2")

    genes.set_gene("GENE3")
    wait_maps(qtbot, genes, "GENE3")
    layer = map_layers(viewer)["synthetic predicted map"]
    check_aligned(viewer, predicted, "GENE3")
    assert tuple(layer.contrast_limits) == pytest.approx(meta(predicted)["limits"])

    genes.colormap.setCurrentText("viridis")  # restyled, not rebuilt
    assert map_layers(viewer)["synthetic predicted map"] is layer
    assert layer.colormap.name == "viridis"

    monkeypatch.setattr(_maps, "MULTISCALE_PX", 40)  # the synthetic map is ~90 px: a pyramid
    genes.set_gene("GENE5")
    wait_maps(qtbot, genes, "GENE5")
    layer = map_layers(viewer)["synthetic predicted map"]
    assert layer.multiscale and len(layer.data) >= 2
    check_aligned(viewer, predicted, "GENE5")

    genes.set_side_by_side(True)  # the measured spots move right; their map with them
    shifted = map_layers(viewer)["synthetic measured map"]
    assert measured.translate[1] > 0
    assert viewer.layers.index(shifted) == viewer.layers.index(measured) - 1  # above the copy
    np.testing.assert_allclose(
        shifted.translate, np.add(meta(shifted)["map"].origin_um, measured.translate))
    check_aligned(viewer, measured, "GENE5", slide="synthetic H&E (measured side)")

    genes.show_map.setChecked(False)
    assert not map_layers(viewer) and predicted in viewer.layers
    assert not errors


def test_a_stale_map_is_dropped(app, qtbot) -> None:
    """Two quick gene switches: only the last gene's map is shown."""
    viewer, widget = app
    genes = widget.genes
    genes.show_map.setChecked(True)
    genes.set_gene("GENE1")
    genes.set_gene("GENE2")
    wait_maps(qtbot, genes, "GENE2")
    qtbot.wait(200)
    assert {meta(l)["gene"] for l in genes.maps.layers()} == {"GENE2"}
    viewer.layers.remove(viewer.layers["synthetic measured"])  # its map goes with it
    assert list(map_layers(viewer)) == ["synthetic predicted map"]


def test_save_map_writes_a_file_that_reopens_in_micrometres(app, tmp_path, errors,
                                                            pred_path) -> None:
    viewer, widget = app
    genes = widget.genes
    genes.set_gene("GENE4")
    path = genes.save_map(str(tmp_path / "gene4.ome.tif"))
    assert path and Path(path).is_file() and not errors
    layers = viewer.open(path, plugin="napari-hifusion")
    [layer] = layers
    assert tuple(layer.scale) == (20.0, 20.0)
    assert layer.name.endswith("GENE4 map")
    predicted = viewer.layers["synthetic predicted"]
    world = np.array([predicted.data_to_world(p) for p in predicted.data])
    got = value_at(layer, world)
    assert np.corrcoef(got, predicted.features["GENE4"])[0, 1] > 0.9
    # a file of hifusion map with two genes and a pyramid: one layer per gene, the first shown
    from hifusion_model.inference.maps import expression_map, write_map

    emap = expression_map(ad.read_h5ad(pred_path), ["ERBB2", "GENE2"], um_per_px=5)
    two = write_map(emap, tmp_path / "two.ome.tif", min_px=64)
    first, second = viewer.open(str(two), plugin="napari-hifusion")
    assert first.multiscale and len(first.data) >= 2
    assert first.name.endswith("ERBB2 map") and second.name.endswith("GENE2 map")
    assert first.visible and not second.visible
    assert tuple(first.scale) == tuple(second.scale) == (5.0, 5.0)
    np.testing.assert_allclose(first.translate, emap.origin_um)
    got = value_at(second, world)
    assert np.corrcoef(got, predicted.features["GENE2"])[0, 1] > 0.9


def test_map_errors_become_notifications(app, errors, tmp_path) -> None:
    viewer, widget = app
    viewer.layers.remove(viewer.layers["synthetic predicted"])
    assert widget.genes.save_map(str(tmp_path / "m.ome.tif")) is None
    assert errors and "no prediction to map" in errors[-1]
    points = viewer.layers["synthetic measured"]
    points.data = points.data[:0]  # no spots left
    widget.genes.show_map.setChecked(True)
    widget.genes.set_gene("GENE1")
    assert any("no spots to map" in e for e in errors)
    assert not map_layers(viewer)
