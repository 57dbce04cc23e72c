"""``hifusion predict A.h5ad B.svs slides/ --out-dir preds/``: many inputs, one start-up.

The model loads once; each input's prediction is written to ``preds/NAME.pred.h5ad``
(:mod:`hifusion_model.inference.many` holds the naming and sharing rules). What can be known
before the work is checked before it starts, for every input at once: a path that does not
exist, a folder with no match, two inputs of one name, an output that is an input, exists
(without ``--overwrite`` or ``--skip-existing``) or cannot be written. A bad input found while
working (an unreadable slide, a section without the model's genes) is reported in one line and
the others go on; the command then exits 2, naming the inputs that failed.

Under ``torchrun`` the ``--out`` form of one input runs here too, its spots shared by the
processes (:func:`run_batch`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anndata as ad

from ..errors import ConfigError, HiFusionError, OutputError
from ..inference.many import (
    DEFAULT_PATTERN,
    expand_inputs,
    input_share,
    is_store,
    merge_shares,
    output_paths,
    spot_share,
)
from ..io_utils import check_output
from ._options import check_out

#: ``predict_input(args, path, model, device, take=None, progress=True)``: one input's
#: predictions (of the spots ``take`` keeps; None if it keeps none) and the seconds taken.
PredictInput = Callable[..., tuple[ad.AnnData | None, float]]
#: ``write_prediction(args, result, out, device, seconds, processes=1)``: write one result and
#: say so.
WritePrediction = Callable[..., None]
#: Errors that concern one input (a user's file, the machine's state): reported, then the rest.
INPUT_ERRORS = (HiFusionError, OSError, MemoryError)


def add_batch_options(p: argparse.ArgumentParser, outputs: Any) -> None:
    """``--out-dir`` (beside ``--out`` in the ``outputs`` group), ``--pattern``, ``--skip-existing``."""
    outputs.add_argument(
        "--out-dir", type=Path, metavar="DIR",
        help="predict every input into DIR/NAME.pred.h5ad (many inputs, one start-up)",
    )
    p.add_argument(
        "--pattern", metavar="GLOB",
        help=f"files to predict inside the folders given as inputs (default: {DEFAULT_PATTERN!r}; "
        "e.g. '*.svs'; '**/*.h5ad' searches subfolders too)",
    )
    p.add_argument(
        "--skip-existing", action="store_true",
        help="with --out-dir, leave inputs whose prediction exists (to finish an interrupted run)",
    )


def is_batch(args: argparse.Namespace) -> bool:
    """Whether this run is :func:`run_batch`'s: many inputs (``--out-dir``), or one shared by
    torchrun's processes; refuses mixed forms."""
    from ..engine.distributed import launched_world

    folder = args.input[0].is_dir() and not is_store(args.input[0])
    if args.out is not None and (len(args.input) > 1 or folder):
        what = (f"{args.input[0]} is a folder" if len(args.input) == 1
                else f"{_inputs(args.input)} are {len(args.input)} inputs")
        raise ConfigError(f"--out names one file, but {what}; give --out-dir DIR to write "
                          "DIR/NAME.pred.h5ad for each input")
    if args.out is None and args.spots is not None:
        raise ConfigError("--spots holds the spots of one slide: give that slide alone, with --out")
    if args.skip_existing and args.out_dir is None:
        raise ConfigError("--skip-existing goes with --out-dir; with --out, choose another file "
                          "or add --overwrite")
    if args.skip_existing and args.overwrite:
        raise ConfigError("--skip-existing leaves existing predictions, --overwrite replaces "
                          "them: give one of the two")
    return args.out_dir is not None or launched_world() > 1


def _inputs(paths: list[Path]) -> str:
    return f"{paths[0]}" if len(paths) == 1 else f"{paths[0]}, {paths[1]}{', …' * (len(paths) > 2)}"


def plan_jobs(args: argparse.Namespace) -> tuple[list[tuple[Path, Path]], int]:
    """``(input, output)`` of every input still to predict, and how many were skipped.

    Every output is checked before any is written, so a batch never stops half-way on a name
    that was wrong from the start. Under torchrun every process checks them all before it
    joins the others, so none is written before all are checked.
    """
    if args.out is not None:  # one input, shared by torchrun's processes
        return [(args.input[0], check_out(args, [args.input[0], args.spots, args.model]))], 0
    inputs = expand_inputs(args.input, args.pattern)
    outputs = output_paths(inputs, args.out_dir)
    sources = [*inputs, args.model]
    existing, jobs = [], []
    for path, out in zip(inputs, outputs):
        check_output(out, sources, overwrite=True, flag="--out-dir")  # an input, a folder, unwritable
        if out.exists() or out.is_symlink():
            if args.skip_existing:
                continue
            if not args.overwrite:
                existing.append(out)
                continue
        jobs.append((path, out))
    if existing:
        raise OutputError(
            f"{_inputs(existing)} already exist{'s' * (len(existing) == 1)} "
            f"({len(existing)} of {len(outputs)} outputs); add --overwrite to replace them, "
            "--skip-existing to predict only the others, or choose another --out-dir"
        )
    return jobs, len(inputs) - len(jobs)


def run_batch(args: argparse.Namespace, predict_input: PredictInput,
              write_prediction: WritePrediction) -> int:
    """Predict every planned input with one model; exit 2 if any failed, after the others.

    Under ``torchrun`` the processes share the inputs, or each input's spots when there are
    fewer inputs than processes (:mod:`hifusion_model.inference.many`); they leave together,
    so none is stopped by the launcher while another still writes.
    """
    import torch

    from ..devices import resolve_device
    from ..engine.distributed import distributed, from_main, gather_on_main
    from ..models.checkpoint import load_model

    jobs, skipped = plan_jobs(args)
    # gloo whatever the device: only Python objects (parts, failures) pass between processes
    with distributed("cpu", backend="gloo", timeout=PATIENCE) as info:
        if skipped and info.is_main:
            print(f"hifusion predict: {skipped} input(s) already predicted in {args.out_dir}, "
                  "skipped (--skip-existing)", file=sys.stderr)
        device = resolve_device(args.device, local_rank=info.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = load_model(args.model, device)
        together = len(jobs) < info.world
        mine = jobs if together else [jobs[i] for i in input_share(len(jobs), info.rank,
                                                                   info.world)]
        failed = []
        for path, out in mine:
            if together:
                done = _predict_together(args, path, out, model, device, info, predict_input,
                                         write_prediction)
            else:
                done = _predict_alone(args, path, out, model, device, predict_input,
                                      write_prediction)
            if not done:
                failed.append(path)
        every = gather_on_main(failed, info)
        failed = [path for path, _ in jobs if any(path in part for part in every)] if every else []
        if failed:
            print(f"hifusion predict: {len(failed)} of {len(jobs)} inputs failed: "
                  f"{', '.join(map(str, failed))}", file=sys.stderr)
        return from_main([2 if failed else 0], info)[0]


#: How long a process that finished its inputs waits for the slowest (a batch's inputs differ in
#: size, so one process may finish hours before another).
PATIENCE = timedelta(days=7)


def _predict_alone(args: argparse.Namespace, path: Path, out: Path, model: Any, device: Any,
                   predict_input: PredictInput, write_prediction: WritePrediction) -> bool:
    """One input by this process alone; False (after one line) if it failed."""
    try:
        result, seconds = predict_input(args, path, lambda: model, device)
        write_prediction(args, result, out, device, seconds)
        return True
    except INPUT_ERRORS as e:
        print(failure_line(e, path), file=sys.stderr)
        return False


def _predict_together(args: argparse.Namespace, path: Path, out: Path, model: Any, device: Any,
                      info: Any, predict_input: PredictInput,
                      write_prediction: WritePrediction) -> bool:
    """One input by every process, each on its :func:`spot_share`; rank 0 merges and writes.

    Every process reaches the gather, also after a failure (else the others would wait on it),
    so rank 0 knows each outcome; it alone reports and its verdict stands for all.
    """
    from ..engine.distributed import gather_on_main

    start = time.perf_counter()

    def take(section: ad.AnnData) -> ad.AnnData:
        return section[spot_share(section.n_obs, args.batch_size, info.rank, info.world)].copy()

    try:
        part, _ = predict_input(args, path, lambda: model, device, take=take,
                                progress=info.is_main)
        outcome: tuple[Any, str | None] = (part, None)
    except INPUT_ERRORS as e:
        outcome = (None, failure_line(e, path))
    outcomes = gather_on_main(outcome, info)
    if outcomes is None:  # not rank 0: its verdict, shared at the end, stands for this input
        return True
    failures = [line for _, line in outcomes if line]
    try:
        if failures:
            print(failures[0], file=sys.stderr)
            return False
        result = merge_shares([part for part, _ in outcomes], path)
        write_prediction(args, result, out, device, time.perf_counter() - start, info.world)
        return True
    except INPUT_ERRORS as e:
        print(failure_line(e, path), file=sys.stderr)
        return False


def failure_line(e: BaseException, path: Path) -> str:
    """The one line that reports an input's error, naming the input; a bug re-raises."""
    from . import user_message

    message = user_message(e, "predict")
    if message is None:  # a bug: its traceback, not a line
        raise e
    named = str(path) in message or path.name in message
    return f"hifusion predict: error: {message if named else f'{path}: {message}'}"
