"""The viewer's side of the fault matrix (issue 24): bad files and bad models through the GUI.

Every case is driven as a user would drive it (the reader through ``viewer.open``, the dock
widget's buttons through their handlers) and must end as one napari notification that names
the problem, with no exception escaping to Qt (pytest-qt fails a test on one), nothing added to
the viewer, every file that existed before unchanged, and the viewer still working afterwards.
``docs/reliability.md`` holds the same table in words.

A reader error escapes ``viewer.open`` (as itself, or as a ``ReaderPluginError`` around it);
File > Open hands it to napari's notification manager, which shows its text. :func:`gui_open` does the same, and checks that
the cause was one of our user errors, not a bug.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import synthetic_section, tiny_checkpoint
from test_bad_inputs import _Evil
from test_slide import PEAK_MB, uniform_png

from hifusion_model.data.sections import read_section, write_section
from hifusion_model.errors import HiFusionError
from napari_hifusion import _jobs
from napari_hifusion._widgets import HiFusionWidget

pytestmark = pytest.mark.gui
GENES = ["ERBB2", *[f"GENE{i}" for i in range(1, 8)]]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic slide and section, a tiny model, and the bad files of the rows."""
    folder = tmp_path_factory.mktemp("gui_faults")
    section = synthetic_section(folder, n_genes=len(GENES), pitch_um=160.0)
    tiny_checkpoint(folder / "model.pt", GENES)
    adata = read_section(section)

    def pointing_at(slide: Path, name: str) -> None:
        moved = adata.copy()
        moved.uns["hifusion"] = {**moved.uns["hifusion"], "slide": str(slide),
                                 "slide_abs": str(slide)}
        write_section(moved, folder / name)

    uniform_png(folder / "bomb.png", 40_000, 40_000, rows_present=1)
    pointing_at(folder / "bomb.png", "bomb-slide.h5ad")
    pointing_at(folder / "gone.ome.tif", "missing-slide.h5ad")
    (folder / "garbage.h5ad").write_bytes(b"not an HDF5 file at all")
    (folder / "empty.h5ad").write_bytes(b"")
    (folder / "garbage.ome.tif").write_bytes(b"II*\x00 no image here")
    data = (folder / "slide.ome.tif").read_bytes()
    (folder / "cut.ome.tif").write_bytes(data[: len(data) // 3])
    raw = torch.load(folder / "model.pt", weights_only=True)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(raw, folder / "nan.pt")
    torch.save({"weights": torch.zeros(2), "payload": _Evil(folder / "marker")}, folder / "evil.pt")
    (folder / "header-only.csv").write_text("id,x,y\n")
    return folder


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Error notifications shown by the plugin's panels."""
    shown: list[str] = []
    monkeypatch.setattr(_jobs, "show_error", shown.append)
    return shown


@pytest.fixture
def app(make_napari_viewer, base: Path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-hifusion", "HiFusion")
    assert isinstance(widget, HiFusionWidget)
    viewer.open(str(base / "section.h5ad"), plugin="napari-hifusion")
    return viewer, widget


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def gui_open(viewer, path: Path) -> list[str]:
    """Open ``path`` with our reader as File > Open does; the error notifications napari shows."""
    from napari.errors import ReaderPluginError
    from napari.utils.notifications import ErrorNotification, notification_manager

    shown: list = []
    notification_manager.notification_ready.connect(shown.append)
    try:
        viewer.open(str(path), plugin="napari-hifusion")
    except Exception as e:  # noqa: BLE001 (File > Open leaves it to napari's handler)
        cause = (e.__cause__ or getattr(e, "original_error", None)
                 if isinstance(e, ReaderPluginError) else e)
        assert isinstance(cause, HiFusionError), f"a bug, not a user error: {cause!r}"
        notification_manager.receive_error(type(e), e, e.__traceback__)
    finally:
        notification_manager.notification_ready.disconnect(shown.append)
    return [n.message for n in shown if isinstance(n, ErrorNotification)]


def assert_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message and "Traceback" not in message and "weights_only" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)


def still_works(qtbot, viewer, widget, base: Path, errors: list[str]) -> None:
    """The viewer opens a good section and predicts on it after the fault."""
    viewer.layers.clear()
    viewer.open(str(base / "section.h5ad"), plugin="napari-hifusion")
    widget.predict.spots_combo.value = widget.viewer.layers["synthetic measured"]
    widget.predict.set_model(base / "model.pt")
    widget.predict.device.setCurrentText("cpu")
    before = list(errors)
    assert widget.predict.predict() is not None
    qtbot.waitUntil(lambda: not widget.predict.jobs.running, timeout=TIMEOUT_MS)
    assert errors == before
    layer = viewer.layers["synthetic predicted"]
    assert np.isfinite(layer.features[GENES].to_numpy()).all()


# -- the reader ----------------------------------------------------------------------------------
READER_ROWS: list[tuple[str, str, tuple[str, ...]]] = [
    ("section-garbage", "garbage.h5ad", ("garbage.h5ad", "cannot read")),
    ("section-empty-file", "empty.h5ad", ("empty.h5ad",)),
    ("slide-garbage", "garbage.ome.tif", ("garbage.ome.tif", "cannot read")),
    ("slide-truncated", "cut.ome.tif", ("cut.ome.tif", "truncated or corrupt")),
    ("section-slide-missing", "missing-slide.h5ad", ("gone.ome.tif", "does not exist")),
    ("section-slide-is-a-bomb", "bomb-slide.h5ad",
     ("bomb.png is 40000 × 40000 px", "hifusion convert", "OME-TIFF")),
]


@pytest.mark.parametrize(("name", "needles"), [r[1:] for r in READER_ROWS],
                         ids=[r[0] for r in READER_ROWS])
def test_bad_files_in_the_reader_notify(app, qtbot, base, errors, name, needles) -> None:
    viewer, widget = app
    before, layers = digests(base), [layer.name for layer in viewer.layers]
    shown = gui_open(viewer, base / name)
    assert len(shown) == 1, shown
    assert_one_line(shown[0], *needles)
    assert [layer.name for layer in viewer.layers] == layers
    assert digests(base) == before
    still_works(qtbot, viewer, widget, base, errors)


def test_opening_a_bomb_in_the_viewer_costs_under_500_mb(base) -> None:
    """The target of issue 24, in a fresh viewer process: peak RSS (VmHWM) and the message."""
    script = PEAK_MB + f"""
import napari
from napari.errors import ReaderPluginError
viewer = napari.Viewer(show=False)
try:
    viewer.open({str(base / 'bomb-slide.h5ad')!r}, plugin="napari-hifusion")
except Exception as e:
    print("refused:", e.__cause__ if isinstance(e, ReaderPluginError) else e)
print("peak MB", peak_mb())
viewer.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: " in done.stdout and "40000 × 40000 px" in done.stdout
    assert float(done.stdout.split("peak MB")[1]) < 500


# -- the dock widget -----------------------------------------------------------------------------
PANEL_ROWS: list[tuple[str, str, tuple[str, ...]]] = [
    ("model-nan-weights", "nan.pt", ("nan.pt", "hold nan")),
    ("model-pickle-payload", "evil.pt", ("evil.pt", "not a safe")),
    ("model-missing", "none.pt", ("checkpoint not found",)),
]


@pytest.mark.parametrize(("name", "needles"), [r[1:] for r in PANEL_ROWS],
                         ids=[r[0] for r in PANEL_ROWS])
def test_bad_models_in_the_predict_panel_notify(app, qtbot, base, errors, name, needles) -> None:
    viewer, widget = app
    before, layers = digests(base), [layer.name for layer in viewer.layers]
    widget.predict.spots_combo.value = widget.viewer.layers["synthetic measured"]
    widget.predict.set_model(base / name)
    widget.predict.device.setCurrentText("cpu")
    if widget.predict.predict() is not None:  # checked in the job, off the GUI thread
        qtbot.waitUntil(lambda: not widget.predict.jobs.running, timeout=TIMEOUT_MS)
    assert len(errors) == 1, errors
    assert errors[0].startswith("Prediction: ")
    assert_one_line(errors[0], *needles)
    assert not (base / "marker").exists()  # the pickle payload never ran
    assert [layer.name for layer in viewer.layers] == layers
    assert digests(base) == before
    still_works(qtbot, viewer, widget, base, errors)


def test_a_header_only_csv_in_the_spots_panel_notifies(app, qtbot, base, errors) -> None:
    viewer, widget = app
    before, layers = digests(base), [layer.name for layer in viewer.layers]
    assert widget.spots.import_csv(base / "header-only.csv") is None
    assert len(errors) == 1 and errors[0].startswith("Import spots: ")
    assert_one_line(errors[0], "header-only.csv", "holds no spots")
    assert [layer.name for layer in viewer.layers] == layers
    assert digests(base) == before
    still_works(qtbot, viewer, widget, base, errors)


def test_the_pickle_payload_is_live(base) -> None:
    """Proof that the marker test above can fail: an unsafe load does run the payload."""
    marker = base / "marker"
    try:
        torch.load(base / "evil.pt", weights_only=False)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)



# -- the Train panel never writes over a file silently ---------------------------------------------
def test_training_asks_before_replacing_a_checkpoint(app, qtbot, base, tmp_path, errors,
                                                     monkeypatch) -> None:
    from qtpy.QtWidgets import QMessageBox

    from hifusion_model.models.checkpoint import load_checkpoint
    from napari_hifusion._widgets import _train

    _, widget = app
    panel = widget.train
    panel.architecture.setCurrentIndex(1)  # tiny, one epoch, 4 genes: seconds
    panel.epochs.setValue(1)
    panel.n_genes.setValue(4)
    panel.batch_size.setValue(16)
    out = tmp_path / "kept.pt"
    out.write_bytes(b"the user's earlier model")
    asked: list[str] = []
    infos: list[str] = []
    monkeypatch.setattr(_jobs, "show_info", infos.append)

    def answer(button):
        def question(parent, title, text, *args):
            asked.append(text)
            return button
        return question

    panel.out.setText(str(out))
    monkeypatch.setattr(_train.QMessageBox, "question", answer(QMessageBox.StandardButton.No))
    assert panel.train() is None and not panel.jobs.running
    assert asked == [f"kept.pt already exists in {tmp_path}. Training will replace it."]
    assert out.read_bytes() == b"the user's earlier model" and not errors
    assert infos == [f"Training not started: {out} is kept; choose another 'save to' file"]

    asked.clear()  # a companion file alone (a resume state) is asked about too
    lone = tmp_path / "fresh.pt"
    (tmp_path / "fresh.resume.pt").write_bytes(b"state")
    panel.out.setText(str(lone))
    assert panel.train() is None and asked == [
        f"fresh.resume.pt already exists in {tmp_path}. Training will replace it."]

    panel.encoders["spot"].setText(str(out))  # and never over one of its own inputs
    panel.out.setText(str(out))
    assert panel.train() is None and "one of the inputs" in errors[-1]
    panel.encoders["spot"].setText("")

    asked.clear()
    monkeypatch.setattr(_train.QMessageBox, "question", answer(QMessageBox.StandardButton.Yes))
    assert panel.train() is not None and len(asked) == 1
    qtbot.waitUntil(lambda: not panel.jobs.running, timeout=TIMEOUT_MS)
    assert load_checkpoint(out).config.n_genes == 4 and errors == [errors[0]]
