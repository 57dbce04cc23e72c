"""Turn the common spatial-transcriptomics layouts into sections (see :mod:`.sections`).

Each importer reads one layout (legacy ST / HER2ST, 10x Space Ranger, HEST-1k, a plain CSV of
spot centres), finds the full-resolution image and its µm/px, and returns a validated AnnData.
The µm/px is never guessed: each importer says where it came from (``uns['hifusion']
['mpp_source']``) or raises, because a wrong scale silently ruins every patch the model sees.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import HiFusionError, SectionError, SlideError
from .sections import check_spots_inside, new_section, read_h5ad
from .slide import Slide

#: Centre-to-centre distance of legacy Spatial Transcriptomics spots (µm).
ST_PITCH_UM = 200.0
ST_SPOT_UM = 100.0
VISIUM_SPOT_UM = 55.0
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi")
VISIUM_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


class SpotMismatchWarning(UserWarning):
    """Counts and spot table share most, but clearly not all, of their spots."""


# ----------------------------------------------------------------------------------- helpers


class _SlideFacts(NamedTuple):
    path: Path
    mpp: float | None
    shape: tuple[int, int]


def _probe_slide(image: str | os.PathLike) -> _SlideFacts:
    """Path, recorded µm/px and (H, W) of the full-resolution image, which is closed again."""
    path = Path(image).expanduser()
    if not path.is_file():
        raise SlideError(f"{path}: image not found; pass the full-resolution H&E image (--image)")
    try:
        with Slide.open(path) as slide:
            return _SlideFacts(slide.path, slide.mpp, tuple(slide.shape[:2]))
    except HiFusionError:
        raise
    except Exception as e:  # a decoder's own error for a truncated or foreign file
        raise SlideError(
            f"{path}: cannot read the image ({type(e).__name__}: {e}); is it a valid image file?"
        ) from e


def _first_mpp(
    candidates: Sequence[tuple[float | None, str]], source: str | os.PathLike, hint: str
) -> tuple[float, str]:
    """The first known µm/px among ``(value, origin)`` candidates, else a :class:`SlideError`."""
    for value, origin in candidates:
        if value is None:
            continue
        if not (np.isfinite(value) and value > 0):
            raise SlideError(f"{source}: µm/px from {origin} must be positive, got {value}")
        return float(value), origin
    raise SlideError(f"{source}: unknown µm/px (the image does not record it); {hint}")


def _read_table(path: str | os.PathLike, what: str, **kwargs) -> pd.DataFrame:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SectionError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, OSError, UnicodeDecodeError, EOFError) as e:
        raise SectionError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from e


def _require_columns(
    table: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike, what: str
) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SectionError(
            f"{path}: the {what} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, table.columns[:10]))})"
        )


def _numeric_columns(
    table: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike, *, whole: bool = False
) -> np.ndarray:
    """The columns as an (n, k) float array; a :class:`SectionError` names the first column that
    holds a missing, non-numeric or infinite value (or, with ``whole``, a fraction)."""
    values = []
    for c in columns:
        v = pd.to_numeric(table[c], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SectionError(
                f"{path}: column {c} holds {int(bad.sum())} missing, non-numeric or infinite "
                f"value(s) (e.g. {table[c].iloc[i]!r} in data row {i + 1}); fix or remove "
                "those rows"
            )
        if whole and not np.array_equal(v, np.round(v)):
            i = int(np.flatnonzero(v != np.round(v))[0])
            raise SectionError(
                f"{path}: column {c} must hold whole numbers (array coordinates), got "
                f"{table[c].iloc[i]!r} in data row {i + 1}"
            )
        values.append(v)
    return np.column_stack(values) if values else np.zeros((len(table), 0))


def _check_unique(ids: pd.Index | Sequence[str], path: str | os.PathLike, what: str) -> None:
    ids = pd.Index(ids)
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()
        raise SectionError(
            f"{path}: {len(dup)} duplicated spot ids in the {what} "
            f"(e.g. {', '.join(map(str, dup[:3]))}); "
            "each spot must appear once"
        )


def _check_counts(values: np.ndarray, path: str | os.PathLike) -> None:
    if not np.isfinite(values).all():
        raise SectionError(f"{path}: the counts hold NaN or empty values; pass raw integer counts")
    if (values < 0).any():
        raise SectionError(f"{path}: the counts hold negative values; pass raw integer counts")


def _match_spots(
    count_ids: pd.Index,
    spot_ids: pd.Index,
    counts_path: str | os.PathLike,
    spots_path: str | os.PathLike,
) -> tuple[pd.Index, dict[str, int]]:
    """Spot ids present in both tables, in count-matrix order, and how many each table lost.

    A few unmatched spots are normal (a spot table lists a spot that got no reads); an overlap
    below half of the smaller table means the files belong to different sections.
    """
    common = count_ids[count_ids.isin(spot_ids)]
    n_counts, n_spots, n_common = len(count_ids), len(spot_ids), len(common)
    if n_common < 0.5 * min(n_counts, n_spots):
        raise SectionError(
            f"{counts_path} ({n_counts} spots) and {spots_path} ({n_spots} spots) share only "
            f"{n_common} spot ids (e.g. {count_ids[0]!r} vs {spot_ids[0]!r}); "
            "pass the counts and spot table of the same section"
        )
    lost = {"counts_without_spot": n_counts - n_common, "spots_without_counts": n_spots - n_common}
    if max(lost["counts_without_spot"] / n_counts, lost["spots_without_counts"] / n_spots) > 0.1:
        warnings.warn(
            f"{counts_path} and {spots_path} share only {n_common} of {n_counts} and {n_spots} "
            "spots; "
            "check that both belong to the same section",
            SpotMismatchWarning,
            stacklevel=3,
        )
    return common, lost


def _section_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".tsv", ".csv", ".h5ad", ".txt"):
        name = name.removesuffix(suffix)
    return name


# ------------------------------------------------------------------------------- legacy ST


def st_mpp_from_geometry(spots: pd.DataFrame) -> tuple[float, float]:
    """µm/px and px per array step from a least-squares fit of pixel against array coordinates.

    Legacy ST spots sit on a 200 µm lattice, so the slope of ``pixel_x`` against the sub-spot
    ``new_x`` (and ``pixel_y`` against ``new_y``) is the pixel length of 200 µm.
    """
    steps = []
    for a, p in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        grid = spots[a].to_numpy(float)
        if np.ptp(grid) < 1:
            continue
        slope = np.polyfit(grid, spots[p].to_numpy(float), 1)[0]
        steps.append(abs(slope))
    if not steps:
        raise ValueError("the spots span less than one array step")
    px_per_step = float(np.mean(steps))
    return ST_PITCH_UM / px_per_step, px_per_step


def _st_spot_ids(spots: pd.DataFrame, path: Path) -> pd.Index:
    xy = _numeric_columns(spots, ["x", "y"], path, whole=True)
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
    table = _read_table(spots_path, "spot table", sep="\t")
    _require_columns(table, ["x", "y", "pixel_x", "pixel_y"], spots_path, "spot table")
    if "selected" in table:
        table = table[table["selected"] == 1]
    if table.empty:
        raise SectionError(
            f"{spots_path}: the spot table holds no (selected) spots; pass the spot table of a "
            "section with spots"
        )
    table.index = _st_spot_ids(table, spots_path)
    geometry_columns = [c for c in ("new_x", "new_y") if c in table.columns]
    _numeric_columns(table, ["pixel_x", "pixel_y", *geometry_columns], spots_path)
    _check_unique(table.index, spots_path, "spot table")

    matrix = _read_table(counts_path, "count matrix", sep="\t", index_col=0)
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
    _check_unique(matrix.index, counts_path, "count matrix")
    _check_counts(matrix.to_numpy(), counts_path)

    keep, lost = _match_spots(matrix.index, table.index, counts_path, spots_path)
    table = table.loc[keep]
    spatial = table[["pixel_x", "pixel_y"]].to_numpy(float)

    slide = _probe_slide(image)
    geometry: tuple[float | None, str] = (None, "")
    if mpp is None and slide.mpp is None and {"new_x", "new_y"} <= set(table.columns):
        try:
            value, step = st_mpp_from_geometry(table)
            geometry = (value, f"array geometry: {step:.1f} px per {ST_PITCH_UM:.0f} µm step")
        except ValueError:
            pass
    mpp_value, origin = _first_mpp(
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
        name=name or _section_name(counts_path),
        source="her2st",
        label=counts_path,
        obs_names=keep,
        counts=sp.csr_matrix(matrix.loc[keep].to_numpy(np.float32)),
        genes=matrix.columns,
        array_row=table["y"].astype(int),
        array_col=table["x"].astype(int),
        extra={"mpp_source": origin, **lost},
    )


# ---------------------------------------------------------------------------------- Visium


def _visium_outs(outs_dir: Path) -> Path:
    if (outs_dir / "outs" / "spatial").is_dir():
        return outs_dir / "outs"
    if not (outs_dir / "spatial").is_dir():
        raise SectionError(
            f"{outs_dir}: not a Space Ranger outs/ folder (no spatial/ inside); "
            "pass the outs folder"
        )
    return outs_dir


def read_visium_positions(outs: Path) -> pd.DataFrame:
    """In-tissue spots of ``tissue_positions.csv`` (header) or ``tissue_positions_list.csv``."""
    v2, v1 = (
        outs / "spatial" / "tissue_positions.csv",
        outs / "spatial" / "tissue_positions_list.csv",
    )
    if v2.is_file():
        table, path = _read_table(v2, "spot positions"), v2
    elif v1.is_file():
        table, path = _read_table(v1, "spot positions", header=None), v1
        if table.shape[1] != len(VISIUM_COLUMNS):
            raise SectionError(
                f"{v1}: expected {len(VISIUM_COLUMNS)} columns, found {table.shape[1]}"
            )
        table.columns = VISIUM_COLUMNS
    else:
        raise SectionError(
            f"{outs}: no spatial/tissue_positions.csv or tissue_positions_list.csv; "
            "is this a Visium run?"
        )
    _require_columns(table, VISIUM_COLUMNS, path, "spot positions")
    table = table[table["in_tissue"] == 1].set_index("barcode")
    table.index = table.index.astype(str)
    _check_unique(table.index, path, "spot positions")
    return table


def read_10x_h5(path: Path) -> ad.AnnData:
    """Read a Cell/Space Ranger ≥ 3 feature-barcode matrix (HDF5, CSC genes × barcodes)."""
    if not path.is_file():
        raise SectionError(
            f"{path}: count matrix not found; "
            "Space Ranger writes filtered_feature_bc_matrix.h5 in outs/"
        )
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(s) for s in m["shape"][:])
            X = sp.csc_matrix(
                (m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape
            ).T.tocsr()
            barcodes = m["barcodes"][:].astype(str)
            features = m["features"]
            names = features["name"][:].astype(str)
            ids = features["id"][:].astype(str)
            kind = features["feature_type"][:].astype(str) if "feature_type" in features else None
    except (OSError, KeyError, ValueError) as e:
        raise SectionError(
            f"{path}: not a readable 10x feature-barcode matrix ({type(e).__name__}: {e}); "
            "pass Space Ranger's filtered_feature_bc_matrix.h5"
        ) from e
    if kind is not None:  # drop antibody / CRISPR features: only genes are predicted
        genes = kind == "Gene Expression"
        X, names, ids = X[:, genes], names[genes], ids[genes]
    var = pd.DataFrame({"gene_ids": ids}, index=ad.utils.make_index_unique(pd.Index(names)))
    adata = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=barcodes), var=var)
    _check_counts(adata.X.data, path)
    return adata


def _find_image(folders: Sequence[Path], where: Path) -> Path:
    found = sorted(
        {
            p
            for d in folders
            if d.is_dir()
            for p in d.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES
        }
    )
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


def import_visium(
    outs_dir: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> ad.AnnData:
    """Import a 10x Visium Space Ranger ``outs/`` folder (in-tissue spots only).

    µm/px: ``mpp``, else 55 µm / ``spot_diameter_fullres`` from ``scalefactors_json.json``, else
    the image's metadata.
    """
    outs = _visium_outs(Path(outs_dir).expanduser())
    positions = read_visium_positions(outs)
    matrix = read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    keep, lost = _match_spots(
        matrix.obs_names, positions.index, outs / "filtered_feature_bc_matrix.h5", outs / "spatial"
    )
    positions = positions.loc[keep]

    slide = _probe_slide(image if image is not None else _find_image([outs, outs.parent], outs))
    diameter_px = _visium_spot_diameter(outs / "spatial" / "scalefactors_json.json")
    mpp_value, origin = _first_mpp(
        [
            (mpp, "--mpp"),
            (
                None if diameter_px is None else VISIUM_SPOT_UM / diameter_px,
                f"scalefactors: {VISIUM_SPOT_UM:.0f} µm / spot_diameter_fullres {diameter_px}",
            ),
            (slide.mpp, "image metadata"),
        ],
        slide.path,
        "pass --mpp",
    )
    spatial = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    check_spots_inside(spatial, slide.shape, outs / "spatial", slide.path)
    return new_section(
        spatial,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=VISIUM_SPOT_UM,
        name=name or (outs.parent.name if outs.name == "outs" else outs.name),
        source="visium",
        label=outs,
        obs_names=keep,
        counts=matrix[keep].X,
        genes=matrix.var_names,
        array_row=positions["array_row"].astype(int),
        array_col=positions["array_col"].astype(int),
        extra={"mpp_source": origin, **lost},
    )


def _visium_spot_diameter(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())["spot_diameter_fullres"]
        return float(value)
    except (ValueError, KeyError, TypeError) as e:
        raise SectionError(
            f"{path}: cannot read spot_diameter_fullres ({type(e).__name__}: {e})"
        ) from e


# ------------------------------------------------------------------------------------ HEST


def _hest_metadata(h5ad: Path, metadata_json: str | os.PathLike | None) -> tuple[dict, Path | None]:
    """The sample's metadata: the given JSON, else `<id>.json` beside it or in ../metadata/."""
    if metadata_json is not None:
        path = Path(metadata_json).expanduser()
        if not path.is_file():
            raise SectionError(f"{path}: metadata JSON not found")
    else:
        candidates = [
            h5ad.with_suffix(".json"),
            h5ad.parent.parent / "metadata" / f"{h5ad.stem}.json",
        ]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return {}, None
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SectionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise SectionError(f"{path}: expected a JSON object of sample metadata")
    return meta, path


def _hest_spot_diameter(meta: dict, source: Path | None, h5ad: Path) -> float:
    if meta.get("spot_diameter") is not None:
        return float(meta["spot_diameter"])
    tech = str(meta.get("st_technology", "")).lower()
    if "visium" in tech:
        return VISIUM_SPOT_UM
    if "spatial transcriptomics" in tech or tech == "st":
        return ST_SPOT_UM
    raise SectionError(
        f"{source or h5ad}: cannot tell the spot diameter "
        "(no spot_diameter or known st_technology); "
        "pass the sample's HEST metadata JSON (--metadata)"
    )


def _hest_image(h5ad: Path, image: str | os.PathLike | None) -> Path:
    if image is not None:
        return Path(image)
    candidates = [h5ad.parent.parent / "wsis" / f"{h5ad.stem}{s}" for s in IMAGE_SUFFIXES]
    candidates += [h5ad.with_suffix(s) for s in IMAGE_SUFFIXES]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise SlideError(f"{h5ad}: no image {h5ad.stem}.tif beside it or in ../wsis/; pass --image")
    return found


def _hest_spatial(adata: ad.AnnData, path: Path) -> np.ndarray:
    if "spatial" in adata.obsm:
        return np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        return adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    raise SectionError(
        f"{path}: no spot centres (neither obsm['spatial'] nor obs pxl_col/row_in_fullres)"
    )


def import_hest(
    h5ad: str | os.PathLike,
    metadata_json: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> ad.AnnData:
    """Import a HEST-1k sample: ``st/<id>.h5ad`` + ``metadata/<id>.json`` + ``wsis/<id>.tif``.

    µm/px: ``mpp``, else ``pixel_size_um_estimated`` (then ``_embedded``) from the metadata, else
    the image's metadata.
    """
    path = Path(h5ad).expanduser()
    adata = read_h5ad(path, "HEST .h5ad not found")
    meta, meta_path = _hest_metadata(path, metadata_json)
    spatial = _hest_spatial(adata, path)
    _check_unique(adata.obs_names, path, "AnnData")
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    _check_counts(values, path)

    slide = _probe_slide(_hest_image(path, image))
    meta_mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    mpp_value, origin = _first_mpp(
        [
            (mpp, "--mpp"),
            (None if meta_mpp is None else float(meta_mpp), f"metadata {meta_path}"),
            (slide.mpp, "image metadata"),
        ],
        path,
        "pass --metadata with the sample's HEST JSON, or --mpp",
    )
    check_spots_inside(spatial, slide.shape, path, slide.path)
    genes = adata.var_names.copy()
    if not genes.is_unique:
        adata.var_names_make_unique()
        genes = adata.var_names
    obs = adata.obs
    return new_section(
        spatial,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=_hest_spot_diameter(meta, meta_path, path),
        name=name or str(meta.get("id") or path.stem),
        source="hest",
        label=path,
        obs_names=adata.obs_names,
        counts=adata.X,
        genes=genes,
        array_row=obs["array_row"].astype(int) if "array_row" in obs else None,
        array_col=obs["array_col"].astype(int) if "array_col" in obs else None,
        extra={"mpp_source": origin},
    )


# ------------------------------------------------------------------------------------- CSV

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
    table = _read_table(path, "spot CSV")
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
    xy = _numeric_columns(table, cols, path)
    grid = {c: _numeric_columns(table, [c], path, whole=True)[:, 0].astype(np.int64)
            for c in ("array_row", "array_col") if c in table}
    id_col = next((c for c in ("id", "barcode") if c in table.columns), None)
    ids = pd.Index(
        table[id_col].astype(str) if id_col else [f"spot_{i:05d}" for i in range(len(table))]
    )
    _check_unique(ids, path, "spot CSV")

    slide = _probe_slide(image)
    mpp_value, origin = _first_mpp(
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
        name=name or _section_name(path),
        source="csv",
        label=path,
        obs_names=ids,
        array_row=grid.get("array_row"),
        array_col=grid.get("array_col"),
        extra={"mpp_source": origin},
    )
