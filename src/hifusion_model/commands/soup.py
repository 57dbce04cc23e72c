"""``hifusion soup MODEL MODEL … --out SOUP.pt``: average the weights of runs from one start.

Train the runs with the same recipe ``seed`` and encoder weights and another ``data_seed``
each (``hifusion train … --set data_seed=1``); their average is one model, as fast as each.
It is measured on the validation spots its ingredients held out (drawn again from their card),
so it is judged as each run was: the command prints that validation beside each run's, and the
card keeps both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..soups import save_soup
from ._options import add_overwrite_option, check_out, command_line


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="average the weights of models trained from the same start (a model soup)",
        description="Average the weights of checkpoints that share their network, genes, "
        "training spots and starting weights (same recipe seed, other data_seed).",
    )
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL.pt",
                   help="two or more checkpoints from runs that differ only in data_seed")
    p.add_argument("--out", type=Path, required=True, help="the averaged checkpoint to write")
    p.add_argument("--sections", nargs="+", type=Path, metavar="SECTION.h5ad",
                   help="the training sections, in the card's order, where the card names no "
                        "file for them (default: the files the card names)")
    p.add_argument("--no-validation", action="store_true",
                   help="write the average without measuring it on the held-out spots")
    p.add_argument("--device", default="auto", help="for the validation: auto, cpu, cuda, mps")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the file; as the bundled model)")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_out(args, [args.models, args.sections])
    path, v = save_soup(args.models, args.out, sections=args.sections, half=args.half,
                        validate_on_held_out=not args.no_validation, device=args.device,
                        command=command_line("soup"))
    print(f"wrote {path}: the mean of {len(args.models)} models' weights")
    for c in load_checkpoint(path).card["soup"]:
        print(f"  {c['model']}: epoch {c['epoch']}, " + _scores(c["validation"]))
    if v is not None:
        print(f"  the average: {_scores(v)}")
    return 0


def _scores(v: dict | None) -> str:
    if not v:
        return "validation not recorded"
    return f"validation MSE {v['mse']:.4f}, gene PCC {v['gene_pcc']:.3f}"
