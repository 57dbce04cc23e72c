"""Shared fixtures. torch is imported first: importing it after a QApplication exists can crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests use tiny models: one thread is fastest, and OpenMP spinning on a busy 2-core machine
# made two threads ~100x slower than one (measured: 8.8 s vs 0.04 s for one training step).
torch.set_num_threads(1)

HER2ST_DIR = Path(
    os.environ.get("HIFUSION_HER2ST", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st")
).resolve()


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The real HER2ST folder (``../shared/data/her2st`` or ``$HIFUSION_HER2ST``)."""
    if not (HER2ST_DIR / "counts").is_dir():
        pytest.skip(f"real HER2ST data not found at {HER2ST_DIR} (set HIFUSION_HER2ST)")
    return HER2ST_DIR


def pytest_collection_modifyitems(config, items):
    """GUI tests need a display (CI runs them under xvfb-run); skip them clearly without one."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    skip = pytest.mark.skip(reason="no display: run the GUI tests under `xvfb-run -a pytest`")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
