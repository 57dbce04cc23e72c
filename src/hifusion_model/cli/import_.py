"""``hifusion import {her2st,visium,hest,csv} … --out SECTION.h5ad``: make a section file."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from anndata import AnnData

from ..data.importers import (
    CoarseImageWarning,
    ScaleMismatchWarning,
    SpotMismatchWarning,
    import_csv,
    import_her2st,
    import_hest,
    import_visium,
)
from ..data.sections import UNS_KEY, write_section
from ..errors import SectionError
from ._options import add_any_mpp_option, add_overwrite_option, check_mpp, check_out


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        description="Import a spatial-transcriptomics section (spots, counts, slide, µm/px) "
        "into one .h5ad.",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True

    p = formats.add_parser(
        "her2st", help="legacy ST / HER2ST: counts TSV + spot selection TSV + image"
    )
    p.add_argument("--image", required=True, type=Path, help="full-resolution H&E image")
    p.add_argument(
        "--counts", required=True, type=Path, help="counts TSV(.gz), rows <x>x<y>, columns genes"
    )
    p.add_argument(
        "--spots",
        required=True,
        type=Path,
        help="spot selection TSV (x y new_x new_y pixel_x pixel_y)",
    )
    _common(p, "µm per full-resolution pixel (default: image metadata, else the array geometry)")

    p = formats.add_parser(
        "visium", help="10x Space Ranger outs/ folder, or a scanpy/squidpy Visium .h5ad"
    )
    p.add_argument(
        "outs", type=Path, metavar="OUTS_DIR",
        help="Space Ranger outs/ folder, or an .h5ad with uns['spatial'] (scanpy.read_visium)",
    )
    p.add_argument(
        "--image", type=Path, help="full-resolution image (default: the only *.tif beside outs/)"
    )
    _common(p, "µm per full-resolution pixel (default: from the 100 µm spot lattice, else "
            "65 µm / spot_diameter_fullres)")

    p = formats.add_parser(
        "hest", help="HEST-1k sample (st/<id>.h5ad, metadata/<id>.json, wsis/<id>.tif)"
    )
    p.add_argument("h5ad", type=Path, metavar="H5AD", help="the sample's AnnData")
    p.add_argument(
        "--metadata", type=Path, help="the sample's metadata JSON (default: found beside it)"
    )
    p.add_argument("--image", type=Path, help="full-resolution image (default: ../wsis/<id>.tif)")
    _common(p, "µm per full-resolution pixel (default: pixel_size_um_estimated from the metadata)")

    p = formats.add_parser(
        "csv", help="CSV of spot centres (x,y | pxl_col_in_fullres,pxl_row_in_fullres | x_um,y_um)"
    )
    p.add_argument("csv", type=Path, metavar="CSV")
    p.add_argument("--image", required=True, type=Path, help="full-resolution image")
    p.add_argument("--units", choices=("px", "um"), default="px", help="units of x,y (default: px)")
    p.add_argument(
        "--spot-diameter-um", type=float, default=55.0, help="spot diameter in µm (default: 55)"
    )
    _common(p, "µm per full-resolution pixel (default: image metadata)")
    return parser


def _common(parser: argparse.ArgumentParser, mpp_help: str) -> None:
    parser.add_argument("--mpp", type=float, metavar="UM_PER_PX", help=mpp_help)
    add_any_mpp_option(parser)
    parser.add_argument("--name", help="section name (default: from the input file)")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="SECTION.h5ad", help="section file to write"
    )
    add_overwrite_option(parser)


def _inputs(args: argparse.Namespace) -> list[Path]:
    names = ("image", "counts", "spots", "outs", "h5ad", "metadata", "csv")
    return [getattr(args, n) for n in names if getattr(args, n, None) is not None]


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix != ".h5ad":
        raise SectionError(f"{out}: the section file must end in .h5ad")
    check_out(args, _inputs(args))
    check_mpp(args, args.mpp, out, "--mpp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpotMismatchWarning)
        adata = _import(args)
    for w in caught:
        if issubclass(w.category, (SpotMismatchWarning, ScaleMismatchWarning, CoarseImageWarning)):
            print(f"hifusion import: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    meta = adata.uns[UNS_KEY]
    if adata.n_obs == 0:
        raise SectionError(f"{out}: the {args.format} input holds no spots, so the section would "
                           "be empty; check that the files belong to a section with spots")
    check_mpp(args, meta["mpp"], out, meta.get("mpp_source", ""))
    write_section(adata, out)
    print(_summary(adata, out))
    return 0


def _import(args: argparse.Namespace) -> AnnData:
    if args.format == "her2st":
        return import_her2st(args.image, args.counts, args.spots, mpp=args.mpp, name=args.name)
    if args.format == "visium":
        return import_visium(args.outs, image=args.image, mpp=args.mpp, name=args.name)
    if args.format == "hest":
        return import_hest(args.h5ad, args.metadata, image=args.image, mpp=args.mpp, name=args.name)
    return import_csv(
        args.csv,
        args.image,
        mpp=args.mpp,
        units=args.units,
        name=args.name,
        spot_diameter_um=args.spot_diameter_um,
    )


def _summary(adata: AnnData, out: Path) -> str:
    meta = adata.uns[UNS_KEY]
    dropped = [
        f"{meta[k]} {k.replace('_', ' ')}"
        for k in ("spots_without_counts", "counts_without_spot")
        if meta.get(k)
    ]
    return (
        f"{out}: {adata.n_obs} spots, {adata.n_vars} genes, {meta['mpp']:.4f} µm/px "
        f"({meta['mpp_source']}), {meta['spot_diameter_um']:g} µm spots, slide {meta['slide_abs']}"
        + (f" (left out: {', '.join(dropped)})" if dropped else "")
    )
