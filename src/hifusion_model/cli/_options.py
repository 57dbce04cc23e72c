"""Options several subcommands share, defined once so their flags and help stay identical."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..data.sections import MPP_RANGE, check_mpp_plausible
from ..engine.recipes import DEFAULT_RECIPE, PRECISIONS, RECIPES, TrainConfig, get_recipe
from ..errors import ConfigError
from ..inference.views import MAX_TTA, check_tta
from ..io_utils import check_output

DEVICE_HELP = "auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps"


class Reporter:
    """The one progress bar of the CLI: tqdm over all steps (or spots, or per cent of a
    budget), plus one line per epoch; created on the first report, so an error found before
    the work is the only line printed. Quiet when stderr is not a terminal (a log file, a job
    scheduler): tqdm's ``disable=None``."""

    def __init__(self, unit: str = "step") -> None:
        self.bar, self.unit = None, unit

    def progress(self, done: int, total: int, message: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=self.unit, dynamic_ncols=True, file=sys.stderr,
                            disable=None, leave=False)
            self.bar.update(max(done - 1, 0))
        self.bar.set_description_str(message, refresh=False)
        self.bar.update(done - self.bar.n)

    def epoch(self, r: dict[str, Any]) -> None:
        from ..engine.curves import format_epoch

        (self.bar.write if self.bar is not None else print)(format_epoch(r), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_command(subparsers: Any, name: str, description: str, epilog: str,
                help: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``epilog`` is shown as written (examples, tables). A top-level
    command's one-line ``help`` comes from :data:`hifusion_model.cli.COMMANDS`."""
    extra = {} if help is None else {"help": help}
    return subparsers.add_parser(name, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **extra)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--epochs``, ``--batch-size`` and ``--model-config`` for training."""
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        metavar="NAME|FILE.json",
        help=f"training recipe: {', '.join(RECIPES)} or a JSON file (default: {DEFAULT_RECIPE})",
    )
    p.add_argument("--epochs", type=int, help="number of epochs (default: the recipe's)")
    p.add_argument(
        "--batch-size", type=int, help="spots per batch and per process (default: the recipe's)"
    )
    add_set_option(p)
    p.add_argument(
        "--model-config",
        type=Path,
        metavar="FILE.json",
        help="architecture as ModelConfig JSON (default: the released architecture; e.g. a "
        "small model for quick runs)",
    )


def recipe_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: VALUE is read as JSON (``0.99``, ``true``, ``null``, ``[1, 2]``)
    and falls back to a plain string (``--set optimizer=adam``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): any training-recipe field, e.g. ``ema_decay=0.99``."""
    p.add_argument(
        "--set", dest="recipe_set", action="append", type=recipe_setting, default=[],
        metavar="KEY=VALUE",
        help="override one field of the training recipe (repeatable), e.g. --set ema_decay=0.99",
    )


def load_recipe(value: str) -> TrainConfig:
    """A named recipe, or one read from a JSON file."""
    if value.endswith(".json"):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} not found")
        return TrainConfig.from_json(path.read_text())
    return get_recipe(value)


def recipe_from_args(args: argparse.Namespace, **flags: Any) -> TrainConfig:
    """``--recipe`` with the given flag values (``None``: keep the recipe's) and ``--set`` applied."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return load_recipe(args.recipe).replace(**{**changes, **dict(args.recipe_set)})


def add_device_options(p: argparse.ArgumentParser, precision_help: str, *,
                       precision_default: str | None = None, inference: bool = False) -> None:
    """``--device``, ``--precision`` (with ``int8`` for an ``inference`` command) and its
    ``--bf16`` shorthand."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=(*PRECISIONS, "int8") if inference else PRECISIONS,
                   default=precision_default, help=precision_help)
    p.add_argument(
        "--bf16",
        action="store_const",
        const="bf16",
        dest="precision",
        help="same as --precision bf16 (fast on CPUs with AVX-512 BF16 or AMX)",
    )


def command_line(name: str) -> list[str] | None:
    """``sys.argv`` shown as ``hifusion NAME …``; None when ``main`` was called from Python."""
    argv = sys.argv
    if name not in argv[1:]:
        return None
    return ["hifusion", *argv[argv.index(name):]]


#: ``--precision`` of a prediction.
INFERENCE_PRECISION_HELP = (
    "auto (default): bf16 on GPUs; on the CPU the convolutions in int8 for jobs of 200 spots or "
    "more (per-gene PCC ≥ 0.993 with fp32 on four HER2ST sections, 2.2× as fast), else bf16 "
    "where the CPU has it natively, else fp32; int8: the CPU's int8 path at any size")


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """Device, precision, batch size, reading threads and test-time views of a prediction."""
    add_device_options(p, INFERENCE_PRECISION_HELP, precision_default="auto", inference=True)
    add_reading_options(p)
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help=f"average N test-time views per spot (flips and quarter turns, 1 to "
                   f"{MAX_TTA}; N times the time; default: 1)")


def reading_threads() -> int:
    """Patch-reading threads by default: one per core this process may use, at most 4.

    More readers than cores take CPU from the network: on 2 cores, the dense path over a strip
    of the 50k slide ran at 37.4 spots/s with 2 readers and 36.1 with 4, and peaked at 1,885
    against 2,108 MB (the queued batches and each thread's heap)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def add_reading_options(p: argparse.ArgumentParser) -> None:
    """Batch size and patch-reading threads of a prediction."""
    p.add_argument("--batch-size", type=int, default=32, help="spots per batch (default: 32)")
    threads = reading_threads()
    p.add_argument("--workers", type=int, default=threads,
                   help=f"patch-reading threads (default: one per usable core, at most 4: "
                   f"{threads} here)")


def check_inference_options(args: argparse.Namespace, what: str,
                            suffixes: tuple[str, ...] = (".h5ad",)) -> None:
    """``--out`` (if given: ``--out-dir`` names its own files) must end in one of ``suffixes``
    (``what`` it holds); batch size, workers and views in range."""
    if args.out is not None and args.out.suffix not in suffixes:
        raise ConfigError(f"{args.out}: the {what} file must end in {' or '.join(suffixes)}")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    check_tta(args.tta)


def add_any_mpp_option(p: argparse.ArgumentParser) -> None:
    """``--any-mpp``: accept a µm/px outside the plausible range of an H&E scan."""
    low, high = MPP_RANGE
    p.add_argument("--any-mpp", action="store_true",
                   help=f"accept a µm/px outside {low:g}-{high:g} (default: refuse it as a typo)")


def check_mpp(args: argparse.Namespace, mpp: float | None, source: Any, origin: str) -> None:
    """A µm/px entering from ``origin`` must be plausible unless ``--any-mpp``."""
    if mpp is not None:
        check_mpp_plausible(mpp, source, origin, allow=getattr(args, "any_mpp", False))


#: The elements of a SpatialData store an input may choose, where the store holds several.
STORE_ELEMENTS = {
    "table": "the table of spots and counts (default: the store's only table)",
    "image": "the H&E image (default: the finest image the spots lie on)",
    "shapes": "the spot shapes (default: the only ones the table annotates)",
}


def add_store_options(p: argparse.ArgumentParser) -> None:
    """``--table``, ``--image``, ``--shapes``: which elements of a SpatialData ``.zarr`` input
    make the section, where the store holds several."""
    group = p.add_argument_group("SpatialData .zarr inputs")
    for name, help in STORE_ELEMENTS.items():
        group.add_argument(f"--{name}", metavar="NAME", help=help)


def store_elements(args: argparse.Namespace, path: Path) -> dict[str, str]:
    """The elements ``--table``/``--image``/``--shapes`` chose, for ``read_input_section``;
    refused for an input that is no ``.zarr`` store, where they would silently do nothing."""
    chosen = {k: v for k in STORE_ELEMENTS if (v := getattr(args, k, None)) is not None}
    if chosen and path.suffix != ".zarr":
        flags = "/".join(f"--{k}" for k in chosen)
        raise ConfigError(f"{path}: {flags} choose elements of a SpatialData .zarr store, "
                          f"which this input is not; drop {flags}")
    return chosen


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: without it an existing output file is never replaced."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output file if it exists (default: refuse)")


def check_out(args: argparse.Namespace, inputs: Iterable[Any], *, out: Path | None = None,
              flag: str = "--out", companions: Iterable[Path] = (),
              existing_ok: bool = False) -> Path:
    """:func:`~hifusion_model.io_utils.check_output` for a command's output, before any work.

    ``inputs`` may hold paths, lists of paths and ``None``; ``existing_ok`` lets a command that
    continues its own output (``train --resume``) write over it.
    """
    flat: list[Any] = []
    for item in inputs:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return check_output(args.out if out is None else out, flat,
                        overwrite=existing_ok or getattr(args, "overwrite", False), flag=flag,
                        companions=companions)
