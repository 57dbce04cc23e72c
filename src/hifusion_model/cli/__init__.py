"""The ``hifusion`` command line.

Each subcommand lives in :mod:`hifusion_model.cli` as a module with ``add_parser`` and
``run``. Errors a user can cause (:class:`~hifusion_model.errors.HiFusionError`, bad files)
become one line on stderr and exit code 2; ``--debug`` shows the traceback instead. So do
resource failures (a full disk, a file-size limit, a read-only or forbidden folder, no memory):
the write was atomic, so the previous file is still there. A closed pipe (``… --json | head``)
ends the command quietly.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import HiFusionError

#: Subcommand name -> (module in ``hifusion_model.cli``, the one line ``--help`` shows).
#: Only the module of the command being run is imported, so ``hifusion --version`` and
#: ``hifusion --help`` answer without loading torch.
COMMANDS = {
    "convert": ("convert", "write a slide as a tiled pyramidal OME-TIFF with its µm/px"),
    "import": ("import_", "import spots (and counts) into a section .h5ad"),
    "pretrain": ("pretrain", "pretrain an encoder on the tissue of sections (no labels needed)"),
    "train": ("train", "train a model on sections with measured expression"),
    "predict": ("predict", "predict expression on a section's spots or on a grid over a slide"),
    "pseudolabel": ("pseudolabel", "predict the tissue between a section's spots with trained "
                    "models (pseudo-labels)"),
    "evaluate": ("evaluate", "score predictions against measured expression, beside the "
                 "constant baseline"),
    "plot": ("plot", "draw one gene of a prediction file over the H&E, beside the measurement"),
    "map": ("map", "interpolate genes of a prediction file into images over the tissue "
            "(pyramidal OME-TIFF in µm)"),
    "subspot": ("subspot", "estimate genes in each of a spot's 7 × 7 HISM tiles with a HiFusion "
                "model (pyramidal OME-TIFF in µm; no ground truth at that scale)"),
    "info": ("info", "show a model's card: genes, patch sizes, training data, validation "
             "metrics"),
    "benchmark": ("benchmark", "measure accuracy on sections never seen (leave one out) or by "
                  "the paper's protocols"),
    "demo": ("demo", "open napari with the HER2ST C4 sample, predictions and truth side by side"),
}


class _OneLineHelp:
    """The subparsers object a command module sees: its parser gets the table's help line."""

    def __init__(self, subparsers: Any, help: str) -> None:
        self.subparsers, self.help = subparsers, help

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, **{**kwargs, "help": self.help})


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the named command's module is imported (the others get
    a placeholder that shows their help line). Without, every command is built in full."""
    parser = argparse.ArgumentParser(
        prog="hifusion",
        description="Predict spatial gene expression from H&E histology with HiFusion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = None if argv is None else _chosen(argv)
    for name, (module_name, help) in COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help)
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = module.add_parser(_OneLineHelp(sub, help), name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(_run=module.run)
    return parser


#: OS errors that are the machine's state, not a bug: what each means for the user.
RESOURCE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the file system's",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
#: The temporary name ``atomic_path`` writes: ``.NAME.XXXXXXXX.tmp`` beside ``NAME``.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except BrokenPipeError:  # `hifusion evaluate x --json | head`: the reader has enough
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose pipe closed


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a job scheduler) stops a command as Ctrl-C does: training leaves its
    best model and a resume state instead of dying between two writes."""
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    under_torchrun = "RANK" in os.environ  # the launcher stops its processes itself
    if under_torchrun or threading.current_thread() is not threading.main_thread():
        return _run_command(args)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return _run_command(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_command(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("hifusion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except (HiFusionError, OSError, MemoryError) as e:
        message = user_message(e, args.command)
        if args.debug or message is None:
            raise
        print(f"hifusion {args.command}: error: {message}", file=sys.stderr)
        return 2


def user_message(e: BaseException, command: str) -> str | None:
    """One line for an error a user can act on; None for a bug (its traceback is shown)."""
    if isinstance(e, HiFusionError):
        return _one_line(str(e))
    if isinstance(e, MemoryError):
        return (f"out of memory in hifusion {command}; nothing was written: free memory, or "
                "lower --batch-size and --workers (or convert a large image with hifusion "
                "convert first)")
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return _one_line(str(e))
    code, filename = _os_error(e)
    if code not in RESOURCE_ERRNOS:
        return None
    where = _real_name(filename) if filename else None
    message = f"{where or 'hifusion ' + command}: {RESOURCE_ERRNOS[code]}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return message + "; no file was replaced: check the permissions or choose another place"
    free = _free_bytes(where.parent) if where else None
    if free is not None:
        message += f" ({free / 1e9:.2g} GB free in {where.parent})"
    return message + "; no file was replaced: free some space or choose another place"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _os_error(e: BaseException) -> tuple[int | None, str | None]:
    """The errno and file of an OSError, also when a native library (h5py) puts them in text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            code, name = e.errno, e.filename
            text = str(e)
            if code is None:
                m = re.search(r"errno = (\d+)", text)
                code = int(m.group(1)) if m else None
            if name is None:
                m = re.search(r"(?:file ?name|filename) = '([^']+)'", text)
                name = m.group(1) if m else None
            if code is not None:
                return code, None if name is None else str(name)
        e = e.__cause__ or e.__context__
    return None, None


def _real_name(filename: str) -> Path:
    """The file the user asked for, not the temporary name it was being written under."""
    path = Path(filename)
    m = _TEMP_NAME.match(path.name)
    return path.with_name(m.group("name")) if m else path


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _stdout_to_devnull() -> None:
    """After a closed pipe, send what is left of stdout nowhere (Python's own advice)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured, replaced)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
