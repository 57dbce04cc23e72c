"""Panel 5, export: a prediction (or any HiFusion spots layer) to ``.h5ad`` or CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog, QLabel, QVBoxLayout, QWidget

from hifusion_model.errors import SectionError

from .._jobs import guarded
from .._layers import PREDICTION, is_spots_layer, kind
from .._writer import export_csv, export_h5ad
from ._common import ModelState, button, buttons, group, layer_picker


class ExportPanel(QWidget):
    """Save the chosen layer's spots and expression."""

    def __init__(self, viewer: Any, state: ModelState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_combo = layer_picker(viewer, is_spots_layer)
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(group(
            "Export",
            ("layer", self.layer_combo),
            buttons(button("Save .h5ad…", lambda: self._dialog("h5ad")),
                    button("Save CSV…", lambda: self._dialog("csv"))),
            self.status,
        ))

    def _dialog(self, fmt: str) -> None:
        layer = self.layer_combo.value
        name = f"{layer.name if layer else 'spots'}.{fmt}".replace(" ", "_")
        path, _ = QFileDialog.getSaveFileName(self, f"Save {fmt}", name, f"{fmt} (*.{fmt})")
        if path:
            (self.save_h5ad if fmt == "h5ad" else self.save_csv)(path)

    def _layer(self) -> Any:
        layer = self.layer_combo.value
        if layer is None:
            raise SectionError("nothing to export: predict first (or pick a spots layer)")
        return layer

    @guarded("Export")
    def save_h5ad(self, path: str | Path) -> Path:
        layer = self._layer()
        out = export_h5ad(layer, path)
        what = "predictions" if kind(layer) == PREDICTION else "spots"
        self.status.setText(f"saved {len(layer.data)} {what} to {out}")
        return out

    @guarded("Export")
    def save_csv(self, path: str | Path) -> Path:
        layer = self._layer()
        out = export_csv(layer, path)
        self.status.setText(f"saved {len(layer.data)} spots to {out}")
        return out
