"""Options several subcommands share, defined once so their flags and help stay identical."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..recipes import DEFAULT_RECIPE, PRECISIONS, RECIPES

DEVICE_HELP = "auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps"


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
    p.add_argument(
        "--model-config",
        type=Path,
        metavar="FILE.json",
        help="architecture as ModelConfig JSON (default: the released architecture; e.g. a "
        "small model for quick runs)",
    )


def add_device_options(p: argparse.ArgumentParser, precision_help: str, *,
                       precision_default: str | None = None) -> None:
    """``--device``, ``--precision`` and its ``--bf16`` shorthand."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--precision", choices=PRECISIONS, default=precision_default, help=precision_help
    )
    p.add_argument(
        "--bf16",
        action="store_const",
        const="bf16",
        dest="precision",
        help="same as --precision bf16 (fast on CPUs with AVX-512 BF16 or AMX)",
    )
