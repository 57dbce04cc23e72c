"""``hifusion benchmark her2st DIR --protocol loso|3d|2d``: accuracy on sections never seen.

Imports the sections (cached as ``.h5ad`` in the work folder), then for every fold, model
variant and seed trains on the fold's training sections (validation on spatial blocks of those
sections only), predicts the test sections once and scores them beside the constant training
mean. With ``--json`` every finished cell is saved at once and a rerun continues where it
stopped (:mod:`~hifusion_model.evaluation.protocol_runs`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..engine.curves import format_epoch
from ..errors import ConfigError
from ..evaluation.protocol_runs import (
    VARIANTS,
    load_results,
    markdown_summary,
    parse_seeds,
    parse_variants,
    run_cells,
    save_results,
)
from ..evaluation.protocols import PROTOCOLS, import_sections, plan_protocol, scan_her2st
from ._options import add_command, add_device_options, add_recipe_options, recipe_from_args
from .train import load_model_config

EPILOG = """\
protocols (models are selected on spatial blocks of the training sections, never on the test
sections as the released scripts do):
  loso leave one section out (default, the project's yardstick): each usable section is tested
       once by a model trained on all the other usable sections
  3d   the paper's per-patient protocol: train on the first section, test on the others
  2d   the paper's 4 folds by patient pairs {A,E}, {B,F}, {C,G}, {D,H}: train on the six other
       patients, test on the pair

Only sections with counts, a spot table AND an H&E image can be used. In ../shared/data/her2st
only B4, C2, C3 and C4 have images, so:
  loso runs 4 folds: B4 (trained on C2, C3, C4: a new patient), C2, C3 and C4 (each trained on
       the other three)
  3d   runs patient C: train C2 -> test C3, C4 (the paper's C1 has no image here)
  2d   runs fold {B,F}: train C2, C3, C4 -> test B4, and fold {C,G}: train B4 -> test C2-C4
The exact plan for DIR (what runs, what is changed or skipped, and why) is printed first and
stored in --json.

variants (--variants, comma-separated; every variant of a fold predicts the same genes):
""" + "".join(f"  {k:<14} {v.description}\n" for k, v in VARIANTS.items()) + """\
  "hifusion" and "spot_resnet18" train with --recipe (and --set); "released" is the paper's
  recipe as-is; the ridge and the constant draw their validation split from each seed.

Each seed sets the initial weights, the validation split and the data order. The summary gives
per variant the mean over folds ± its SD over folds [SD over seeds]; a difference smaller than
the SD over seeds is no difference. Costs on a 2-core CPU are large (a HiFusion fold trains
~650 spots: about an hour); run it in pieces with --variants and --json, e.g.
  hifusion benchmark her2st DIR --variants ridge,constant --json loso.json --work loso
  hifusion benchmark her2st DIR --variants hifusion --seeds 0,1 --json loso.json --work loso

metrics per test section: MSE, MAE, per-spot PCC (across genes; a constant already scores
~0.8 here), per-gene PCC (across spots; a constant scores 0), skill = 1 - MSE / MSE(constant)
and the PCC of ERBB2, KRT19 and CD74.
"""


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Reproduce the HiFusion paper's evaluation protocols.",
    )
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET")
    datasets.required = True
    h = add_command(
        datasets, "her2st",
        help="HER2ST: leave one section out, or the paper's 3-D / 2-D protocols",
        description="Train and test models on a HER2ST folder (counts/, spots/, images/) by "
        "leaving one section out, or by the paper's 3-D or 2-D protocol, as far as its images "
        "allow.",
        epilog=EPILOG,
    )
    h.add_argument("folder", type=Path, metavar="DIR", help="HER2ST folder")
    h.add_argument("--protocol", choices=PROTOCOLS, default="loso", help="default: loso")
    h.add_argument("--variants", type=parse_variants, metavar="A,B",
                   help="models to compare (default: all five for loso, hifusion otherwise)")
    h.add_argument("--folds", type=lambda v: [f.strip() for f in v.split(",") if f.strip()],
                   metavar="B4,C2", help="run only these folds (by name, as the plan prints "
                   "them), e.g. one per machine; the results file collects them all")
    h.add_argument("--seeds", type=parse_seeds, metavar="0,1",
                   help="seeds of every variant (default: 0,1 for loso, the recipe's otherwise)")
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
    h.add_argument("--json", type=Path, metavar="OUT.json",
                   help="write every number here, after each cell; when it exists, its cells "
                   "are kept and only the missing ones run (same options required)")
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


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args, epochs=args.epochs, batch_size=args.batch_size,
                              precision=args.precision)
    model_config = load_model_config(args.model_config) if args.model_config else None
    loso = args.protocol == "loso"
    variants = args.variants or (list(VARIANTS) if loso else ["hifusion"])
    seeds = args.seeds or ([0, 1] if loso else [recipe.seed])
    files = scan_her2st(args.folder)
    plan = plan_protocol(args.protocol, files)
    print(plan.describe(), flush=True)
    # precision is the machine's choice (bf16 on one, fp32 on another): each cell records its own
    settings = {"recipe": recipe.replace(seed=0, precision="auto").to_dict(),
                "max_spots": args.max_spots,
                "model_config": model_config.to_dict() if model_config else None}
    unknown = sorted(set(args.folds or []) - {f.name for f in plan.folds})
    if unknown:
        raise ConfigError(f"no fold {', '.join(unknown)} in the {args.protocol} plan; its folds "
                          f"are {', '.join(f.name for f in plan.folds)}")
    results = load_results(args.json, plan, settings)
    with _work_folder(args.work) as work:
        names = [n for fold in plan.folds if not args.folds or fold.name in args.folds
                 for n in (*fold.train, *fold.test)]
        sections = import_sections(files, names, work, max_spots=args.max_spots, log=_log)
        results = run_cells(
            plan, sections, work, variants=variants, seeds=seeds, recipe=recipe,
            model_config=model_config, results=results,
            save=lambda r: save_results(args.json, r), device=args.device,
            workers=args.workers, log=_log, on_epoch=_epoch_line, folds=args.folds,
        )
    save_results(args.json, results)
    print(markdown_summary(results))
    if args.json:
        print(f"results: {args.json}")
    return 0
