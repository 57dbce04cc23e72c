"""``hifusion pseudolabel SECTION.h5ad --model T.pt [T.pt …] --out PSEUDO.h5ad``: label the gaps.

The teachers (models trained on the section, e.g. three seeds with ``--set val_fraction=0``)
predict the tissue between its spots; ``hifusion train SECTION.h5ad --pseudo PSEUDO.h5ad --set
val_fraction=0`` then trains a student on the measured spots and these.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..api import check_finite_prediction
from ..data.sections import read_section, section_slide
from ..devices import resolve_device
from ..future.pseudo_labels import pseudo_label
from ..inference.predict import write_predictions
from ..io_utils import anndata_nbytes, check_space
from ..models.checkpoint import load_model
from ._options import (
    Reporter,
    add_inference_options,
    add_overwrite_option,
    check_inference_options,
    check_out,
)


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Place spots in the gaps of a section's spot array, on tissue, and write "
        "the mean prediction of the given models there: extra training spots for `hifusion "
        "train --pseudo`.",
    )
    p.add_argument("section", type=Path, metavar="SECTION.h5ad",
                   help="a section with its spots (their counts are not used)")
    p.add_argument("--model", dest="models", nargs="+", required=True, type=Path,
                   metavar="MODEL.pt", help="teacher checkpoints, trained on this section")
    p.add_argument("--out", required=True, type=Path, metavar="PSEUDO.h5ad",
                   help="the pseudo-label file to write")
    add_inference_options(p)
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_inference_options(args, "pseudo-label")
    check_out(args, [args.section, args.models])
    device = resolve_device(args.device)
    section = read_section(args.section)
    slide = section_slide(section)
    teachers = [load_model(m, device=device) for m in args.models]
    reporter = Reporter(unit="spot")
    start = time.perf_counter()
    try:
        pseudo = pseudo_label(section, slide, teachers, sources=args.models,
                              progress=reporter.progress, device=device,
                              precision=args.precision, batch_size=args.batch_size,
                              workers=args.workers, tta=args.tta)
    finally:
        reporter.close()
    check_finite_prediction(pseudo.X, ", ".join(map(str, args.models)))
    check_space(args.out, anndata_nbytes(pseudo))
    write_predictions(pseudo, args.out)
    print(f"wrote {args.out}: {pseudo.n_obs} spots between the {section.n_obs} of "
          f"{args.section.name}, the mean of {len(teachers)} model(s) "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
