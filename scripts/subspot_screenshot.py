"""Save the README's picture of the sub-spot view, made by the plugin itself.

The demo's steps (the HER2ST C4 sample, the bundled model's prediction, ERBB2, measured beside
predicted), then the Genes panel's "sub-spot view": the model's estimate in each 22 µm tile on
the left, the measured spots on the right. Without a display, run it under a virtual one::

    xvfb-run -a .venv/bin/python scripts/subspot_screenshot.py [docs/subspot.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch  # noqa: F401  (before any QApplication exists: the reverse can crash)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "subspot.png"
GENE = "ERBB2"


def main(out: Path = DEFAULT_OUT) -> int:
    import napari
    from qtpy.QtCore import QTimer

    from napari_hifusion.demo import build_demo, check_demo_inputs

    check_demo_inputs("bundled")
    viewer, widget, worker = build_demo(gene=GENE)
    outcome = {"code": 1}
    genes = widget.genes

    def save() -> None:
        if genes.subspot.layers():
            out.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(out), canvas_only=False, flash=False)
            print(f"saved {out}")
            outcome["code"] = 0
        else:
            print("subspot_screenshot: no sub-spot layer was made (see the message above)",
                  file=sys.stderr)
        viewer.close()

    def subspot() -> None:
        if getattr(widget.predict, "last_layer", None) is None:
            print("subspot_screenshot: the prediction failed", file=sys.stderr)
            viewer.close()
            return
        genes.show_subspot.setChecked(True)
        widget.ensureWidgetVisible(genes.show_subspot)  # the Genes panel, its box ticked
        viewer.text_overlay.text = f"{GENE}: model per 22 µm tile, no truth (left); measured (right)"
        viewer.text_overlay.font_size = 12
        job = genes.subspot.jobs.worker
        if job is None:  # nothing to read (an error was shown)
            QTimer.singleShot(500, save)
        else:
            job.finished.connect(lambda: QTimer.singleShot(1500, save))

    if worker is None:
        viewer.close()
        return 1
    worker.finished.connect(lambda: QTimer.singleShot(500, subspot))
    napari.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
