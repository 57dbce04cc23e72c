"""Spot centres without counts, from a CSV (to predict at chosen spots)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ...errors import SectionError
from ..sections import check_spots_inside, new_section
from ._common import (
    check_unique,
    first_mpp,
    numeric_columns,
    probe_slide,
    read_table,
    section_name,
)
from .visium_scale import VISIUM_SPOT_UM

_CSV_COORDS = (("x", "y"), ("pxl_col_in_fullres", "pxl_row_in_fullres"), ("x_um", "y_um"))


def import_csv(
    csv: str | os.PathLike,
    image: str | os.PathLike,
    mpp: float | None = None,
    units: str = "px",
    name: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_UM,
) -> ad.AnnData:
    """Import spot centres (no counts) from a CSV.

    Coordinates are columns ``x, y``, ``pxl_col_in_fullres, pxl_row_in_fullres`` or ``x_um, y_um``.

    ``units`` applies to ``x, y`` (``x_um, y_um`` are always µm); an ``id`` or ``barcode`` column
    names the spots.
    """
    if units not in ("px", "um"):
        raise SectionError(f"units must be 'px' or 'um', got {units!r}")
    path = Path(csv).expanduser()
    table = read_table(path, "spot CSV")
    cols = next((c for c in _CSV_COORDS if set(c) <= set(table.columns)), None)
    if cols is None:
        raise SectionError(
            f"{path}: no spot-centre columns; expected x,y or "
            "pxl_col_in_fullres,pxl_row_in_fullres or "
            f"x_um,y_um (has {', '.join(map(str, table.columns[:10]))})"
        )
    if table.empty:
        raise SectionError(f"{path}: the spot CSV holds no spots (only a header); add one row "
                           "per spot")
    xy = numeric_columns(table, cols, path)
    grid = {c: numeric_columns(table, [c], path, whole=True)[:, 0].astype(np.int64)
            for c in ("array_row", "array_col") if c in table}
    id_col = next((c for c in ("id", "barcode") if c in table.columns), None)
    ids = pd.Index(
        table[id_col].astype(str) if id_col else [f"spot_{i:05d}" for i in range(len(table))]
    )
    check_unique(ids, path, "spot CSV")

    slide = probe_slide(image)
    mpp_value, origin = first_mpp(
        [(mpp, "--mpp"), (slide.mpp, "image metadata")], slide.path, "pass --mpp"
    )
    if cols == ("x_um", "y_um") or units == "um":
        xy = xy / mpp_value
    check_spots_inside(xy, slide.shape, path, slide.path)
    return new_section(
        xy,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=spot_diameter_um,
        name=name or section_name(path),
        source="csv",
        label=path,
        obs_names=ids,
        array_row=grid.get("array_row"),
        array_col=grid.get("array_col"),
        extra={"mpp_source": origin},
    )
