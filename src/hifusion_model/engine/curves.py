"""The per-epoch record of a run: its columns, its log line, the curve files beside the model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..io_utils import atomic_path


class LossTally:
    """The running sums of one epoch's loss terms (total, main, auxiliary, alignment)."""

    def __init__(self, total: float = 0.0, parts: Any = (0.0, 0.0, 0.0)) -> None:
        self.total, self.parts = float(total), np.asarray(parts, dtype=np.float64)

    def add(self, terms: dict[str, float]) -> None:
        self.total += terms["total"]
        self.parts += (terms["main"], terms["aux"], terms["align"])

    def means(self, steps: int) -> dict[str, float]:
        """The curve columns: mean of each term over ``steps`` (at least 1) batches."""
        n = max(steps, 1)
        main, aux, align = (float(p / n) for p in self.parts)
        return {"train_loss": self.total / n, "train_main": main, "train_aux": aux,
                "train_align": align}


def validation_fields(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """The curve columns of one validation (``None`` when no spot is held out)."""
    if metrics is None:
        return dict.fromkeys(("val_mse", "val_gene_pcc", "val_spot_pcc", "val_baseline_mse"))
    return {
        "val_mse": metrics["mse"],
        "val_gene_pcc": metrics["gene_pcc"],
        "val_spot_pcc": metrics["spot_pcc"],
        "val_baseline_mse": metrics["baseline"]["mse"],
    }


def format_epoch(record: dict[str, Any]) -> str:
    """One log line for an ``on_epoch`` record (a refit epoch has no validation to show)."""
    if record.get("refit"):
        scores = "refit on every spot, no validation"
    elif record.get("val_mse") is None:
        scores = "every spot trains, no validation"
    else:
        scores = (f"val MSE {record['val_mse']:.4f} (mean {record['val_baseline_mse']:.4f})  "
                  f"gene PCC {record['val_gene_pcc']:.3f}  spot PCC {record['val_spot_pcc']:.3f}")
    return (f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  {scores}  "
            f"lr {record['lr']:.2e}  {record['seconds']:.0f} s"
            + ("  *best" if record["best"] else ""))


def write_curves(curves: list[dict[str, Any]], json_path: Path, csv_path: Path) -> None:
    """Rewrite both curve files (one record per epoch so far), each atomically."""
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(curves, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(curves[0]))
    writer.writeheader()
    writer.writerows(curves)
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())


__all__ = ["LossTally", "format_epoch", "validation_fields", "write_curves"]
