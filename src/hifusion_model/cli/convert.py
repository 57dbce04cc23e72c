"""``hifusion convert``: any supported slide → tiled pyramidal OME-TIFF that records its µm/px.

A JPEG must be decoded whole on every open; the OME-TIFF opens instantly, reads only the tiles
a patch needs, and shows in napari (and QuPath) as a multiscale image at the right scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.convert import COMPRESSIONS, convert_to_ome_tiff
from ..data.slide import Slide
from ._options import add_any_mpp_option, add_overwrite_option, check_mpp, check_out


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Convert a slide (JPEG, PNG, TIFF, SVS, NDPI, …) into a tiled, compressed, "
                    "pyramidal OME-TIFF that records its µm per pixel.")
    p.add_argument("slide", type=Path, help="the source image")
    p.add_argument("out", type=Path, help="the OME-TIFF to write (e.g. slide.ome.tif)")
    p.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                   help="µm per pixel of the source (required when the file does not record it)")
    add_any_mpp_option(p)
    p.add_argument("--tile", type=int, default=512, metavar="N",
                   help="tile size in px, a multiple of 16 (default: 512)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="jpeg",
                   help="jpeg (quality 90, small) or zlib (lossless); default: jpeg")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_out(args, [args.slide], flag="OUT")
    check_mpp(args, args.mpp, args.slide, "--mpp")
    out = convert_to_ome_tiff(args.slide, args.out, mpp=args.mpp, tile=args.tile,
                              compression=args.compression, progress=_progress_printer())
    with Slide.open(out) as slide:
        h, w = slide.shape
        print(f"wrote {out}: {w} × {h} px, {len(slide.levels)} levels, {slide.mpp:.4g} µm/px, "
              f"{args.tile} px {args.compression} tiles")
    return 0


def _progress_printer():
    """A progress line on an interactive terminal; silence in scripts and logs."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, message: str) -> None:
        end = "\n" if done == total else ""
        print(f"\rconverting: {done}/{total} bands ({message})", end=end, file=sys.stderr,
              flush=True)

    return show
