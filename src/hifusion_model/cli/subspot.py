"""``hifusion subspot SECTION.h5ad --genes ERBB2 --out tiles.ome.tif``: the model's intra-spot view.

Runs a HiFusion model on every spot and writes, per gene, its read-out of each HISM tile (7 × 7
tiles of 22 µm for the bundled model) as a pyramidal OME-TIFF in µm that lies on the slide, as
``hifusion map`` writes; then says how the tile mean agrees with the spot's level prediction
(an identity) and with its final prediction. No measurement exists at that scale to check the
tiles against; see :mod:`hifusion_model.inference.subspot` and ``docs/subspot.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ._options import (
    Reporter,
    add_any_mpp_option,
    add_device_options,
    add_overwrite_option,
    add_reading_options,
    check_mpp,
    check_out,
)
from .map import SUFFIXES

#: ``--genes`` value that names every gene of the model.
ALL_GENES = "all"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Estimate genes below the spot: a HiFusion model's read-out of each HISM "
        "tile of every spot (the finest level, 7 × 7 tiles), written as a pyramidal OME-TIFF in "
        "µm on the slide, one channel per gene. A model estimate with no ground truth at that "
        "scale: it is checked only against the spot's own predictions.",
    )
    p.add_argument("input", type=Path, metavar="PRED.h5ad|SECTION.h5ad|STORE.zarr|SLIDE",
                   help="a prediction file (its spots, read by the model that made it), a "
                   "section, a SpatialData store, or a slide image (then give --grid or --spots)")
    p.add_argument("--model", metavar="MODEL.pt|bundled",
                   help="a HiFusion checkpoint, or 'bundled' (default: the model a prediction "
                   "file names, else bundled)")
    p.add_argument("--genes", default="ERBB2", metavar="GENE[,GENE…]|all",
                   help="comma-separated genes, one channel each, or 'all' (default: ERBB2)")
    p.add_argument("--out", type=Path, required=True, metavar="TILES.ome.tif",
                   help="the map (.ome.tif or .ome.tiff)")
    spots = p.add_mutually_exclusive_group()
    spots.add_argument("--grid", metavar="KIND[:PITCH_UM]",
                       help="on a bare slide, spots on a grid over the tissue: hex:100 or "
                       "square:200")
    spots.add_argument("--spots", type=Path, metavar="FILE.csv",
                       help="on a bare slide, spot centres: CSV with x,y (px) or x_um,y_um")
    p.add_argument("--level", type=int, metavar="K",
                   help="the HISM grid to read (default: the model's finest, 7)")
    p.add_argument("--px-per-tile", type=int, default=1, metavar="N",
                   help="map pixels per tile and axis: 1 draws each tile as one pixel "
                   "(default); more place the tiles closer to where they were read")
    p.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                   help="µm per full-resolution pixel (overrides the section's or the slide's)")
    add_any_mpp_option(p)
    add_device_options(p, "auto: bf16 on GPUs and on CPUs with native bf16, else fp32 (default)",
                       precision_default="auto")
    add_reading_options(p)
    add_overwrite_option(p)
    return p


def chosen_genes(text: str, model_genes: list[str]) -> list[str]:
    """``--genes``: the named genes, or every gene of the model for ``all``.

    >>> chosen_genes("ERBB2, KRT19", ["ERBB2", "KRT19", "CD74"])
    ['ERBB2', 'KRT19']
    >>> chosen_genes("all", ["ERBB2", "KRT19"])
    ['ERBB2', 'KRT19']
    """
    if text.strip().lower() == ALL_GENES:
        return list(model_genes)
    genes = [g.strip() for g in text.split(",") if g.strip()]
    if not genes:
        raise ConfigError("--genes names no gene; give e.g. --genes ERBB2,KRT19 or --genes all")
    return genes


def spread_text(spread: dict[str, float]) -> str:
    """One line on how much the tiles vary within a spot beside the spots."""
    return (f"SD over a spot's tiles {spread['within_spot_sd']:.3f}, over spots "
            f"{spread['across_spot_sd']:.3f} (medians over genes)")


def agreement_text(agreement: dict[str, dict[str, float]], exact: bool, k: int) -> str:
    """One line on how the tile mean agrees with the spot's predictions."""
    level, final = agreement["level"], agreement["final"]
    identity = "an identity" if exact else "approximate for this model's sizes"
    text = (f"tile mean vs level-{k} prediction: max |Δ| {level['max_abs']:.2g} ({identity}); "
            f"vs final prediction: mean |Δ| {final['mean_abs']:.3f}")
    if not math.isnan(final["median_pcc"]):
        text += f", median gene PCC across spots {final['median_pcc']:.3f}"
    return text


def is_prediction(path: Path) -> bool:
    """Whether ``path`` is a prediction file or store (``uns['hifusion_model']``), unopened by
    anndata."""
    from ..data.spatialdata_io import is_prediction_store

    if path.suffix == ".zarr" and path.is_dir():
        return is_prediction_store(path)
    if path.suffix != ".h5ad" or not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "uns" in f and "hifusion_model" in f["uns"]
    except OSError:
        return False  # not HDF5: the section reader says what is wrong


def open_spots(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The spots, their opened slide, and the model to read them with (``--model``, else the
    one a prediction file names, else the bundled one)."""
    from ..api import open_input

    if not is_prediction(args.input):
        section, slide = open_input(args.input, grid=args.grid, spots=args.spots, mpp=args.mpp)
        return section, slide, args.model or "bundled"
    from ..data.sections import section_slide
    from ..inference.predict import prediction_spots
    from .evaluate import read_predictions

    if args.grid or args.spots:
        raise ConfigError(f"{args.input} is a prediction: it has its own spots, so drop "
                          "--grid/--spots")
    pred = read_predictions(args.input, need_truth=False)
    model = args.model or str(pred.uns["hifusion_model"].get("source") or "bundled")
    if model != "bundled" and not Path(model).is_file():
        raise CheckpointError(f"{args.input} was made by {model}, which is not found; give "
                              "the checkpoint with --model")
    section = prediction_spots(pred, args.input)
    return section, section_slide(section, mpp_override=args.mpp), model


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..inference.maps import write_map
    from ..inference.subspot import subspot_map, subspot_predictions, tile_level
    from ..models.checkpoint import load_model

    if not args.out.name.lower().endswith(SUFFIXES):
        raise ConfigError(f"{args.out}: the map must end in .ome.tif or .ome.tiff")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    if args.px_per_tile < 1:
        raise ConfigError(f"--px-per-tile must be at least 1, got {args.px_per_tile}")
    check_out(args, [args.input, args.spots, args.model])
    check_mpp(args, args.mpp, args.input, "--mpp")
    device = resolve_device(args.device)
    section, slide, source = open_spots(args)
    try:
        model, ckpt = load_model(source, device)
        k = tile_level(model, args.level)  # a spot-only model fails here, before any reading
        genes = chosen_genes(args.genes, list(ckpt.config.genes))
        start = time.perf_counter()
        with Reporter(unit="spot") as reporter:
            result = subspot_predictions(model, section, slide, genes=genes, level=k,
                                         batch_size=args.batch_size, device=device,
                                         precision=args.precision, workers=args.workers,
                                         progress=reporter.progress)
    finally:
        slide.close()
    seconds = time.perf_counter() - start
    emap = subspot_map(result, px_per_tile=args.px_per_tile)
    write_map(emap, args.out)
    h, w = emap.shape
    print(f"{args.out}: {len(genes)} gene(s) on {section.n_obs} spots × {k}×{k} tiles of "
          f"{result.tile_um:.3g} µm, {w} × {h} px at {emap.um_per_px:.3g} µm/px, in "
          f"{seconds:.1f} s on {device}")
    print(agreement_text(result.agreement(), result.exact, k))
    print(spread_text(result.spread()))
    return 0
