"""The ``hifusion`` command line.

Each subcommand lives in :mod:`hifusion_model.commands` as a module with ``add_parser`` and
``run``. Errors a user can cause (:class:`~hifusion_model.errors.HiFusionError`, bad files)
become one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import HiFusionError

#: Subcommand name -> module in ``hifusion_model.commands``.
COMMANDS = {
    "convert": "convert",
    "import": "import_",
    "pretrain": "pretrain",
    "train": "train",
    "predict": "predict",
    "pseudolabel": "pseudolabel",
    "evaluate": "evaluate",
    "soup": "soup",
    "info": "info",
    "benchmark": "benchmark",
    "demo": "demo",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"{__package__}.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.commands.{module}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hifusion",
        description="Predict spatial gene expression from H&E histology with HiFusion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _available_commands().items():
        p = module.add_parser(sub, name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("hifusion: interrupted", file=sys.stderr)
        return 130
    except (HiFusionError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"hifusion {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
