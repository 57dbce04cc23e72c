"""µm/px from a spot array: the array says how far apart the spots are in µm, the image in px."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class LatticeFit(NamedTuple):
    """µm/px from a spot array: pixel length of one array step per axis, and the fit's error."""

    mpp: float
    px_per_step: tuple[float, ...]
    residual_px: float
    n_spots: int


def lattice_mpp(
    grid: np.ndarray,
    pixels: np.ndarray,
    um_per_step: Sequence[float],
    max_anisotropy: float | None = 0.05,
) -> LatticeFit:
    """µm/px from a least-squares affine fit of spot pixel centres on their array coordinates.

    The one rule for every spot array (legacy ST, Visium): the array says how many µm apart
    spots are (``um_per_step`` per array axis), the image says how many px; an affine fit
    absorbs any rotation or flip of the image against the array, so the pixel length of one
    step along axis ``j`` is the norm of the fit's ``j``-th column. Axes the spots do not span
    are left out. ``ValueError`` when the spots fix no scale, or when the axes' scales differ
    by more than ``max_anisotropy`` (the array is not the assumed one).

    >>> grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])  # a 200 µm array, 400 px a step
    >>> round(lattice_mpp(grid, grid[:, ::-1] * 400.0, (200.0, 200.0)).mpp, 6)
    0.5
    """
    grid = np.asarray(grid, dtype=float).reshape(len(grid), -1)
    pixels = np.asarray(pixels, dtype=float)[:, :2]
    steps_um = np.asarray(um_per_step, dtype=float)
    axes = [j for j in range(grid.shape[1]) if np.ptp(grid[:, j]) >= 1] if len(grid) else []
    if not axes:
        raise ValueError("the spots span less than one array step")
    design = np.column_stack([grid[:, axes], np.ones(len(grid))])
    if len(grid) <= len(axes) or np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError("the spots lie on one line of the array")
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    px_per_step = np.hypot(coef[:-1, 0], coef[:-1, 1])
    if not (px_per_step > 0).all():
        raise ValueError("the spot pixel positions do not change along the array")
    px_per_um = px_per_step / steps_um[axes]
    if max_anisotropy is not None and px_per_um.max() > (1 + max_anisotropy) * px_per_um.min():
        raise ValueError(
            "the array axes give different scales "
            f"({', '.join(f'{1 / v:.4g}' for v in px_per_um)} µm/px)"
        )
    residual = pixels - design @ coef
    rms = float(np.sqrt((residual**2).sum(axis=1).mean()))
    return LatticeFit(
        float(1 / px_per_um.mean()), tuple(float(v) for v in px_per_step), rms, len(grid)
    )
