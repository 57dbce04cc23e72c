"""``hifusion predict SECTION.h5ad|SLIDE --model MODEL.pt --out PRED.h5ad``: predict expression.

On a section, every spot is predicted and its measured counts (if any) are kept as
``layers['truth']`` for ``hifusion evaluate``. On a bare slide, spots come from ``--grid`` or
``--spots``. Many inputs with ``--out-dir`` are :mod:`.predict_many`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad

from ..api import parse_grid, predict, read_input_section
from ..data.grids import large_grid_warning
from ..data.importers import import_csv
from ..data.sections import section_slide
from ..data.slide import Slide
from ..devices import resolve_device
from ..errors import ConfigError, SectionError
from ..inference.fast_cpu import precision_run
from ..inference.predict import grid_section, write_predictions
from ..io_utils import anndata_nbytes, check_space
from ..models.checkpoint import load_model
from ._options import (
    Reporter,
    add_any_mpp_option,
    add_inference_options,
    add_overwrite_option,
    add_store_options,
    check_inference_options,
    check_mpp,
    check_out,
    store_elements,
)
from .predict_many import add_batch_options, is_batch, run_batch

#: ``--dense`` values as :func:`~hifusion_model.api.predict`'s ``dense``.
DENSE_CHOICES = {"auto": None, "yes": True, "no": False}


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Predict spatial gene expression from H&E with a HiFusion model.",
    )
    p.add_argument(
        "input",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="a section .h5ad, a SpatialData .zarr store, or a slide image (then give --grid or "
        "--spots); several of them, or folders of them, with --out-dir",
    )
    p.add_argument(
        "--model",
        default="bundled",
        metavar="MODEL.pt|bundled",
        help="checkpoint, or 'bundled' for the shipped HER2ST model (default)",
    )
    outputs = p.add_mutually_exclusive_group(required=True)
    outputs.add_argument(
        "--out", type=Path, metavar="PRED.h5ad|PRED.zarr",
        help="predictions to write (.zarr: a SpatialData store of the image, spots and table)"
    )
    add_batch_options(p, outputs)
    spots = p.add_mutually_exclusive_group()
    spots.add_argument(
        "--grid",
        metavar="KIND[:PITCH_UM]",
        help="spots on a grid over the tissue: hex (Visium-like, 100 µm) or square "
        "(legacy ST, 200 µm), e.g. hex:100 or square:200",
    )
    spots.add_argument(
        "--spots",
        type=Path,
        metavar="FILE.csv",
        help="spot centres: CSV with x,y (px) or x_um,y_um columns",
    )
    p.add_argument(
        "--dense",
        choices=tuple(DENSE_CHOICES),
        default="auto",
        help="share the spot encoder's work between overlapping spots (the 7×7 tiles encoded "
        "once per piece of tissue; the whole spot, the 2×2 tiles and the region stay per spot). "
        "auto (default): dense for a --grid whose spots overlap (e.g. hex:100, the whole-slide "
        "case) on a CPU in int8 or bf16, where it measured faster; otherwise, and always for a "
        "section's own spots or --spots, the exact path, one model call per spot. yes or no "
        "force one. On HER2ST C4 dense predictions correlate ≥ 0.989 per gene with the exact ones",
    )
    p.add_argument(
        "--whole-slide",
        action="store_true",
        help="with --grid, cover the whole slide instead of the detected tissue",
    )
    p.add_argument(
        "--mpp",
        type=float,
        metavar="UM_PER_PX",
        help="µm per full-resolution pixel (overrides the section's or the slide's)",
    )
    add_any_mpp_option(p)
    add_store_options(p)
    add_inference_options(p)
    add_overwrite_option(p)
    return p




def load_input(args: argparse.Namespace, path: Path) -> tuple[ad.AnnData, Slide]:
    """The section to predict and its opened slide, from a section file or a bare slide."""
    if not path.exists():
        raise SectionError(f"{path} does not exist; give a section .h5ad or a slide image")
    elements = store_elements(args, path)
    if path.suffix in (".h5ad", ".zarr"):
        if args.grid or args.spots:
            raise ConfigError(f"{path} is a section: it has its own spots, so drop --grid/--spots")
        section = read_input_section(path, mpp=args.mpp, **elements)
        check_mpp(args, section.uns["hifusion"]["mpp"], path, "the section")
        return section, section_slide(section, mpp_override=args.mpp)
    if args.spots:
        section = import_csv(args.spots, path, mpp=args.mpp)
        meta = section.uns["hifusion"]
        check_mpp(args, meta["mpp"], path, meta.get("mpp_source", ""))
        return section, section_slide(section)
    if not args.grid:
        raise ConfigError(
            f"{path} is a slide without spots: add --grid hex:100 or --spots FILE.csv"
        )
    kind, pitch = parse_grid(args.grid)
    slide = Slide.open(path, mpp=args.mpp)
    check_mpp(args, slide.mpp, path, "the image metadata")
    try:
        section = grid_section(slide, kind=kind, pitch_um=pitch, on_tissue=not args.whole_slide)
    except SectionError as e:
        if args.whole_slide:
            raise
        raise SectionError(f"{e} (or add --whole-slide to ignore the tissue mask)") from e
    warning = large_grid_warning(section.n_obs)
    if warning:
        print(f"hifusion predict: warning: {warning} (without --whole-slide); Ctrl-C stops",
              file=sys.stderr)
    return section, slide


def run(args: argparse.Namespace) -> int:
    check_inference_options(args, "prediction", suffixes=(".h5ad", ".zarr"))
    check_mpp(args, args.mpp, args.input[0], "--mpp")
    if is_batch(args):
        return run_batch(args, predict_input, write_prediction)
    [path] = args.input
    check_out(args, [path, args.spots, args.model])
    device = resolve_device(args.device)
    result, seconds = predict_input(args, path, lambda: load_model(args.model, device), device)
    write_prediction(args, result, args.out, device, seconds)
    return 0


def predict_input(
    args: argparse.Namespace, path: Path, model: Callable[[], tuple[Any, Any]], device: Any, *,
    take: Callable[[ad.AnnData], ad.AnnData] | None = None, progress: bool = True,
) -> tuple[ad.AnnData | None, float]:
    """One input's predictions and the seconds they took.

    ``model()`` gives the network, called once the input is read, so a bad input is reported
    before a model loads. ``take``: the part of the section to predict (a process's share of a
    run split across processes); None comes back when it keeps no spot.
    """
    section, slide = load_input(args, path)
    slide.close()  # checked here; predict opens it again as the section says
    network, ckpt = model()
    if take is not None:
        section = take(section)
        if not section.n_obs:
            return None, 0.0
    start = time.perf_counter()
    with Reporter(unit="spot") as reporter:
        result = predict(
            section, (network, ckpt),
            mpp=args.mpp if path.suffix in (".h5ad", ".zarr") else None,
            tta=args.tta, device=device, precision=args.precision, batch_size=args.batch_size,
            workers=args.workers, progress=reporter.progress if progress else None,
            source=args.model, dense=DENSE_CHOICES[args.dense],
        )
    return result, time.perf_counter() - start


def write_prediction(args: argparse.Namespace, result: ad.AnnData, out: Path, device: Any,
                     seconds: float, processes: int = 1) -> None:
    """Write ``result`` to ``out`` (``.zarr``: a SpatialData store) and say what was done (by
    how many ``processes``, when they shared its spots)."""
    check_space(out, anndata_nbytes(result))
    if out.suffix == ".zarr":
        from ..data.spatialdata_io import write_spatialdata

        write_spatialdata(result, out, overwrite=args.overwrite)
    else:
        write_predictions(result, out)
    precision = precision_run(device, args.precision, result.n_obs * args.tta)
    print(
        f"{out}: {result.n_obs} spots × {result.n_vars} genes predicted on {device} "
        f"({precision}){f' by {processes} processes' * (processes > 1)} in {seconds:.1f} s "
        f"({result.n_obs / max(seconds, 1e-9):.0f} spots/s)"
        + ("; dense path (overlapping spots shared the spot encoder)"
           if result.uns["hifusion_model"].get("inference") == "dense" else "")
        + ("" if "truth" in result.layers else
           "; no measured counts, so no truth to evaluate against")
        + ("" if "uncertainty" in result.layers else
           "; this model has no noise model, so no uncertainty layer")
    )
