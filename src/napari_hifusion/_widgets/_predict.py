"""Panel 2, predict: run a model on the spots of a points layer, in a worker, with Cancel.

The result is one points layer per spots layer (re-running replaces it) whose ``features`` hold
every predicted gene; a measured layer for the same spots is re-normalised over the model's
genes so both are on the same scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from qtpy.QtWidgets import QComboBox, QFileDialog, QLabel, QLineEdit, QVBoxLayout, QWidget

from hifusion_model.errors import CheckpointError, SectionError

from .._jobs import JobContext, JobRunner, guarded
from .._layers import (
    META,
    PREDICTION,
    SPOT_ID,
    TRUTH,
    is_spots_layer,
    kind,
    meta,
    points_layer_data,
    truth_features,
)
from ._common import BUNDLED, ModelState, button, buttons, group, layer_picker, spin

DEVICES = ("auto", "cpu", "cuda")


def _predictable(layer: Any) -> bool:
    return is_spots_layer(layer) and kind(layer) != PREDICTION


class PredictPanel(QWidget):
    """Choose spots, model, device and batch size; predict off the GUI thread."""

    def __init__(self, viewer: Any, state: ModelState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.jobs = JobRunner("Prediction", on_progress=self._show_progress)
        self.spots_combo = layer_picker(viewer, _predictable)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("bundled HER2ST model")
        self.model_path.setToolTip("empty: the bundled model; else a checkpoint from training")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.batch_size = spin(32, 1, 1024, tooltip="spots per forward pass; lower it if memory runs out")
        self.tta = spin(1, 1, 8, tooltip="average this many flipped and rotated views of each spot "
                                         "(steadier predictions, proportionally slower)")
        self.cancel_button = button("Cancel", self.cancel)
        self.cancel_button.setEnabled(False)
        state.changed.connect(self._show_model)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(group(
            "Predict",
            ("spots", self.spots_combo),
            ("model", buttons(self.model_path, button("…", self._browse, "choose a checkpoint"),
                              button("Bundled", lambda: self.set_model(BUNDLED)))),
            ("device", self.device),
            ("batch size", self.batch_size),
            ("test-time views", self.tta),
            buttons(button("Predict", self.predict), self.cancel_button),
            self.status,
        ))

    # -- model -----------------------------------------------------------------------------------
    def model_source(self) -> str:
        text = self.model_path.text().strip()
        return text or BUNDLED

    def set_model(self, source: str | Path) -> None:
        self.model_path.setText("" if str(source) == BUNDLED else str(source))

    def _show_model(self, state: ModelState) -> None:
        if state.source != self.model_source():
            self.set_model(state.source)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "HiFusion checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.set_model(path)

    # -- running ---------------------------------------------------------------------------------
    @guarded("Prediction")
    def predict(self) -> Any:
        """Predict every gene at the spots of the chosen layer; returns the worker."""
        from hifusion_model.devices import resolve_device

        from .._layers import section_from_points

        spots = self.spots_combo.value
        if spots is None:
            raise SectionError("no spots to predict at: generate a grid, import spots or open a "
                               "section first")
        if len(spots.data) == 0:
            raise SectionError(f"layer {spots.name!r} has no spots left; add some first")
        source = self.model_source()
        if source != BUNDLED and not Path(source).is_file():
            raise CheckpointError(f"checkpoint not found: {source}; choose a .pt file from training")
        device = resolve_device(self.device.currentText())
        batch_size = int(self.batch_size.value())
        tta = int(self.tta.value())
        section = section_from_points(spots)

        def job(ctx: JobContext) -> Any:
            from hifusion_model.api import predict
            from hifusion_model.models.checkpoint import load_model

            ctx.progress(0, len(section), "loading model")
            model, ckpt = load_model(source, device=device)
            pred = predict(section, model=(model, ckpt), device=device, batch_size=batch_size,
                           tta=tta, progress=ctx.progress, should_stop=ctx.should_stop)
            return section, pred, ckpt

        self.cancel_button.setEnabled(True)
        self.status.setText(f"predicting {len(section)} spots on {device}…")
        return self.jobs.start(job, lambda result: self._show(spots, source, tta, *result),
                               on_finished=lambda: self.cancel_button.setEnabled(False))

    def cancel(self) -> None:
        self.jobs.cancel()
        self.status.setText("cancelling…")

    def _show_progress(self, done: int, total: int, message: str) -> None:
        self.status.setText(f"{message} ({done}/{total})" if total else message)

    def _show(self, spots: Any, source: str, tta: int, section: Any, pred: Any,
              ckpt: Any) -> None:
        """GUI thread: add (or replace) the prediction layer and align the measured layer.

        The per-spot uncertainty (when the model has a noise model) rides in the layer's
        metadata as a table by spot id, for the Genes panel to colour by."""
        genes = list(ckpt.config.genes)
        ids = np.asarray(section.obs_names, dtype=object)
        features = pd.concat([
            pd.DataFrame({SPOT_ID: ids}),
            pd.DataFrame(np.asarray(pred.X, dtype=np.float32), columns=genes),
        ], axis=1)
        uncertainty = (pd.DataFrame(pred.layers["uncertainty"], index=pd.Index(ids),
                                    columns=genes) if "uncertainty" in pred.layers else None)
        base = spots.name.removesuffix(" measured").removesuffix(" spots")
        name = f"{base} predicted"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        data, kwargs, _ = points_layer_data(
            section, name=name, layer_kind=PREDICTION, features=features,
            extra_meta={"model": source, "predictions": pred, "spots_layer": spots.name,
                        "normalization": ckpt.config.normalization, "test_time_views": tta,
                        "uncertainty": uncertainty},
        )
        layer = self.viewer.add_points(data, **kwargs)
        if kind(spots) == TRUTH:
            self._align_truth(spots, genes, ckpt.config.normalization)
        self.state.set_source(source, ckpt)
        self.status.setText(f"{len(section)} spots × {len(genes)} genes in {layer.name!r}")
        self.last_layer = layer

    @staticmethod
    def _align_truth(truth: Any, genes: list[str], normalization: str) -> None:
        """Re-normalise measured expression over the model's genes, when the section has them all."""
        section = meta(truth).get("section")
        if section is None or not set(genes) <= set(section.var_names):
            return
        truth.features = truth_features(truth, genes, normalization)
        meta(truth)["normalization"] = normalization
        truth.metadata[META]["genes_from_model"] = True
