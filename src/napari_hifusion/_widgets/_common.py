"""Pieces every panel uses: the shared model state, layer pickers, small form helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Widget
from psygnal import Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

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

    @property
    def checkpoint(self) -> Any:
        """The active checkpoint once loaded (``None`` before the first prediction or training)."""
        return self._checkpoint

    def validation_pcc(self) -> dict[str, float]:
        """Validation PCC per gene from the model card (empty when the card has none)."""
        card = getattr(self._checkpoint, "card", None) or {}
        pccs = (card.get("validation") or {}).get("gene_pcc_all") or {}
        return {str(g): float(v) for g, v in pccs.items()}


def layer_picker(viewer: Any, accept: Callable[[Any], bool], *,
                 none_label: str | None = None) -> ComboBox:
    """A magicgui combo box of the viewer's layers that pass ``accept``, newest first.

    Its ``value`` is the layer itself (``None`` for ``none_label``, the "no layer" choice); it
    follows the layer list, renames included, and keeps its choice while that layer exists.
    """
    def choices(_: Any) -> list[tuple[str, Any]]:
        layers = [(layer.name, layer) for layer in reversed(viewer.layers) if accept(layer)]
        return [(none_label, None), *layers] if none_label is not None else layers

    picker = ComboBox(choices=choices)

    def refresh(*_: Any) -> None:
        picker.reset_choices()

    def watch(layer: Any) -> None:
        layer.events.name.connect(refresh)

    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.moved, events.changed):
        event.connect(refresh)
    events.inserted.connect(lambda event: watch(event.value))
    for layer in viewer.layers:
        watch(layer)
    return picker


def group(title: str, *rows: tuple[str, QWidget | Widget] | QWidget | Widget) -> QGroupBox:
    """A titled form: ``(label, widget)`` pairs become labelled rows, bare widgets full-width rows
    (Qt widgets or magicgui ones)."""
    box = QGroupBox(title)
    form = QFormLayout(box)
    for row in rows:
        if isinstance(row, tuple):
            label, widget = row
            form.addRow(label, _qt(widget))
        else:
            form.addRow(_qt(row))
    return box


def _qt(widget: QWidget | Widget) -> QWidget:
    return widget.native if isinstance(widget, Widget) else widget


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
