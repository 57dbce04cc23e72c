"""A tiny live curve (training loss and validation error per epoch), drawn with QPainter.

Plotting libraries are heavy optional dependencies for two short lines; this needs nothing.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

SERIES_COLORS = {"train_loss": "#4c9be8", "val_mse": "#f28e2b"}


class Sparkline(QWidget):
    """Several series over epochs, each scaled to its own range (their units differ)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.series: dict[str, list[float]] = {name: [] for name in SERIES_COLORS}
        self.setMinimumHeight(70)

    def clear(self) -> None:
        for values in self.series.values():
            values.clear()
        self.update()

    def add(self, record: dict[str, Any]) -> None:
        for name, values in self.series.items():
            if record.get(name) is not None:
                values.append(float(record[name]))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        area = self.rect().adjusted(4, 14, -4, -4)
        painter.setPen(self.palette().mid().color())
        painter.drawRect(area)
        x = 6
        for name, values in self.series.items():
            color = QColor(SERIES_COLORS[name])
            painter.setPen(QPen(color, 2))
            painter.drawText(x, 11, name.replace("_", " "))
            x += 90
            if len(values) >= 2:
                painter.drawPolyline(self._polygon(values, area))
            elif values:
                painter.drawEllipse(QPointF(area.left() + 2, area.center().y()), 2, 2)
        painter.end()

    @staticmethod
    def _polygon(values: list[float], area: Any) -> QPolygonF:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        step = area.width() / (len(values) - 1)
        return QPolygonF([
            QPointF(area.left() + i * step, area.bottom() - (v - lo) / span * area.height())
            for i, v in enumerate(values)
        ])

