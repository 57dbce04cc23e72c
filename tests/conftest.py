"""Shared fixtures. torch is imported first: importing it after a QApplication exists can crash.

Every engine test runs on the synthetic data of ``synthetic.py`` (a generated slide, a section with
counts, a tiny checkpoint, a 40-spot ST crop); the tests that need real tissue take ``her2st_dir``,
are marked ``her2st`` and skip where ``../shared/data/her2st`` is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from synthetic import spot_array_section, synthetic_section, tiny_checkpoint

# Tests use tiny models: one thread is fastest, and OpenMP spinning on a busy 2-core machine
# made two threads ~100x slower than one (measured: 8.8 s vs 0.04 s for one training step).
torch.set_num_threads(1)
# The same model path on every CPU kind: where the CPU lacks native bf16, prediction would
# otherwise go through ONNX Runtime (and export each tiny model first). test_fast_cpu.py
# exercises that path on purpose.
os.environ.setdefault("HIFUSION_CPU_PATH", "eager")

HER2ST_DIR = Path(
    os.environ.get("HIFUSION_HER2ST", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st")
).resolve()


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The real HER2ST folder (``../shared/data/her2st`` or ``$HIFUSION_HER2ST``)."""
    if not (HER2ST_DIR / "counts").is_dir():
        pytest.skip(f"real HER2ST data not found at {HER2ST_DIR} (set HIFUSION_HER2ST)")
    return HER2ST_DIR


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated section: ``slide.ome.tif`` (pyramidal, 2 µm/px) and ``section.h5ad`` with counts
    for 12 genes (ERBB2, GENE1..GENE11). Shared by the session: copy it before changing it."""
    return synthetic_section(tmp_path_factory.mktemp("synthetic")).parent


@pytest.fixture(scope="session")
def synthetic_slide_path(synthetic_dir: Path) -> Path:
    """The generated slide alone (a pyramidal OME-TIFF, 1024 x 768 px at 2 µm/px)."""
    return synthetic_dir / "slide.ome.tif"


@pytest.fixture(scope="session")
def synthetic_section_path(synthetic_dir: Path) -> Path:
    """The generated section with counts, on ``synthetic_slide_path``."""
    return synthetic_dir / "section.h5ad"


@pytest.fixture(scope="session")
def tiny_checkpoint_path(synthetic_section_path: Path) -> Path:
    """An untrained tiny HiFusion checkpoint for the synthetic section's 12 genes."""
    from hifusion_model.data.sections import read_section

    genes = list(read_section(synthetic_section_path).var_names)
    return tiny_checkpoint(synthetic_section_path.parent / "tiny.pt", genes)


@pytest.fixture(scope="session")
def spot_array(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``B4.h5ad``: 40 neighbouring spots of a synthetic ST array (HER2ST's geometry, 20 genes),
    its image cropped around them; what the training tests train on. Read-only: copy to change."""
    return spot_array_section(tmp_path_factory.mktemp("spot_array"))


def pytest_collection_modifyitems(config, items):
    """Tests on the real data carry the ``her2st`` marker, so ``-m "not her2st"`` leaves them out.
    GUI tests need a display (CI runs them under xvfb-run); skip them clearly without one."""
    for item in items:
        if "her2st_dir" in getattr(item, "fixturenames", ()) and "her2st" not in item.keywords:
            item.add_marker(pytest.mark.her2st)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    skip = pytest.mark.skip(reason="no display: run the GUI tests under `xvfb-run -a pytest`")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Error notifications shown by the plugin's panels (GUI tests)."""
    from napari_hifusion import _jobs

    shown: list[str] = []
    monkeypatch.setattr(_jobs, "show_error", shown.append)
    return shown
