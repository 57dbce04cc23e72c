"""The Train panel's live curve: the core's training-curve figure on a Qt canvas, redrawn at
each epoch, with the same axes, lines and kept-epoch mark that ``hifusion plot
MODEL.curves.json`` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QVBoxLayout, QWidget

from hifusion_model.evaluation.figures import curve_figure
from hifusion_model.io_utils import atomic_path


class CurvePlot(QWidget):
    """Training loss, validation MSE and gene PCC per epoch of the run in progress."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.records: list[dict[str, Any]] = []
        self.figure = Figure(figsize=(4.0, 2.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def clear(self) -> None:
        self.records.clear()
        self.figure.clear()
        self.canvas.draw_idle()

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))
        curve_figure(self.records, self.figure)
        self.canvas.draw_idle()

    def save(self, path: str | Path, dpi: int = 150) -> Path:
        """The curve as an image file (PNG, PDF or SVG by the suffix), written atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.figure.savefig(tmp, dpi=dpi, format=path.suffix.lower().lstrip(".") or "png")
        return path
