"""Visium's spot geometry and its µm/px rule: the spot lattice first, checked against the rest.

Shared by Space Ranger ``outs/`` (:mod:`.visium`) and scanpy/squidpy AnnData
(:mod:`.scanpy_visium`), which hold the same spots in different files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import first_mpp
from .lattice import LatticeFit, lattice_mpp

VISIUM_SPOT_UM = 55.0
#: Visium spots sit on a hex array, 100 µm centre to centre (10x Visium spec): ``array_col``
#: counts half pitches along a row (neighbours in a row differ by 2), ``array_row`` counts rows
#: √3/2 pitch apart, and ``array_row + array_col`` is always even.
VISIUM_PITCH_UM = 100.0
VISIUM_STEP_UM = (VISIUM_PITCH_UM * np.sqrt(3) / 2, VISIUM_PITCH_UM / 2)  # (array_row, array_col)
#: Space Ranger's ``spot_diameter_fullres`` spans "a theoretical 65 µm spot" (10x docs), not the
#: 55 µm capture spot: 55 µm / spot_diameter_fullres reads every slide ~15 % too fine.
SCALEFACTOR_SPOT_UM = 65.0
#: Lattice and scalefactors disagreeing by more than this raise a :class:`ScaleMismatchWarning`.
SCALE_TOLERANCE = 0.05


class ScaleMismatchWarning(UserWarning):
    """Two sources of a section's µm/px disagree; the message says which one was used."""


def visium_lattice(
    grid: pd.DataFrame, spatial: np.ndarray, factors: dict[str, float]
) -> tuple[LatticeFit | None, str]:
    """µm/px of ``spatial`` (px of the image used) from the spot array, and how it was found.

    The hex Visium array (``array_row + array_col`` always even) has a 100 µm pitch; a square
    array of Visium HD bins has the pitch ``bin_size_um`` of its scale factors.
    """
    if not {"array_row", "array_col"} <= set(grid.columns) or len(grid) < 3:
        return None, "no array coordinates"
    rc = grid[["array_row", "array_col"]].to_numpy(float)
    if np.all((rc.sum(axis=1) % 2) == (rc[0].sum() % 2)):
        steps, what = VISIUM_STEP_UM, f"{VISIUM_PITCH_UM:.0f} µm hex pitch"
    elif "bin_size_um" in factors:
        steps = (factors["bin_size_um"], factors["bin_size_um"])
        what = f"{factors['bin_size_um']:g} µm square bins"
    else:
        return None, "not a hex Visium array (and no bin_size_um for square bins)"
    try:
        fit = lattice_mpp(rc, spatial, steps)
    except ValueError as e:
        return None, str(e)
    pitch_px = steps[-1] / fit.mpp
    if fit.residual_px > 0.25 * pitch_px:
        return None, f"the spots stray {fit.residual_px:.1f} px from the array (pitch {pitch_px:.1f} px)"
    return fit, f"spot lattice: {what} over {fit.n_spots} spots"


def visium_mpp(
    mpp: float | None,
    lattice: tuple[LatticeFit | None, str],
    factors: dict[str, float],
    scale: float,
    image_mpp: float | None,
    source: Path,
) -> tuple[float, str]:
    """``mpp``, else the lattice, else the scale factors, else the image's metadata; the lattice
    is checked against the other two, with a :class:`ScaleMismatchWarning` when they disagree."""
    fit, lattice_origin = lattice
    others: list[tuple[float | None, str]] = []
    if "microns_per_pixel" in factors:  # Visium HD records it
        others.append((factors["microns_per_pixel"] / scale, "scalefactors: microns_per_pixel"))
    elif "spot_diameter_fullres" in factors:
        diameter = factors["spot_diameter_fullres"] * scale
        origin = (f"scalefactors: {SCALEFACTOR_SPOT_UM:.0f} µm / spot_diameter_fullres "
                  f"{factors['spot_diameter_fullres']:g}")
        others.append((SCALEFACTOR_SPOT_UM / diameter, origin))
    if image_mpp is not None:
        others.append((image_mpp, "image metadata"))
    candidates = [(mpp, "--mpp"), (fit.mpp if fit else None, lattice_origin), *others]
    value, origin = first_mpp(candidates, source, "pass --mpp")
    if mpp is None and fit is None and lattice_origin != "no array coordinates":
        warnings.warn(
            f"{source}: the spot lattice gives no µm/px to check against ({lattice_origin}); "
            f"using {value:.4g} from {origin}",
            ScaleMismatchWarning,
            stacklevel=3,
        )
    if mpp is None and fit is not None:
        for other, where in others:
            if abs(other / fit.mpp - 1) > SCALE_TOLERANCE:
                warnings.warn(
                    f"{source}: µm/px {other:.4g} from {where} differs by "
                    f"{100 * abs(other / fit.mpp - 1):.0f} % from {fit.mpp:.4g} from the "
                    f"{lattice_origin}; using the lattice (pass --mpp to choose)",
                    ScaleMismatchWarning,
                    stacklevel=3,
                )
    return value, origin
