"""The package's layers: networks and data never reach up into training, evaluation or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hifusion_model

PACKAGE = Path(hifusion_model.__file__).parent
#: the layers above networks and data, which those must never import (not even lazily)
ABOVE = {"engine", "evaluation", "inference", "cli", "future"}


def imported(source: str, package: tuple[str, ...]) -> set[str]:
    """Every ``hifusion_model`` subpackage that ``source`` (a module of ``package``, e.g.
    ``("hifusion_model", "models")``) imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            parts = [*base, *(node.module or "").split(".")]
        elif isinstance(node, ast.Import):
            parts = node.names[0].name.split(".")
        else:
            continue
        if parts[0] == "hifusion_model" and len(parts) > 1:
            found.add(parts[1])
    return found


def test_the_layer_check_sees_relative_absolute_and_lazy_imports():
    source = ("from .config import ModelConfig\n"
              "def f():\n    from ..engine.card import ModelCard\n"
              "import hifusion_model.cli.main\n")
    assert imported(source, ("hifusion_model", "models")) == {"models", "engine", "cli"}


@pytest.mark.parametrize("layer", ["models", "data"])
def test_networks_and_data_import_nothing_above_them(layer):
    offenders = sorted(
        f"{path.name} imports {name}"
        for path in (PACKAGE / layer).glob("*.py")
        for name in imported(path.read_text(), ("hifusion_model", layer)) & ABOVE
    )
    assert not offenders
