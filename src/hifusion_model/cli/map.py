"""``hifusion map PRED.h5ad --genes ERBB2,KRT19 --out map.ome.tif``: genes as images over the tissue.

The spots of a prediction file become one float32 image per gene (Gaussian-weighted mean of
the nearby spots, NaN off the tissue), written as a tiled pyramidal OME-TIFF in µm that lies on
the slide in napari, QuPath or any OME reader; see :mod:`hifusion_model.inference.maps`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._options import add_overwrite_option, check_out

SUFFIXES = (".ome.tif", ".ome.tiff")


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Interpolate genes of a prediction file (from hifusion predict, e.g. on a "
        "--grid over a bare slide) into images over the tissue, aligned in µm with the slide, "
        "and write them as a pyramidal OME-TIFF with one channel per gene.",
    )
    p.add_argument("predictions", type=Path, metavar="PRED.h5ad", help="a prediction file")
    p.add_argument("--genes", default="ERBB2", metavar="GENE[,GENE…]",
                   help="comma-separated genes, one channel each (default: ERBB2)")
    p.add_argument("--out", type=Path, required=True, metavar="MAP.ome.tif",
                   help="the map (.ome.tif or .ome.tiff)")
    p.add_argument("--um-per-px", type=float, metavar="UM",
                   help="map resolution in µm per pixel (default: a fifth of the spot pitch, "
                   "20 on a 100 µm grid)")
    p.add_argument("--layer", choices=("predicted", "truth", "uncertainty"), default="predicted",
                   help="what to map: the predictions (default), the measured truth or the "
                   "uncertainty")
    p.add_argument("--sigma-um", type=float, metavar="UM",
                   help="width (σ) of each spot's Gaussian weight (default: a third of the pitch)")
    p.add_argument("--reach-um", type=float, metavar="UM",
                   help="pixels farther than this from every spot are left empty (NaN; default: "
                   "three quarters of the pitch)")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..inference.maps import expression_map, write_map
    from .evaluate import read_predictions

    if not args.out.name.lower().endswith(SUFFIXES):
        raise ConfigError(f"{args.out}: the map must end in .ome.tif or .ome.tiff")
    genes = [g.strip() for g in args.genes.split(",") if g.strip()]
    if not genes:
        raise ConfigError("--genes names no gene; give e.g. --genes ERBB2,KRT19")
    for flag, value in (("--um-per-px", args.um_per_px), ("--sigma-um", args.sigma_um),
                        ("--reach-um", args.reach_um)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be a positive number of µm, got {value:g}")
    check_out(args, [args.predictions])
    pred = read_predictions(args.predictions, need_truth=False)
    emap = expression_map(pred, genes, um_per_px=args.um_per_px, layer=args.layer,
                          sigma_um=args.sigma_um, reach_um=args.reach_um,
                          source=args.predictions)
    write_map(emap, args.out)
    h, w = emap.shape
    print(f"{args.out}: {', '.join(genes)} of {pred.n_obs} spots, {w} × {h} px at "
          f"{emap.um_per_px:g} µm/px")
    return 0
