"""10x Visium Space Ranger ``outs/`` folders: spot positions, counts, image and µm/px.

Counts come through :mod:`.tenx_matrix`; a scanpy/squidpy AnnData goes to :mod:`.scanpy_visium`,
and both take their µm/px from :mod:`.visium_scale`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ...errors import SectionError, SlideError
from ..sections import check_spots_inside, new_section
from ._common import (
    IMAGE_SUFFIXES,
    CoarseImageWarning,
    check_unique,
    match_spots,
    numeric_columns,
    probe_slide,
    read_table,
    require_columns,
)
from .scanpy_visium import import_scanpy_visium
from .tenx_matrix import read_10x_h5, read_10x_mtx
from .visium_scale import VISIUM_SPOT_UM, visium_lattice, visium_mpp

VISIUM_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
VISIUM_IMAGES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


def _visium_outs(outs_dir: Path) -> Path:
    if (outs_dir / "outs" / "spatial").is_dir():
        return outs_dir / "outs"
    if not (outs_dir / "spatial").is_dir():
        raise SectionError(
            f"{outs_dir}: not a Space Ranger outs/ folder (no spatial/ inside); "
            "pass the outs folder"
        )
    return outs_dir


def _read_parquet(path: Path) -> pd.DataFrame:
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise SectionError(
            f"{path}: reading a .parquet spot table needs pyarrow; install it "
            "(pip install pyarrow) or convert the table to tissue_positions.csv"
        )
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as e:
        raise SectionError(f"{path}: cannot read the spot positions ({type(e).__name__}: {e})") from e


def _visium_positions(outs: Path) -> tuple[pd.DataFrame, Path]:
    """Every spot of the run (on and off tissue), indexed by barcode, and the file it came from.

    ``tissue_positions.parquet`` (Visium HD), ``tissue_positions.csv`` (Space Ranger ≥ 2, with a
    header) or ``tissue_positions_list.csv`` (earlier, without); a header is recognised either way.
    """
    spatial = outs / "spatial"
    names = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
    path = next((spatial / n for n in names if (spatial / n).is_file()), None)
    if path is None:
        raise SectionError(
            f"{outs}: no spatial/tissue_positions.csv, tissue_positions_list.csv or "
            "tissue_positions.parquet; is this a Visium run?"
        )
    if path.suffix == ".parquet":
        table = _read_parquet(path)
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().lstrip("\ufeff").startswith("barcode")
        table = read_table(path, "spot positions", header=0 if header else None)
        if not header:
            if table.shape[1] != len(VISIUM_COLUMNS):
                raise SectionError(
                    f"{path}: expected {len(VISIUM_COLUMNS)} columns "
                    f"({', '.join(VISIUM_COLUMNS)}), found {table.shape[1]}"
                )
            table.columns = VISIUM_COLUMNS
    require_columns(table, VISIUM_COLUMNS, path, "spot positions")
    numeric_columns(table, VISIUM_COLUMNS[1:], path)
    table = table.set_index("barcode")
    table.index = table.index.astype(str)
    check_unique(table.index, path, "spot positions")
    return table, path


def _visium_matrix(outs: Path) -> tuple[ad.AnnData, Path]:
    h5, mtx = outs / "filtered_feature_bc_matrix.h5", outs / "filtered_feature_bc_matrix"
    if h5.is_file():
        return read_10x_h5(h5), h5
    if mtx.is_dir():
        return read_10x_mtx(mtx), mtx
    raise SectionError(
        f"{outs}: count matrix not found (neither filtered_feature_bc_matrix.h5 nor a "
        "filtered_feature_bc_matrix/ folder); pass a Space Ranger outs/ folder"
    )


def _images_in(folders: Sequence[Path]) -> list[Path]:
    return sorted(
        {
            p
            for d in folders
            if d.is_dir()
            for p in d.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES
        }
    )


def _find_image(folders: Sequence[Path], where: Path) -> Path:
    found = _images_in(folders)
    if len(found) == 1:
        return found[0]
    if not found:
        raise SlideError(
            f"{where}: no full-resolution image (*.tif, *.tiff, *.btf) found beside it; "
            "pass --image"
        )
    raise SlideError(
        f"{where}: several candidate images ({', '.join(p.name for p in found)}); pass --image"
    )


def _visium_scalefactors(path: Path) -> dict[str, float]:
    """The numeric entries of ``scalefactors_json.json`` (empty when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        factors = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise SectionError(f"{path}: cannot read the scale factors ({type(e).__name__}: {e})") from e
    bad = [k for k, v in factors.items() if not (np.isfinite(v) and v > 0)]
    if bad:
        raise SectionError(f"{path}: {bad[0]} must be a positive number, got {raw[bad[0]]!r}")
    return factors


def _image_scale(path: Path, factors: dict[str, float], where: Path) -> tuple[float, str]:
    """Full-resolution px → ``path``'s px: 1, or the scalefactor of a hires/lowres PNG."""
    for kind, name in VISIUM_IMAGES.items():
        if path.name == name:
            key = f"tissue_{kind}_scalef"
            if key not in factors:
                raise SectionError(
                    f"{where}: {name} needs {key} from spatial/scalefactors_json.json to place "
                    "the spots; restore that file or pass the full-resolution image"
                )
            return factors[key], kind
    return 1.0, "fullres"


def _visium_image(
    outs: Path, image: str | os.PathLike | None, factors: dict[str, float]
) -> tuple[Path, float, str]:
    """The image to use, the factor from full-resolution px to its px, and its kind.

    Without ``image``: the only full-resolution image beside ``outs/``, else Space Ranger's
    ``spatial/tissue_hires_image.png`` (then the lowres one), with a warning, because the model
    then sees tissue at a few µm/px where it was trained at well under one.
    """
    if image is not None:
        path = Path(image).expanduser()
        scale, kind = _image_scale(path, factors, outs)
        return path, scale, kind
    if _images_in([outs, outs.parent]):
        return _find_image([outs, outs.parent], outs), 1.0, "fullres"
    for kind, name in VISIUM_IMAGES.items():
        path = outs / "spatial" / name
        if path.is_file():
            scale, kind = _image_scale(path, factors, outs)
            warnings.warn(
                f"{outs}: no full-resolution image beside it, so the spots are placed on "
                f"spatial/{name} (×{scale:.4g}); predictions on it are coarse, pass the "
                "full-resolution image for better ones",
                CoarseImageWarning,
                stacklevel=3,
            )
            return path, scale, kind
    raise SlideError(
        f"{outs}: no full-resolution image (*.tif, *.tiff, *.btf) beside it and no "
        f"spatial/{VISIUM_IMAGES['hires']}; pass --image"
    )


def import_visium(
    outs_dir: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> ad.AnnData:
    """Import a 10x Visium Space Ranger ``outs/`` folder (in-tissue spots only), or a
    scanpy/squidpy Visium ``.h5ad`` (see :func:`import_scanpy_visium`).

    Counts: ``filtered_feature_bc_matrix.h5``, else the ``filtered_feature_bc_matrix/`` folder.
    Image: ``image``, else the only full-resolution image beside ``outs/``, else
    ``spatial/tissue_hires_image.png`` (spots scaled by ``tissue_hires_scalef``).
    µm/px: ``mpp``, else the spot lattice (:func:`lattice_mpp`, 100 µm pitch), else the scale
    factors (65 µm / ``spot_diameter_fullres``), else the image's metadata.
    """
    source = Path(outs_dir).expanduser()
    if source.suffix == ".h5ad" and not source.is_dir():
        return import_scanpy_visium(source, image=image, mpp=mpp, name=name)
    outs = _visium_outs(source)
    every_spot, positions_path = _visium_positions(outs)
    positions = every_spot[every_spot["in_tissue"] == 1]
    matrix, matrix_path = _visium_matrix(outs)
    keep, lost = match_spots(matrix.obs_names, positions.index, matrix_path, positions_path)
    positions = positions.loc[keep]

    factors = _visium_scalefactors(outs / "spatial" / "scalefactors_json.json")
    image_path, scale, kind = _visium_image(outs, image, factors)
    slide = probe_slide(image_path)
    columns = ["pxl_col_in_fullres", "pxl_row_in_fullres"]
    lattice = visium_lattice(every_spot, every_spot[columns].to_numpy(float) * scale, factors)
    mpp_value, origin = visium_mpp(
        mpp, lattice, factors, scale, slide.mpp if kind == "fullres" else None, slide.path
    )
    spatial = positions[columns].to_numpy(float) * scale
    check_spots_inside(spatial, slide.shape, positions_path, slide.path)
    extra = {"mpp_source": origin, **lost}
    if kind != "fullres":
        extra["fullres_scale"] = scale
    return new_section(
        spatial,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=factors.get("bin_size_um", VISIUM_SPOT_UM),
        name=name or (outs.parent.name if outs.name == "outs" else outs.name),
        source="visium",
        label=outs,
        obs_names=keep,
        counts=matrix[keep].X,
        genes=matrix.var_names,
        array_row=positions["array_row"].astype(int),
        array_col=positions["array_col"].astype(int),
        extra=extra,
    )
