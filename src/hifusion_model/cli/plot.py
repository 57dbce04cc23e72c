"""``hifusion plot PRED.h5ad --gene ERBB2 --out fig.png``: a figure of one predicted gene.

Predicted beside measured over the H&E (one colour scale), the uncertainty when the model gave
one, and every gene's PCC sorted, with the chosen gene and the markers marked. Given a training
run's ``MODEL.curves.json`` instead, the figure is its curves (as the Train panel draws them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io_utils import atomic_path
from ._options import add_overwrite_option, check_out

FORMATS = (".png", ".pdf", ".svg", ".jpg")


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Draw one gene of a prediction file (from hifusion predict or the napari "
        "Export panel) over its H&E, beside the measurement, with the per-gene PCC of all "
        "genes; or the curves of a training run (MODEL.curves.json from hifusion train).",
    )
    p.add_argument("predictions", type=Path, metavar="PRED.h5ad",
                   help="a prediction file, or a training run's MODEL.curves.json")
    p.add_argument("--gene", default="ERBB2", help="the gene to draw (default: ERBB2)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG.png",
                   help=f"the figure ({', '.join(FORMATS)})")
    p.add_argument("--dpi", type=int, default=150, help="resolution (default: 150)")
    p.add_argument("--colormap", default="inferno", help="matplotlib colormap (default: inferno)")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from matplotlib import colormaps

    from ..evaluation.figures import curve_figure, gene_figure
    from .evaluate import read_predictions

    if args.out.suffix.lower() not in FORMATS:
        raise ConfigError(f"{args.out}: the figure must end in {', '.join(FORMATS)}")
    if not 20 <= args.dpi <= 1200:
        raise ConfigError(f"--dpi must be 20 to 1200, got {args.dpi}")
    if args.colormap not in colormaps:
        raise ConfigError(f"--colormap {args.colormap!r} is not a matplotlib colormap, e.g. "
                          "inferno, viridis, magma")
    check_out(args, [args.predictions])
    if args.predictions.name.endswith(".curves.json"):
        records = read_curves(args.predictions)
        fig, what = curve_figure(records), f"the curves of {len(records)} epochs"
    else:
        pred = read_predictions(args.predictions, need_truth=False)
        fig, what = gene_figure(pred, args.gene, cmap=args.colormap), (
            f"{args.gene} of {pred.n_obs} spots")
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=args.dpi, format=args.out.suffix.lower().lstrip("."))
    print(f"{args.out}: {what}")
    return 0


def read_curves(path: Path) -> list[dict[str, Any]]:
    """The epoch records ``hifusion train`` wrote to ``MODEL.curves.json``."""
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as training curves ({e})") from e
    if not (isinstance(records, list) and records and all(
            isinstance(r, dict) and {"epoch", "train_loss"} <= set(r) for r in records)):
        raise ConfigError(f"{path}: not the curves of a training run (hifusion train writes "
                          "MODEL.curves.json: one record per epoch)")
    return records
