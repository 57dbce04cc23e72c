"""The HiFusion panel as a user opens it, for the GUI tests (imported only by them)."""

from __future__ import annotations

from pathlib import Path

from napari_hifusion._widgets import HiFusionWidget

TIMEOUT_MS = 60_000


def dock(viewer) -> HiFusionWidget:
    """The panel from the plugin's manifest (Plugins menu), so the manifest is exercised."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-hifusion", "HiFusion")
    assert isinstance(widget, HiFusionWidget)
    return widget


def open_in_panel(viewer, path: Path):
    """The panel docked, then ``path`` opened with this plugin's reader: ``(viewer, widget)``."""
    widget = dock(viewer)
    viewer.open(str(path), plugin="napari-hifusion")
    return viewer, widget


def wait_done(qtbot, runner) -> None:
    qtbot.waitUntil(lambda: not runner.running, timeout=TIMEOUT_MS)
