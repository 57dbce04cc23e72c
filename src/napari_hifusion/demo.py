"""The demo: the HER2ST C4 sample, the bundled model's predictions and the measurement, side by side.

It drives the dock widget exactly as a user would (open sample, Predict, pick ERBB2, side by
side), so it doubles as an end-to-end check of the plugin; ``screenshot`` saves the window and
quits instead of handing the viewer to the user.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (before any QApplication exists: the reverse can crash)

from hifusion_model.errors import CheckpointError

from . import _sample_data
from ._layers import TRUTH, kind

DEMO_GENE = "ERBB2"


def check_demo_inputs(model: str) -> None:
    """Fail before opening any window when the sample or the model is missing."""
    from hifusion_model.models.checkpoint import resolve_checkpoint_path

    _sample_data.sample_section_path()
    path = resolve_checkpoint_path(model)
    if not path.is_file():
        raise CheckpointError(f"model {path} not found; give --model PATH.pt or reinstall "
                              "napari-hifusion to get the bundled model")


def build_demo(model: str = "bundled", gene: str = DEMO_GENE, device: str = "auto",
               batch_size: int = 32, show: bool = True) -> tuple[Any, Any, Any]:
    """Open the viewer with the sample and start the prediction; returns (viewer, widget, worker)."""
    import napari

    from ._widgets import HiFusionWidget

    viewer = napari.Viewer(title="napari-hifusion demo", show=show)
    viewer.window.resize(1800, 1000)
    widget = HiFusionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HiFusion", area="right")
    viewer.open_sample("napari-hifusion", "her2st_c4")
    truth = next(l for l in viewer.layers if kind(l) == TRUTH)
    widget.predict.spots_combo.value = truth
    widget.predict.set_model(model)
    widget.predict.device.setCurrentText(device)
    widget.predict.batch_size.setValue(batch_size)
    worker = widget.predict.predict()

    def finish() -> None:
        widget.genes.set_gene(gene)
        widget.genes.set_side_by_side(True)
        viewer.text_overlay.text = f"{gene}: predicted (left), measured (right)"
        viewer.text_overlay.font_size = 14
        viewer.text_overlay.visible = True
        predicted = getattr(widget.predict, "last_layer", None)
        if predicted is not None:
            viewer.layers.selection.active = predicted

    if worker is not None:
        worker.finished.connect(finish)
    return viewer, widget, worker


def main(screenshot: str | Path | None = None, model: str = "bundled", gene: str = DEMO_GENE,
         device: str = "auto", batch_size: int = 32) -> int:
    """Run the demo; with ``screenshot``, save the window there once the prediction is shown."""
    import napari
    from qtpy.QtCore import QTimer

    check_demo_inputs(model)
    viewer, widget, worker = build_demo(model, gene, device, batch_size)
    if screenshot is None:
        napari.run()
        return 0
    outcome = {"code": 1}

    def save() -> None:
        if getattr(widget.predict, "last_layer", None) is None:
            print("hifusion demo: error: the prediction failed (see the message above)",
                  file=sys.stderr)
        else:
            path = Path(screenshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(path), canvas_only=False, flash=False)
            print(f"saved {path}")
            outcome["code"] = 0
        viewer.close()

    if worker is None:
        viewer.close()
        return 1
    worker.finished.connect(lambda: QTimer.singleShot(1500, save))
    napari.run()
    return outcome["code"]
