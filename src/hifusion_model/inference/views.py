"""Test-time views: the eight symmetries of the square a prediction may average over.

Torch-free at import (tensors come in through their own methods), so the CLI can state the
range in ``--help`` and check ``--tta`` without loading torch.

>>> import torch
>>> x = torch.arange(4.0).reshape(1, 2, 2)
>>> [dihedral(x, k).flatten().tolist() for k in (0, 1, 2)]
[[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 3.0, 2.0], [1.0, 3.0, 0.0, 2.0]]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Most test-time views: the symmetries of the square (4 rotations, each with and without a flip).
MAX_TTA = 8


def check_tta(tta: int) -> None:
    """Test-time views must be a count of the square's symmetries, 1 to :data:`MAX_TTA`."""
    if not 1 <= tta <= MAX_TTA:
        raise ConfigError(f"test-time views must be 1 to {MAX_TTA}, got {tta}")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th symmetry of the square on the last two axes: even ``k`` plain, odd mirrored,
    rotated by ``k // 2`` quarter turns (so ``k < 2`` is the identity and a flip)."""
    if k == 0:  # the plain view, uncopied
        return x
    return (x.flip(-1) if k % 2 else x).rot90(k // 2, dims=(-2, -1))


__all__ = ["MAX_TTA", "check_tta", "dihedral"]
