"""``hifusion plot PRED.h5ad --gene ERBB2 --out fig.png``: a figure of one predicted gene.

Predicted beside measured over the H&E (one colour scale), the uncertainty when the model gave
one, and every gene's PCC sorted, with the chosen gene and the markers marked.
"""

from __future__ import annotations

import argparse
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
        "genes.",
    )
    p.add_argument("predictions", type=Path, metavar="PRED.h5ad", help="a prediction file")
    p.add_argument("--gene", default="ERBB2", help="the gene to draw (default: ERBB2)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG.png",
                   help=f"the figure ({', '.join(FORMATS)})")
    p.add_argument("--dpi", type=int, default=150, help="resolution (default: 150)")
    p.add_argument("--colormap", default="inferno", help="matplotlib colormap (default: inferno)")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from matplotlib import colormaps

    from ..evaluation.figures import gene_figure
    from .evaluate import read_predictions

    if args.out.suffix.lower() not in FORMATS:
        raise ConfigError(f"{args.out}: the figure must end in {', '.join(FORMATS)}")
    if not 20 <= args.dpi <= 1200:
        raise ConfigError(f"--dpi must be 20 to 1200, got {args.dpi}")
    if args.colormap not in colormaps:
        raise ConfigError(f"--colormap {args.colormap!r} is not a matplotlib colormap, e.g. "
                          "inferno, viridis, magma")
    check_out(args, [args.predictions])
    pred = read_predictions(args.predictions, need_truth=False)
    fig = gene_figure(pred, args.gene, cmap=args.colormap)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=args.dpi, format=args.out.suffix.lower().lstrip("."))
    print(f"{args.out}: {args.gene} of {pred.n_obs} spots")
    return 0
