"""``hifusion benchmark her2st DIR --protocol 3d|2d``: the paper's protocols on a HER2ST folder.

Imports the sections (cached as ``.h5ad`` in the work folder), trains one model per fold with
validation on spatial blocks of the training sections only, predicts the test sections and
prints their metrics beside the constant training mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io_utils import atomic_path
from ..protocols import PROTOCOLS, import_sections, plan_protocol, run_protocol, scan_her2st
from ..training import format_epoch
from ._options import add_command, add_device_options, add_recipe_options, recipe_from_args
from .evaluate import format_table
from .train import load_model_config

EPILOG = """\
protocols (as in the HiFusion paper; models are selected on spatial blocks of the training
sections, never on the test sections as the released scripts do):
  3d   per patient: train on the first section, test on the patient's other sections
  2d   4 folds by patient pairs {A,E}, {B,F}, {C,G}, {D,H}: train on the six other patients,
       test on the pair

Only sections with counts, a spot table AND an H&E image can be used. In ../shared/data/her2st
only B4, C2, C3 and C4 have images, so:
  3d   runs patient C: train C2 -> test C3, C4 (the paper trains on C1, which has no image
       here; C5 and C6 are absent). Skipped: patient B (B4 is its only imaged section, a
       train/test split needs two) and patients A, D, E, F, G, H (no images).
  2d   runs fold {B,F}: train C2, C3, C4 -> test B4, and fold {C,G}: train B4 -> test C2, C3,
       C4 (the paper trains on all sections of six patients). Skipped: folds {A,E} and {D,H}
       (no imaged section of those patients).
The exact plan for DIR (what runs, what is changed or skipped, and why) is printed first and
stored in --json.

metrics per test section: MSE, MAE, per-spot PCC (across genes; a constant already scores
~0.8 here), per-gene PCC (across spots; a constant scores 0), and the PCC of ERBB2, KRT19 and
CD74, each beside the constant training mean.
"""


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="reproduce the paper's accuracy protocols on a dataset",
        description="Reproduce the HiFusion paper's evaluation protocols.",
    )
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET")
    datasets.required = True
    h = add_command(
        datasets, "her2st",
        help="HER2ST: 3-D (per patient) or 2-D (cross-patient) protocol",
        description="Train and test HiFusion on a HER2ST folder (counts/, spots/, images/) "
        "following the paper's 3-D or 2-D protocol, as far as its images allow.",
        epilog=EPILOG,
    )
    h.add_argument("folder", type=Path, metavar="DIR", help="HER2ST folder")
    h.add_argument("--protocol", choices=PROTOCOLS, default="3d", help="default: 3d")
    h.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="folder for imported sections (reused on later runs) and models (default: a "
        "temporary folder, removed afterwards)",
    )
    add_recipe_options(h)
    add_device_options(h, "autocast precision (default: the recipe's)")
    h.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    h.add_argument("--json", type=Path, metavar="OUT.json", help="write every number here")
    h.add_argument(
        "--max-spots",
        type=int,
        metavar="N",
        help="for quick checks of the pipeline only: keep N evenly spread spots per section "
        "(the metrics then mean nothing)",
    )
    return p


@contextlib.contextmanager
def _work_folder(work: Path | None) -> Iterator[Path]:
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="hifusion-benchmark-") as tmp:
        yield Path(tmp)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _epoch_line(r: dict[str, Any]) -> None:
    _log("  " + format_epoch(r))


def report(result: dict[str, Any]) -> str:
    """One table per fold: every test section, model beside the constant training mean."""
    blocks = []
    for fold in result["results"]:
        t = fold["training"]
        blocks.append(
            f"\n{fold['fold']}: trained on {', '.join(fold['train'])} ({fold['n_genes']} genes, "
            f"recipe {t['recipe']}, best epoch {t['best_epoch']}/{t['epochs']}, "
            f"{fold['seconds']['train']:.0f} s), tested on {', '.join(fold['test'])}\n"
            + format_table(fold["metrics"])
        )
    return "".join(blocks)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args, epochs=args.epochs, batch_size=args.batch_size,
                              precision=args.precision)
    model_config = load_model_config(args.model_config) if args.model_config else None
    files = scan_her2st(args.folder)
    plan = plan_protocol(args.protocol, files)
    print(plan.describe(), flush=True)
    with _work_folder(args.work) as work:
        names = [n for fold in plan.folds for n in (*fold.train, *fold.test)]
        sections = import_sections(files, names, work, max_spots=args.max_spots, log=_log)
        result = run_protocol(
            plan, sections, work, recipe=recipe, model_config=model_config, device=args.device,
            workers=args.workers, log=_log, on_epoch=_epoch_line,
        )
    result["max_spots"] = args.max_spots
    print(report(result))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        print(f"results: {args.json}")
    return 0
