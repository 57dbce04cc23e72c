"""Pieces every panel uses: the shared model state, layer pickers, small form helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from psygnal import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .._layers import META

BUNDLED = "bundled"


class ModelState:
    """The active model, shared by the panels: ``'bundled'`` or a checkpoint path.

    Prediction and training change it; the Genes panel listens to show the model's genes and
    their validation PCC. The checkpoint is read lazily, once per source.
    """

    changed = Signal(object)

    def __init__(self) -> None:
        self.source: str = BUNDLED
        self._checkpoint: Any = None

    def set_source(self, source: str | Path, checkpoint: Any = None) -> None:
        self.source = str(source)
        self._checkpoint = checkpoint
        self.changed.emit(self)

    def set_checkpoint(self, checkpoint: Any) -> None:
        """Record a checkpoint loaded elsewhere (e.g. by a prediction) for the active source."""
        self._checkpoint = checkpoint
        self.changed.emit(self)

    @property
    def checkpoint(self) -> Any:
        """The active checkpoint once loaded (``None`` before the first prediction or training)."""
        return self._checkpoint

    def validation_pcc(self) -> dict[str, float]:
        """Validation PCC per gene from the model card (empty when the card has none)."""
        card = getattr(self._checkpoint, "card", None) or {}
        pccs = (card.get("validation") or {}).get("gene_pcc_all") or {}
        return {str(g): float(v) for g, v in pccs.items()}


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers that pass ``accept``, kept in sync with the layer list."""

    def __init__(self, viewer: Any, accept: Callable[[Any], bool], *, none_label: str | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.none_label = none_label
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.changed):
            event.connect(self.refresh)
        events.inserted.connect(self._watch_name)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = [layer.name for layer in self.viewer.layers if self.accept(layer)]
        if self.none_label is not None:
            names.insert(0, self.none_label)
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        elif names and self.none_label is None:  # default: the newest matching layer
            self.setCurrentIndex(len(names) - 1)
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any | None:
        name = self.currentText()
        if not name or name == self.none_label or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def select(self, layer: Any) -> None:
        self.refresh()
        self.setCurrentText(layer.name)


def group(title: str, *rows: tuple[str, QWidget] | QWidget) -> QGroupBox:
    """A titled form: ``(label, widget)`` pairs become labelled rows, bare widgets full-width rows."""
    box = QGroupBox(title)
    form = QFormLayout(box)
    for row in rows:
        if isinstance(row, tuple):
            form.addRow(*row)
        else:
            form.addRow(row)
    return box


def buttons(*widgets: QWidget) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        layout.addWidget(w)
    return row


def button(text: str, slot: Callable[[], Any], tooltip: str = "") -> QPushButton:
    b = QPushButton(text)
    b.setToolTip(tooltip)
    b.clicked.connect(lambda *_: slot())
    return b


def spin(value: float, lo: float, hi: float, *, step: float = 1.0, decimals: int = 0,
         suffix: str = "", tooltip: str = "") -> QSpinBox | QDoubleSpinBox:
    box: QSpinBox | QDoubleSpinBox = QSpinBox() if decimals == 0 else QDoubleSpinBox()
    cast = float if decimals else int
    if decimals:
        box.setDecimals(decimals)
    box.setRange(cast(lo), cast(hi))
    box.setSingleStep(cast(step))
    box.setValue(cast(value))
    if suffix:
        box.setSuffix(suffix)
    box.setToolTip(tooltip)
    return box


def hifusion_meta(layer: Any) -> dict:
    return layer.metadata.setdefault(META, {})
