"""The HiFusion dock widget: five panels, one workflow from top to bottom.

1. Slide and spots  2. Predict  3. Genes  4. Train  5. Export. The panels share one
:class:`~._common.ModelState` (the active model); each panel's actions are plain methods, so
scripts and tests drive them exactly as the buttons do.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from ._common import ModelState
from ._export import ExportPanel
from ._genes import GenesPanel
from ._predict import PredictPanel
from ._spots import SpotsPanel
from ._train import TrainPanel


class HiFusionWidget(QScrollArea):
    """All panels in a scrollable column (the widget napari docks)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = ModelState()
        self.spots = SpotsPanel(napari_viewer, self.state)
        self.predict = PredictPanel(napari_viewer, self.state)
        self.genes = GenesPanel(napari_viewer, self.state)
        self.train = TrainPanel(napari_viewer, self.state)
        self.export = ExportPanel(napari_viewer, self.state)
        inner = QWidget()
        layout = QVBoxLayout(inner)
        for panel in (self.spots, self.predict, self.genes, self.train, self.export):
            layout.addWidget(panel)
        layout.addStretch(1)
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setMinimumWidth(340)


__all__ = ["HiFusionWidget", "ModelState", "SpotsPanel", "PredictPanel", "GenesPanel",
           "TrainPanel", "ExportPanel"]
