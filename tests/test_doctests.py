"""Every ``>>>`` example in the core runs: a docstring that shows the API cannot drift from it.

Modules are found by walking the package, so a new module's examples are tested without being
listed here. Examples that need real files or minutes carry ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hifusion_model


def _modules_with_examples() -> list[str]:
    names = [hifusion_model.__name__]
    names += [m.name for m in pkgutil.walk_packages(hifusion_model.__path__,
                                                    prefix=f"{hifusion_model.__name__}.")]
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                if ">>>" in f.read():
                    found.append(name)
    return found


MODULES = _modules_with_examples()


def test_the_walk_finds_the_public_api_examples() -> None:
    assert {"hifusion_model.api", "hifusion_model.models.registry"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
