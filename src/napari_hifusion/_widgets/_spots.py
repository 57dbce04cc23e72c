"""Panel 1, slide and spots: confirm the slide's µm/px, then place a spot grid or import spots.

The spots become an ordinary, editable napari points layer (add, move, delete spots); every
later step reads the spots from the layer as they are at that moment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QLabel,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from hifusion_model.errors import SlideError

from .._jobs import JobContext, JobRunner, guarded, show_info
from .._layers import SPOTS, is_slide_layer, meta, points_layer_data
from ._common import ModelState, button, buttons, group, layer_picker, spin

GRID_KINDS = {"hex (Visium-like)": "hex", "square (legacy ST)": "square"}


def slide_of(layer: Any) -> Any:
    """The :class:`~hifusion_model.data.slide.Slide` behind an image layer, at its confirmed µm/px."""
    from hifusion_model.data.slide import Slide

    info = meta(layer)
    mpp = info.get("mpp")
    slide = info.get("slide")
    if slide is not None and slide.mpp == mpp:
        return slide
    path = info.get("path") or getattr(layer.source, "path", None)
    if not path:
        raise SlideError(f"layer {layer.name!r} was not opened from a file; open the slide file "
                         "in napari (File > Open) so its pixels can be read again")
    slide = Slide.open(path, mpp=mpp)
    info["slide"] = slide
    return slide


def require_mpp(layer: Any) -> float:
    mpp = meta(layer).get("mpp")
    if not mpp:
        raise SlideError(f"layer {layer.name!r}: the slide's µm/px is unknown; enter it in "
                         "'Slide and spots' and press Apply")
    return float(mpp)


def polygon_px(shapes: Any, image: Any) -> np.ndarray:
    """The first polygon of ``shapes`` as ``(x, y)`` full-resolution pixels of ``image``."""
    polygons = [d for d, t in zip(shapes.data, shapes.shape_type) if t in ("polygon", "rectangle")]
    if not polygons:
        raise SlideError(f"layer {shapes.name!r} holds no polygon or rectangle; draw one around "
                         "the tissue to keep the spots inside it")
    world = np.asarray([shapes.data_to_world(v) for v in polygons[0]])[:, -2:]
    pixels = np.asarray([image.world_to_data(v) for v in world])[:, -2:]
    return pixels[:, ::-1]


class SpotsPanel(QWidget):
    """Pick the slide layer, confirm µm/px, make spots (grid or CSV)."""

    def __init__(self, viewer: Any, state: ModelState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.jobs = JobRunner("Spot grid")
        self.image_combo = layer_picker(viewer, is_slide_layer)
        self.mpp = spin(0.5, 0.01, 100.0, step=0.01, decimals=4, suffix=" µm/px",
                        tooltip="micrometres per full-resolution pixel; read from the file when known")
        self.mpp_note = QLabel()
        self.kind = QComboBox()
        self.kind.addItems(list(GRID_KINDS))
        self.pitch = spin(100.0, 5.0, 5000.0, step=5.0, decimals=1, suffix=" µm",
                          tooltip="centre-to-centre distance of neighbouring spots")
        self.diameter = spin(55.0, 2.0, 5000.0, step=5.0, decimals=1, suffix=" µm")
        self.tissue_only = QCheckBox("only on tissue")
        self.tissue_only.setChecked(True)
        self.shapes_combo = layer_picker(viewer, lambda l: type(l).__name__ == "Shapes",
                                       none_label="(whole slide)")
        self.status = QLabel()
        self.status.setWordWrap(True)

        self.image_combo.changed.connect(self._show_mpp)
        self.kind.currentTextChanged.connect(self._grid_defaults)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(group(
            "Slide",
            ("image", self.image_combo),
            ("scale", buttons(self.mpp, button("Apply", self.apply_mpp, "use this µm/px"))),
            self.mpp_note,
        ))
        layout.addWidget(group(
            "Spots",
            ("grid", self.kind),
            ("pitch", self.pitch),
            ("spot diameter", self.diameter),
            ("inside", self.shapes_combo),
            self.tissue_only,
            buttons(button("Generate grid", self.generate_grid),
                    button("Import CSV…", self._import_csv_dialog,
                           "spot centres: columns x,y (px) or x_um,y_um, optional id")),
            self.status,
        ))
        self._show_mpp()

    # -- µm/px -----------------------------------------------------------------------------------
    def _show_mpp(self, *_: Any) -> None:
        layer = self.image_combo.value
        mpp = meta(layer).get("mpp") if layer is not None else None
        if mpp:
            self.mpp.setValue(mpp)
            self.mpp_note.setText("")
        else:
            self.mpp_note.setText("µm/px unknown: enter it and press Apply" if layer else
                                  "open a slide (File > Open) to start")

    @guarded("Slide scale")
    def apply_mpp(self, mpp: float | None = None) -> None:
        """Set the slide's µm/px: the layer is rescaled to µm so everything lines up."""
        layer = self._image()
        mpp = float(self.mpp.value() if mpp is None else mpp)
        if not mpp > 0:
            raise SlideError(f"µm/px must be positive, got {mpp}")
        self.mpp.setValue(mpp)
        info = meta(layer)
        info["mpp"] = mpp
        layer.scale = (mpp, mpp)
        layer.units = ("um", "um")
        self.mpp_note.setText("")
        self.viewer.reset_view()

    def _image(self) -> Any:
        layer = self.image_combo.value
        if layer is None:
            raise SlideError("no slide layer: open a slide or section (File > Open) first")
        return layer

    def _grid_defaults(self, text: str) -> None:
        from hifusion_model.data.grids import GRID_DEFAULTS

        pitch, diameter = GRID_DEFAULTS[GRID_KINDS[text]]
        self.pitch.setValue(pitch)
        self.diameter.setValue(diameter)

    # -- spots -----------------------------------------------------------------------------------
    @guarded("Spot grid")
    def generate_grid(self) -> Any:
        """Place a grid over the slide (in a worker: the tissue mask reads a thumbnail)."""
        from hifusion_model.data.grids import spot_grid, tissue_mask

        image = self._image()
        mpp = require_mpp(image)
        slide = slide_of(image)
        shapes = self.shapes_combo.value
        polygon = polygon_px(shapes, image) if shapes is not None else None
        kind, pitch, diameter = GRID_KINDS[self.kind.currentText()], self.pitch.value(), self.diameter.value()
        tissue = self.tissue_only.isChecked()

        def job(ctx: JobContext) -> Any:
            ctx.progress(0, 2, "finding tissue" if tissue else "placing spots")
            mask, downsample = tissue_mask(slide) if tissue else (None, 1.0)
            ctx.progress(1, 2, "placing spots")
            xy, rows, cols = spot_grid(slide.shape, mpp, kind, pitch, diameter, mask=mask,
                                       mask_downsample=downsample, polygon=polygon,
                                       return_indices=True)
            ctx.progress(2, 2, f"{len(xy)} spots")
            return xy, rows, cols

        def done(result: Any) -> None:
            from hifusion_model.data.grids import grid_source, large_grid_warning
            from hifusion_model.data.sections import new_section

            xy, rows, cols = result
            warning = large_grid_warning(len(xy))
            if warning and not self.confirm(f"{warning[0].upper()}{warning[1:]}. Place them?"):
                show_info(f"no grid placed: {len(xy):,} spots declined")
                return
            section = new_section(xy, slide=slide.path, mpp=mpp, spot_diameter_um=diameter,
                                  name=Path(slide.path).stem, source=grid_source(kind),
                                  array_row=rows, array_col=cols)
            self._add_spots(section, f"{image.name} spots")

        return self.jobs.start(job, done)

    def confirm(self, question: str) -> bool:
        """Ask the user (a test answers through a monkeypatch)."""
        answer = QMessageBox.question(self, "Large grid", question,
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _import_csv_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Spot centres", "", "CSV (*.csv *.tsv *.txt)")
        if path:
            self.import_csv(path)

    @guarded("Import spots")
    def import_csv(self, path: str | Path) -> Any:
        """Import spot centres from a CSV (see :func:`hifusion_model.data.importers.import_csv`)."""
        from hifusion_model.data.importers import import_csv

        image = self._image()
        slide = slide_of(image)
        section = import_csv(path, slide.path, mpp=require_mpp(image),
                             spot_diameter_um=self.diameter.value())
        return self._add_spots(section, f"{Path(path).stem} spots")

    def _add_spots(self, section: Any, name: str) -> Any:
        data, kwargs, _ = points_layer_data(section, name=name, layer_kind=SPOTS)
        kwargs["border_color"] = "yellow"
        layer = self.viewer.add_points(data, **kwargs)
        self.status.setText(f"{len(data)} spots in {layer.name!r}; edit them with the layer "
                            "controls (add, select and move, delete)")
        return layer
