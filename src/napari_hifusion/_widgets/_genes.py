"""Panel 3, genes: pick a gene; predicted and measured spots are recoloured together, in place.

Both layers share contrast limits (percentiles of their pooled values), so equal colours mean
equal expression; the panel shows the colour bar, each gene's validation PCC from the model card
and, when both layers exist, the PCC between prediction and measurement for the current gene.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QLinearGradient, QPainter
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
    QWidget,
)

from hifusion_model.errors import SectionError

from .._jobs import guarded
from .._layers import (
    DEFAULT_COLORMAP,
    DEFAULT_GENE,
    META,
    PREDICTION,
    SPOT_ID,
    TRUTH,
    color_points,
    color_values,
    gene_columns,
    is_slide_layer,
    kind,
    meta,
    robust_limits,
    uncertainty_values,
)
from .._maps import GeneMaps, save_layer_map
from .._subspot import SubspotView
from ._common import ModelState, button, buttons, group

COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "gray")
SLIDE_COPY = "slide-copy"
GAP = 0.05  # gap between the two sides, as a fraction of the slide width


class ColorBar(QWidget):
    """A horizontal colour bar of a napari colormap between two numbers."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.colormap = DEFAULT_COLORMAP
        self.limits = (0.0, 1.0)
        self.label = "ln relative expression"
        self.setMinimumHeight(34)

    def set(self, colormap: str, limits: tuple[float, float],
            label: str = "ln relative expression") -> None:
        self.colormap, self.limits, self.label = colormap, limits, label
        self.update()

    def colors(self, n: int = 16) -> np.ndarray:
        from napari.utils.colormaps import ensure_colormap

        return ensure_colormap(self.colormap).map(np.linspace(0, 1, n))

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        bar = self.rect().adjusted(2, 2, -2, -18)
        gradient = QLinearGradient(bar.left(), 0, bar.right(), 0)
        for i, rgba in enumerate(self.colors()):
            gradient.setColorAt(i / 15, QColor.fromRgbF(*map(float, rgba)))
        painter.fillRect(bar, gradient)
        painter.setPen(self.palette().windowText().color())
        text = self.rect().adjusted(2, bar.height() + 3, -2, 0)
        lo, hi = self.limits
        painter.drawText(text, Qt.AlignLeft | Qt.AlignTop, f"{lo:.2f}")
        painter.drawText(text, Qt.AlignRight | Qt.AlignTop, f"{hi:.2f}")
        painter.drawText(text, Qt.AlignHCenter | Qt.AlignTop, self.label)
        painter.end()


class GenesPanel(QWidget):
    """Searchable gene list; recolours prediction and measured layers; side by side; PCC."""

    def __init__(self, viewer: Any, state: ModelState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.current_gene: str | None = None
        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes…")
        self.search.setClearButtonEnabled(True)
        self.gene_list = QListWidget()
        self.gene_list.setMinimumHeight(140)
        self.colormap = QComboBox()
        self.colormap.addItems(COLORMAPS)
        self.colorbar = ColorBar()
        self.side_by_side = QCheckBox("measured beside predicted")
        self.show_uncertainty = QCheckBox("colour predictions by uncertainty")
        self.show_uncertainty.setToolTip(
            "The counting noise expected at each spot (sparse tissue catches few transcripts): "
            "bright spots would be noisy even if measured. On a patient unlike the training "
            "data it does not say where the model is wrong (see BENCHMARKS.md).")
        self.show_map = QCheckBox("show as a map over the tissue")
        self.show_map.setToolTip(
            "An image of the gene between the spots (Gaussian-weighted mean of the nearby "
            "spots, empty off the tissue), under the spots, in the same colours; as hifusion map")
        self.maps = GeneMaps(viewer)
        self.show_subspot = QCheckBox("sub-spot view (the model's estimate per tile)")
        self.show_subspot.setToolTip(
            "The model's own estimate of the gene in each of a spot's 7 × 7 HISM tiles, as an "
            "image above the predicted spots, in the same colours. No measurement exists at "
            "that scale: it is checked only against the spot's prediction (docs/subspot.md). "
            "Runs the prediction's model over its spots again; as hifusion subspot")
        self.subspot = SubspotView(
            viewer, on_dismissed=lambda: self.show_subspot.setChecked(False))
        self.pcc_label = QLabel()
        self.pcc_label.setWordWrap(True)

        self.search.textChanged.connect(self._filter)
        self.gene_list.currentItemChanged.connect(self._picked)
        self.colormap.currentTextChanged.connect(lambda *_: self.recolor())
        self.side_by_side.toggled.connect(self.set_side_by_side)
        self.show_uncertainty.toggled.connect(lambda *_: self.recolor())
        self.show_map.toggled.connect(lambda on: self.recolor() if on else self.maps.clear())
        self.show_subspot.toggled.connect(
            lambda on: self.recolor() if on else self.subspot.clear())
        state.changed.connect(lambda *_: self.refresh_genes())
        viewer.layers.events.inserted.connect(self._layer_added)
        viewer.layers.events.removed.connect(lambda *_: self.refresh_genes())

        row = QWidget()
        line = QHBoxLayout(row)
        line.setContentsMargins(0, 0, 0, 0)
        line.addWidget(QLabel("colormap"))
        line.addWidget(self.colormap, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.figure_button = button(
            "Save figure…", self._save_figure_dialog,
            "the current gene predicted beside measured over the H&E, its uncertainty and "
            "every gene's PCC (as hifusion plot)")
        self.map_button = button(
            "Save map…", self._save_map_dialog,
            "the current gene of the prediction as an image over the tissue: a pyramidal "
            "OME-TIFF in µm that lies on the slide (as hifusion map)")
        layout.addWidget(group("Genes", self.search, self.gene_list, row, self.colorbar,
                               self.side_by_side, self.show_uncertainty, self.show_map,
                               self.show_subspot, self.pcc_label, buttons(self.figure_button, self.map_button)))
        self.refresh_genes()

    # -- the gene list ---------------------------------------------------------------------------
    def genes(self) -> list[str]:
        """The active model's genes, else every gene shown by an expression layer."""
        ckpt = self.state.checkpoint
        if ckpt is not None:
            return list(ckpt.config.genes)
        seen: dict[str, None] = {}
        for layer in self.expression_layers():
            seen.update(dict.fromkeys(gene_columns(layer)))
        return list(seen)

    def refresh_genes(self) -> None:
        pccs = self.state.validation_pcc()
        self.gene_list.blockSignals(True)
        self.gene_list.clear()
        for gene in self.genes():
            label = f"{gene}    val PCC {pccs[gene]:+.2f}" if gene in pccs else gene
            item = QListWidgetItem(label)
            item.setData(Qt.UserRole, gene)
            self.gene_list.addItem(item)
        self.gene_list.blockSignals(False)
        self._filter(self.search.text())
        genes = self.genes()
        if genes:
            wanted = self.current_gene if self.current_gene in genes else (
                DEFAULT_GENE if DEFAULT_GENE in genes else genes[0])
            self.set_gene(wanted)

    def _filter(self, text: str) -> None:
        text = text.strip().lower()
        for i in range(self.gene_list.count()):
            item = self.gene_list.item(i)
            item.setHidden(bool(text) and text not in item.data(Qt.UserRole).lower())

    def _picked(self, item: QListWidgetItem | None, *_: Any) -> None:
        if item is not None:
            self.set_gene(item.data(Qt.UserRole))

    def _layer_added(self, event: Any) -> None:
        if kind(event.value) in (TRUTH, PREDICTION):
            self.refresh_genes()

    # -- colouring -------------------------------------------------------------------------------
    def expression_layers(self) -> list[Any]:
        return [l for l in self.viewer.layers
                if type(l).__name__ == "Points" and kind(l) in (TRUTH, PREDICTION)]

    @guarded("Gene colouring")
    def set_gene(self, gene: str) -> None:
        """Colour every prediction and measured layer by ``gene``, with shared contrast limits."""
        self.current_gene = gene
        for i in range(self.gene_list.count()):
            item = self.gene_list.item(i)
            if item.data(Qt.UserRole) == gene and self.gene_list.currentItem() is not item:
                self.gene_list.blockSignals(True)
                self.gene_list.setCurrentItem(item)
                self.gene_list.blockSignals(False)
        self.recolor()

    def recolor(self) -> None:
        gene = self.current_gene
        layers = [l for l in self.expression_layers() if gene in l.features]
        cmap = self.colormap.currentText()
        uncertain = {l.name: u for l in layers if kind(l) == PREDICTION
                     and (u := uncertainty_values(l, gene)) is not None}
        self.show_uncertainty.setEnabled(bool(uncertain) or self.show_uncertainty.isChecked())
        if self.show_uncertainty.isChecked() and uncertain:
            limits = robust_limits(list(uncertain.values()))
            for layer in layers:
                if layer.name in uncertain:
                    color_values(layer, uncertain[layer.name], limits, cmap)
                    meta(layer).update(color_by=f"{gene} uncertainty")
            self.colorbar.set(cmap, limits, "uncertainty (SD, ln units)")
        else:
            limits = robust_limits([l.features[gene] for l in layers])
            for layer in layers:
                color_points(layer, gene, limits, cmap)
            self.colorbar.set(cmap, limits)
        if self.show_subspot.isChecked():  # expression, in the spots' expression limits
            self.subspot.show(layers, gene, robust_limits([l.features[gene] for l in layers]),
                              cmap)
        if self.show_map.isChecked():
            self.maps.show(layers, gene, limits, cmap,
                           uncertain if self.show_uncertainty.isChecked() and uncertain else None)
        self.pcc_label.setText(self._pcc_text(gene))

    # -- prediction vs truth ---------------------------------------------------------------------
    def pair(self) -> tuple[Any, Any] | None:
        """A prediction layer and the measured layer of the same spots (or the only one)."""
        predictions = [l for l in self.expression_layers() if kind(l) == PREDICTION]
        truths = {l.name: l for l in self.expression_layers() if kind(l) == TRUTH}
        for pred in predictions:
            truth = truths.get(meta(pred).get("spots_layer"))
            if truth is not None:
                return pred, truth
        if len(predictions) == 1 and len(truths) == 1:
            return predictions[0], next(iter(truths.values()))
        return None

    def pcc(self, gene: str | None = None) -> tuple[float, int] | None:
        """PCC between predicted and measured ``gene`` over the spots both layers hold."""
        from hifusion_model.evaluation.metrics import gene_pcc

        gene = gene or self.current_gene
        pair = self.pair()
        if pair is None or not all(gene in l.features for l in pair):
            return None
        pred, truth = (l.features.set_index(SPOT_ID)[gene] for l in pair)
        both = pd.concat([pred.rename("p"), truth.rename("t")], axis=1, join="inner").dropna()
        if len(both) < 3:
            return None
        return float(gene_pcc(both[["p"]].to_numpy(), both[["t"]].to_numpy())[0]), len(both)

    def _pcc_text(self, gene: str | None) -> str:
        if gene is None:
            return "no expression layers yet: open a section or predict"
        result = self.pcc(gene)
        if result is None:
            return f"{gene}: no measured layer to compare with"
        value, n = result
        return f"{gene}: PCC(predicted, measured) = {value:+.3f} over {n} spots"

    # -- figure ----------------------------------------------------------------------------------
    def _save_figure_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save figure", f"{self.current_gene}.png",
                                              "Images (*.png *.pdf *.svg)")
        if path:
            self.save_figure(path)

    @guarded("Figure")
    def save_figure(self, path: str) -> str:
        """Write :func:`hifusion_model.evaluation.figures.gene_figure` of the current gene and the
        prediction layer (beside its measured one) to ``path``."""
        from hifusion_model.data.sections import UNS_KEY
        from hifusion_model.evaluation.figures import gene_figure
        from hifusion_model.inference.predict import scanpy_spatial

        from .._writer import prediction_anndata

        predictions = [l for l in self.expression_layers() if kind(l) == PREDICTION]
        pair = self.pair()
        layer = pair[0] if pair else (predictions[0] if predictions else None)
        if layer is None or self.current_gene is None:
            raise SectionError("no prediction to draw: predict first, or open a prediction file")
        pred = prediction_anndata(layer)
        genes = list(pred.var_names)
        if pair and "truth" not in pred.layers and set(genes) <= set(pair[1].features):
            measured = pair[1].features.set_index(SPOT_ID)[genes]
            pred.layers["truth"] = measured.reindex(pd.Index(pred.obs_names, dtype=object)
                                                    ).to_numpy(np.float32)
        slide = next((meta(l).get("slide") for l in self.viewer.layers if is_slide_layer(l)
                      and meta(l).get("path") == meta(layer).get("slide_path")), None)
        info = pred.uns[UNS_KEY]
        library, lib, image = scanpy_spatial(info, info.get("slide_abs", info["slide"]),
                                             slide=slide)
        pred.uns["spatial"] = {library: {**lib, "images": {} if image is None else
                                         {"hires": image}}}
        gene_figure(pred, self.current_gene, cmap=self.colormap.currentText()).savefig(
            path, dpi=150)
        return path

    def _save_map_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save map", f"{self.current_gene}.ome.tif",
                                              "OME-TIFF (*.ome.tif *.ome.tiff)")
        if path:
            self.save_map(path)

    @guarded("Map")
    def save_map(self, path: str) -> str:
        """Write the current gene of the prediction layer as a map OME-TIFF (see ``_maps``)."""
        pair = self.pair()
        predictions = [l for l in self.expression_layers() if kind(l) == PREDICTION]
        layer = pair[0] if pair else (predictions[0] if predictions else None)
        if layer is None or self.current_gene is None:
            raise SectionError("no prediction to map: predict first, or open a prediction file")
        return str(save_layer_map(layer, self.current_gene, path))

    # -- side by side ----------------------------------------------------------------------------
    @guarded("Side by side")
    def set_side_by_side(self, on: bool) -> None:
        """Show each measured layer on a copy of its slide, to the right of the original."""
        if self.side_by_side.isChecked() != on:
            self.side_by_side.setChecked(on)  # re-enters through the toggled signal
            return
        for layer in [l for l in self.viewer.layers if kind(l) == SLIDE_COPY]:
            self.viewer.layers.remove(layer)
        truths = [l for l in self.expression_layers() if kind(l) == TRUTH]
        for truth in truths:
            truth.translate = (0.0, 0.0)
        if on:
            for truth in truths:
                self._beside(truth)
        self.viewer.reset_view()

    def _beside(self, truth: Any) -> None:
        image = next((l for l in self.viewer.layers if is_slide_layer(l)
                      and meta(l).get("path") == meta(truth).get("slide_path")), None)
        if image is None:
            return
        width = (image.data[0] if image.multiscale else image.data).shape[1] * image.scale[-1]
        offset = (0.0, width * (1 + GAP))
        copy = self.viewer.add_image(
            image.data, multiscale=image.multiscale, rgb=image.rgb, scale=image.scale,
            contrast_limits=image.contrast_limits, translate=offset, units=image.units,
            name=f"{image.name} (measured side)",
            metadata={META: {"kind": SLIDE_COPY, "path": meta(image).get("path")}},
        )
        truth.translate = offset
        self.viewer.layers.move(self.viewer.layers.index(copy), self.viewer.layers.index(truth))
