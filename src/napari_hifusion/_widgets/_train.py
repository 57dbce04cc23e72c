"""Panel 4, train: fit a model on the measured sections open in the viewer, with a live curve.

Training sections are the measured points layers (spots as they are now, with their counts) on
their slides. Validation is either a spatially blocked split of the training spots or one open
section held out, or none: every spot (and any pseudo-labelled one) then trains for all epochs
and the last is kept (half the time of a refit). The best epoch is saved and becomes the active
model; with "refit" ticked the model is then retrained on every spot up to that epoch (twice the
time, more data). The spot and region encoders start from random weights, or from files written
by ``hifusion pretrain``. The curve is the core's (``hifusion plot MODEL.curves.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from hifusion_model.engine.recipes import get_recipe
from hifusion_model.errors import CheckpointError, ConfigError, SectionError
from hifusion_model.models.config import ENCODERS
from hifusion_model.models.registry import available_models, model_config

from .. import _jobs
from .._jobs import JobContext, JobRunner, guarded
from .._layers import TRUTH, kind, section_from_points
from ._common import ModelState, button, buttons, group, spin
from ._plot import CurvePlot

SPATIAL_SPLIT = f"spatial blocks of the training spots ({get_recipe().val_fraction:.0%})"
NO_VALIDATION = "none: train every spot for all epochs"


def _measured(layer: Any) -> bool:
    return type(layer).__name__ == "Points" and kind(layer) == TRUTH


class TrainPanel(QWidget):
    """Pick sections, epochs, learning rate, validation; train in a worker; show the curve."""

    def __init__(self, viewer: Any, state: ModelState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.result: Any = None
        self.jobs = JobRunner("Training", on_progress=self._show_progress, on_event=self._epoch)
        self.sections = QListWidget()
        self.sections.setMaximumHeight(90)
        self.validation = QComboBox()
        self.architecture = QComboBox()
        for i, (name, description) in enumerate(available_models().items()):
            self.architecture.addItem(name)
            self.architecture.setItemData(i, description, Qt.ToolTipRole)
        default = get_recipe()
        self.epochs = spin(default.epochs, 1, 1000)
        self.lr = spin(default.lr, default.min_lr, 1.0, step=1e-4, decimals=6,
                       tooltip="peak learning rate (AdamW)")
        self.n_genes = spin(default.n_genes, 1, 5000,
                            tooltip="predict this many most expressed genes")
        self.batch_size = spin(default.batch_size, 2, 1024)
        self.refit = QCheckBox("retrain on every spot to the chosen epoch")
        self.refit.setChecked(default.refit)
        self.refit.setToolTip("after validation chooses the epoch, train again on all spots "
                              "(validation spots included) and save that model")
        self.encoders = {name: self._weights_field(name) for name in ENCODERS}
        self.pseudo = QLineEdit()
        self.pseudo.setPlaceholderText("none")
        self.pseudo.setToolTip("spots between the measured ones, labelled by trained models "
                               "(`hifusion pseudolabel`); choose validation 'none' with them")
        self.out = QLineEdit(str(Path.home() / "hifusion_model.pt"))
        self.table = QLabel("no run yet")
        self.table.setTextFormat(Qt.RichText)
        self.curve = CurvePlot()
        self.curve_button = button("Save curve…", self._save_curve_dialog,
                                   "the training curve as an image (PNG, PDF or SVG)")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.cancel_button = button("Cancel", self.cancel)
        self.cancel_button.setEnabled(False)
        events = viewer.layers.events
        for event in (events.inserted, events.removed):
            event.connect(lambda *_: self.refresh_sections())

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(group(
            "Train",
            ("sections", self.sections),
            ("validation", self.validation),
            ("architecture", self.architecture),
            ("epochs", self.epochs),
            ("learning rate", self.lr),
            ("genes", self.n_genes),
            ("batch size", self.batch_size),
            ("refit", self.refit),
            *((f"{name} encoder", buttons(field, button("…", lambda *_, n=name:
                                                         self._browse_encoder(n))))
              for name, field in self.encoders.items()),
            ("pseudo-labels", buttons(self.pseudo, button("…", self._browse_pseudo))),
            ("save to", buttons(self.out, button("…", self._browse))),
            buttons(button("Train", self.train), self.cancel_button),
            self.curve, self.curve_button, self.table, self.status,
        ))
        self.refresh_sections()

    # -- choices ---------------------------------------------------------------------------------
    def refresh_sections(self) -> None:
        checked = set(self.checked_names())
        names = [l.name for l in self.viewer.layers if _measured(l)]
        self.sections.clear()
        for name in names:
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if name in checked or not checked else Qt.Unchecked)
            self.sections.addItem(item)
        current = self.validation.currentText()
        self.validation.clear()
        self.validation.addItems([SPATIAL_SPLIT, NO_VALIDATION, *names])
        if current in names:
            self.validation.setCurrentText(current)

    def checked_names(self) -> list[str]:
        items = (self.sections.item(i) for i in range(self.sections.count()))
        return [item.text() for item in items if item.checkState() == Qt.Checked]

    def _save_curve_dialog(self) -> None:
        start = str(Path(self.out.text()).with_suffix(".curves.png"))
        path, _ = QFileDialog.getSaveFileName(self, "Save curve", start,
                                              "Images (*.png *.pdf *.svg)")
        if path:
            self.save_curve(path)

    @guarded("Curve")
    def save_curve(self, path: str) -> Path:
        """Write the curve of the run in progress (or the last one) to ``path``."""
        if not self.curve.records:
            raise ConfigError("no training curve yet: train first")
        if Path(path).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ConfigError(f"{path}: the curve must end in .png, .pdf or .svg")
        return self.curve.save(path)

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", self.out.text(),
                                              "Checkpoints (*.pt)")
        if path:
            self.out.setText(path)

    @staticmethod
    def _weights_field(name: str) -> QLineEdit:
        field = QLineEdit()
        field.setPlaceholderText("random weights")
        flag = "" if name == "spot" else f" --encoder {name}"
        field.setToolTip(f"start the {name} encoder from these weights, e.g. from `hifusion "
                         f"pretrain{flag}` (self-supervised on the slides' tissue)")
        return field

    def _browse_encoder(self, name: str) -> None:
        field = self.encoders[name]
        path, _ = QFileDialog.getOpenFileName(self, f"{name.capitalize()} encoder weights",
                                              field.text(), "Weights (*.pt *.pth)")
        if path:
            field.setText(path)

    def _browse_pseudo(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Pseudo-labels", self.pseudo.text(),
                                              "Pseudo-labels (*.h5ad)")
        if path:
            self.pseudo.setText(path)

    def pseudo_labels(self) -> list[Path]:
        """The chosen pseudo-label file (``train``'s ``pseudo_labels``), or none."""
        if not (text := self.pseudo.text().strip()):
            return []
        path = Path(text).expanduser()
        if not path.is_file():
            raise SectionError(f"pseudo-labels {path} not found; choose the file `hifusion "
                               "pseudolabel --out` wrote, or clear the field")
        return [path]

    def encoder_weights(self) -> dict[str, Path]:
        """The chosen weights of each encoder (``train``'s ``*_encoder_init``); none: random."""
        chosen = {}
        for name, field in self.encoders.items():
            if not (text := field.text().strip()):
                continue
            path = Path(text).expanduser()
            if not path.is_file():
                raise CheckpointError(f"{name} encoder weights {path} not found; choose the file "
                                      "`hifusion pretrain --out` wrote, or clear the field")
            chosen[f"{name}_encoder_init"] = path
        return chosen

    # -- running ---------------------------------------------------------------------------------
    @guarded("Training")
    def train(self) -> Any:
        """Train on the checked sections; returns the worker."""
        from hifusion_model.engine.train import train

        held_out = self.validation.currentText()
        names = [n for n in self.checked_names() if n != held_out]
        if not names:
            raise SectionError("no training section: open a section with counts and tick it "
                               "(the held-out validation section does not count)")
        sections = [section_from_points(self.viewer.layers[n], counts=True) for n in names]
        val = (None if held_out in (SPATIAL_SPLIT, NO_VALIDATION)
               else [section_from_points(self.viewer.layers[held_out], counts=True)])
        out = Path(self.out.text().strip()).expanduser()
        if out.suffix != ".pt" or out.is_dir():
            raise ConfigError(f"save to {out}: give a file name ending in .pt")
        recipe = get_recipe(epochs=int(self.epochs.value()), lr=float(self.lr.value()),
                            batch_size=int(self.batch_size.value()), refit=self.refit.isChecked(),
                            n_genes=int(self.n_genes.value()),
                            val_fraction=0.0 if held_out == NO_VALIDATION else None)
        template = model_config(self.architecture.currentText(), ["placeholder"])
        encoders = self.encoder_weights()
        pseudo = self.pseudo_labels()
        if not self.may_write(out, [*encoders.values(), *pseudo]):
            _jobs.show_info(f"Training not started: {out} is kept; choose another 'save to' file")
            return None

        def job(ctx: JobContext) -> Any:
            from hifusion_model.models.checkpoint import load_checkpoint

            result = train(sections, out, recipe=recipe, model_config=template,
                           val_sections=val, pseudo_labels=pseudo, **encoders, device="auto",
                           command=["napari-hifusion", "Train panel"],
                           progress=ctx.progress, should_stop=ctx.should_stop, on_epoch=ctx.emit)
            return result, load_checkpoint(result.checkpoint)

        self.curve.clear()
        self.table.setText("starting…")
        self.cancel_button.setEnabled(True)
        return self.jobs.start(job, self._done,
                               on_finished=lambda: self.cancel_button.setEnabled(False))

    def may_write(self, out: Path, inputs: list[Any]) -> bool:
        """Whether training may write ``out`` and its companion files: never over one of its
        inputs, and over existing files only when the user says so (never silently)."""
        from hifusion_model.engine.state import companion_paths
        from hifusion_model.io_utils import check_output

        companions = list(companion_paths(out).values())
        check_output(out, [p for p in inputs if p], overwrite=True, flag="'save to' file",
                     companions=companions)
        existing = [p.name for p in (out, *companions) if p.exists() or p.is_symlink()]
        if not existing:
            return True
        answer = QMessageBox.question(
            self, "Replace the model?",
            f"{', '.join(existing)} already {'exists' if len(existing) == 1 else 'exist'} in "
            f"{out.parent}. Training will replace {'it' if len(existing) == 1 else 'them'}.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def cancel(self) -> None:
        self.jobs.cancel()
        self.status.setText("cancelling after this batch; the best model so far is kept")

    def _show_progress(self, done: int, total: int, message: str) -> None:
        self.status.setText(message)

    @property
    def records(self) -> list[dict]:
        """The epochs of the run in progress (or the last run), as ``on_epoch`` sent them."""
        return self.curve.records

    def _epoch(self, record: dict) -> None:
        self.curve.add(record)
        rows = "".join(_table_row(r) for r in self.records[-6:])
        self.table.setText("<table cellspacing=4><tr><th>epoch</th><th>loss</th><th>val MSE</th>"
                           f"<th>val PCC</th><th></th></tr>{rows}</table>")

    def _done(self, outcome: tuple[Any, Any]) -> None:
        result, checkpoint = outcome
        self.result = result
        self.state.set_source(result.checkpoint, checkpoint)
        self.status.setText(f"saved {result.checkpoint} ({_how(result, checkpoint.card)}); "
                            "it is now the active model")


def _how(result: Any, card: dict[str, Any]) -> str:
    """Which epoch was kept, and why."""
    if not result.validation:
        return f"epoch {result.best_epoch}, every spot trained, no validation"
    how = "refit on every spot to epoch" if "refit" in card else "best epoch"
    return f"{how} {result.best_epoch}, val gene PCC {result.validation['gene_pcc']:+.3f}"


def _table_row(r: dict[str, Any]) -> str:
    """One epoch of the live table; when every spot trains (a refit) there is no validation."""
    if r.get("refit"):
        val = ("refit", "–")
    elif r.get("val_mse") is None:
        val = ("–", "–")
    else:
        val = (f"{r['val_mse']:.4f}", f"{r['val_gene_pcc']:+.3f}")
    return (f"<tr><td>{r['epoch']}</td><td>{r['train_loss']:.4f}</td><td>{val[0]}</td>"
            f"<td>{val[1]}</td><td>{'★' if r.get('best') else ''}</td></tr>")
