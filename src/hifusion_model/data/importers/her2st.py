"""Legacy Spatial Transcriptomics / HER2ST sections: a counts TSV and a spot selection TSV."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import SectionError
from ..sections import check_spots_inside, new_section
from ._common import (
    check_counts,
    check_unique,
    first_mpp,
    match_spots,
    numeric_columns,
    probe_slide,
    read_table,
    require_columns,
    section_name,
)
from .lattice import lattice_mpp

#: Centre-to-centre distance of legacy Spatial Transcriptomics spots (µm).
ST_PITCH_UM = 200.0
ST_SPOT_UM = 100.0


def st_mpp_from_geometry(spots: pd.DataFrame) -> tuple[float, float]:
    """µm/px and px per array step of legacy ST spots (a 200 µm lattice in ``new_x, new_y``);
    see :func:`lattice_mpp`."""
    fit = lattice_mpp(
        spots[["new_x", "new_y"]].to_numpy(float),
        spots[["pixel_x", "pixel_y"]].to_numpy(float),
        (ST_PITCH_UM, ST_PITCH_UM),
        max_anisotropy=None,
    )
    return fit.mpp, ST_PITCH_UM / fit.mpp


def _st_spot_ids(spots: pd.DataFrame, path: Path) -> pd.Index:
    xy = numeric_columns(spots, ["x", "y"], path, whole=True)
    return pd.Index([f"{int(x)}x{int(y)}" for x, y in xy], dtype=object)


def import_her2st(
    image: str | os.PathLike,
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    mpp: float | None = None,
    name: str | None = None,
) -> ad.AnnData:
    """Import a legacy ST / HER2ST section: counts TSV (rows ``<x>x<y>``) + spot selection TSV.

    Keeps the spots present in both tables (and ``selected == 1`` where that column exists).
    µm/px: ``mpp``, else the image's metadata, else the array geometry (200 µm pitch).
    """
    counts_path, spots_path = Path(counts).expanduser(), Path(spots).expanduser()
    table = read_table(spots_path, "spot table", sep="\t")
    require_columns(table, ["x", "y", "pixel_x", "pixel_y"], spots_path, "spot table")
    if "selected" in table:
        table = table[table["selected"] == 1]
    if table.empty:
        raise SectionError(
            f"{spots_path}: the spot table holds no (selected) spots; pass the spot table of a "
            "section with spots"
        )
    table.index = _st_spot_ids(table, spots_path)
    geometry_columns = [c for c in ("new_x", "new_y") if c in table.columns]
    numeric_columns(table, ["pixel_x", "pixel_y", *geometry_columns], spots_path)
    check_unique(table.index, spots_path, "spot table")

    matrix = read_table(counts_path, "count matrix", sep="\t", index_col=0)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise SectionError(
            f"{counts_path}: the count matrix is empty ({matrix.shape[0]} spots × "
            f"{matrix.shape[1]} genes); expected one row per spot and one column per gene"
        )
    if not all(pd.api.types.is_numeric_dtype(t) for t in matrix.dtypes):
        raise SectionError(
            f"{counts_path}: the count matrix holds non-numeric values; "
            "expected spots × genes counts"
        )
    matrix.index = matrix.index.astype(str)
    check_unique(matrix.index, counts_path, "count matrix")
    check_counts(matrix.to_numpy(), counts_path)

    keep, lost = match_spots(matrix.index, table.index, counts_path, spots_path)
    table = table.loc[keep]
    spatial = table[["pixel_x", "pixel_y"]].to_numpy(float)

    slide = probe_slide(image)
    geometry: tuple[float | None, str] = (None, "")
    if mpp is None and slide.mpp is None and {"new_x", "new_y"} <= set(table.columns):
        try:
            value, step = st_mpp_from_geometry(table)
            geometry = (value, f"array geometry: {step:.1f} px per {ST_PITCH_UM:.0f} µm step")
        except ValueError:
            pass
    mpp_value, origin = first_mpp(
        [(mpp, "--mpp"), (slide.mpp, "image metadata"), geometry],
        slide.path,
        "pass --mpp, or a spot table with new_x/new_y columns to derive it",
    )
    check_spots_inside(spatial, slide.shape, spots_path, slide.path)
    return new_section(
        spatial,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=ST_SPOT_UM,
        name=name or section_name(counts_path),
        source="her2st",
        label=counts_path,
        obs_names=keep,
        counts=sp.csr_matrix(matrix.loc[keep].to_numpy(np.float32)),
        genes=matrix.columns,
        array_row=table["y"].astype(int),
        array_col=table["x"].astype(int),
        extra={"mpp_source": origin, **lost},
    )
