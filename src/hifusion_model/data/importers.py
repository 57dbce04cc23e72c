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

from ..errors import HiFusionError, SectionError, SlideError
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
VISIUM_IMAGES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


class ScaleMismatchWarning(UserWarning):
    """Two sources of a section's µm/px disagree; the message says which one was used."""


class CoarseImageWarning(UserWarning):
    """No full-resolution image: the spots are placed on a downsampled one (hires/lowres)."""


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
        table = _read_table(path, "spot positions", header=0 if header else None)
        if not header:
            if table.shape[1] != len(VISIUM_COLUMNS):
                raise SectionError(
                    f"{path}: expected {len(VISIUM_COLUMNS)} columns "
                    f"({', '.join(VISIUM_COLUMNS)}), found {table.shape[1]}"
                )
            table.columns = VISIUM_COLUMNS
    _require_columns(table, VISIUM_COLUMNS, path, "spot positions")
    _numeric_columns(table, VISIUM_COLUMNS[1:], path)
    table = table.set_index("barcode")
    table.index = table.index.astype(str)
    _check_unique(table.index, path, "spot positions")
    return table, path


def read_visium_positions(outs: Path) -> pd.DataFrame:
    """In-tissue spots of the run's spot positions (see :func:`_visium_positions`)."""
    table, _ = _visium_positions(outs)
    return table[table["in_tissue"] == 1]


def _feature_matrix(X: sp.spmatrix, barcodes, names, ids, kind, path: Path) -> ad.AnnData:
    """Cells × genes AnnData from 10x features (antibody and CRISPR features dropped)."""
    names, ids = np.asarray(names, dtype=str), np.asarray(ids, dtype=str)
    if kind is not None:  # only genes are predicted
        genes = np.asarray(kind, dtype=str) == "Gene Expression"
        X, names, ids = X[:, genes], names[genes], ids[genes]
    var = pd.DataFrame({"gene_ids": ids}, index=ad.utils.make_index_unique(pd.Index(names)))
    adata = ad.AnnData(
        X=sp.csr_matrix(X, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=str), dtype=object)),
        var=var,
    )
    _check_counts(adata.X.data, path)
    return adata


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
    return _feature_matrix(X, barcodes, names, ids, kind, path)


def _mtx_file(folder: Path, *names: str) -> Path:
    for name in names:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise SectionError(
        f"{folder}: no {' or '.join(names)}(.gz); a 10x matrix folder holds barcodes.tsv.gz, "
        "features.tsv.gz and matrix.mtx.gz"
    )


def read_10x_mtx(folder: Path) -> ad.AnnData:
    """Read a 10x matrix folder (``matrix.mtx``, ``barcodes.tsv``, ``features.tsv`` or the older
    ``genes.tsv``, each optionally gzipped), as ``scanpy.read_10x_mtx`` does."""
    import gzip

    import scipy.io

    matrix_path = _mtx_file(folder, "matrix.mtx")
    barcodes_path = _mtx_file(folder, "barcodes.tsv")
    features_path = _mtx_file(folder, "features.tsv", "genes.tsv")
    try:
        opener = gzip.open if matrix_path.suffix == ".gz" else open
        with opener(matrix_path, "rb") as f:
            X = sp.csr_matrix(scipy.io.mmread(f)).T.tocsr()  # genes × barcodes on disk
        barcodes = pd.read_csv(barcodes_path, sep="\t", header=None, dtype=str)[0]
        features = pd.read_csv(features_path, sep="\t", header=None, dtype=str)
    except (ValueError, OSError, EOFError, IndexError) as e:
        raise SectionError(
            f"{folder}: not a readable 10x matrix folder ({type(e).__name__}: {e}); pass "
            "Space Ranger's filtered_feature_bc_matrix/"
        ) from e
    if X.shape != (len(barcodes), len(features)):
        raise SectionError(
            f"{matrix_path}: the matrix is {X.shape[1]} features × {X.shape[0]} barcodes, but "
            f"the folder lists {len(features)} features and {len(barcodes)} barcodes; "
            "the files belong to different runs"
        )
    names = features[1] if features.shape[1] > 1 else features[0]
    kind = features[2] if features.shape[1] > 2 else None
    return _feature_matrix(X, barcodes, names, features[0], kind, matrix_path)


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


def _visium_lattice(
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


def _visium_mpp(
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
    value, origin = _first_mpp(candidates, source, "pass --mpp")
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
    keep, lost = _match_spots(matrix.obs_names, positions.index, matrix_path, positions_path)
    positions = positions.loc[keep]

    factors = _visium_scalefactors(outs / "spatial" / "scalefactors_json.json")
    image_path, scale, kind = _visium_image(outs, image, factors)
    slide = _probe_slide(image_path)
    columns = ["pxl_col_in_fullres", "pxl_row_in_fullres"]
    lattice = _visium_lattice(every_spot, every_spot[columns].to_numpy(float) * scale, factors)
    mpp_value, origin = _visium_mpp(
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


# ------------------------------------------------------------------------ scanpy / squidpy


def _spatial_library(adata: ad.AnnData, path: Path, library_id: str | None) -> tuple[str, dict]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        raise SectionError(
            f"{path}: not a scanpy/squidpy Visium AnnData (no uns['spatial'][library]); "
            "read the run with scanpy.read_visium or import its Space Ranger outs/ folder"
        )
    if library_id is None:
        if len(spatial) > 1:
            raise SectionError(
                f"{path}: uns['spatial'] holds {len(spatial)} libraries "
                f"({', '.join(map(str, spatial))}); subset the AnnData to one library first"
            )
        library_id = next(iter(spatial))
    if library_id not in spatial or not isinstance(spatial[library_id], dict):
        raise SectionError(
            f"{path}: no library {library_id!r} in uns['spatial'] "
            f"(has {', '.join(map(str, spatial))})"
        )
    return str(library_id), spatial[library_id]


def _is_raw_counts(matrix) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return (
        np.issubdtype(values.dtype, np.number)
        and bool(np.isfinite(values).all())
        and not (values < 0).any()
        and np.array_equal(values, np.round(values))
    )


def _raw_counts(adata: ad.AnnData, path: Path) -> tuple[object, pd.Index, str]:
    """The raw counts of a scanpy AnnData: ``X``, else ``layers['counts']``, else ``.raw``."""
    if _is_raw_counts(adata.X):
        return adata.X, adata.var_names, "X"
    if "counts" in adata.layers and _is_raw_counts(adata.layers["counts"]):
        return adata.layers["counts"], adata.var_names, "layers['counts']"
    if adata.raw is not None and _is_raw_counts(adata.raw.X):
        return adata.raw.X, adata.raw.var_names, "raw.X"
    raise SectionError(
        f"{path}: X holds normalised values and neither layers['counts'] nor .raw holds raw "
        "counts; import the run's Space Ranger outs/ folder, or keep the raw counts in "
        "layers['counts']"
    )


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    """scanpy keeps PNGs as float32 in [0, 1] (matplotlib's imread); the core wants uint8 RGB."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round()
    return a.astype(np.uint8)


def _embedded_image(path: Path, library_id: str, lib: dict) -> tuple[Path, str]:
    """Write the AnnData's own hires (else lowres) image beside it, once, as a PNG slide."""
    from PIL import Image

    from ..io_utils import atomic_path

    images = lib.get("images") or {}
    kind = next((k for k in ("hires", "lowres") if k in images), None)
    if kind is None:
        raise SlideError(
            f"{path}: uns['spatial'][{library_id!r}] holds no hires or lowres image and "
            "no source_image_path; pass --image"
        )
    out = path.with_name(f"{path.stem}.{library_id}.{kind}.png")
    pixels = _as_rgb8(images[kind])
    if not out.is_file() or Image.open(out).size != (pixels.shape[1], pixels.shape[0]):
        try:
            with atomic_path(out) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
        except OSError as e:
            raise SlideError(
                f"{out}: cannot write the AnnData's {kind} image as the slide ({e}); "
                "pass --image"
            ) from e
    warnings.warn(
        f"{path}: no full-resolution image, so the spots are placed on its own {kind} image "
        f"(saved as {out.name}); predictions on it are coarse, pass the full-resolution image "
        "for better ones",
        CoarseImageWarning,
        stacklevel=3,
    )
    return out, kind


def import_scanpy_visium(
    h5ad: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    name: str | None = None,
    library_id: str | None = None,
) -> ad.AnnData:
    """Import a scanpy/squidpy Visium AnnData (``scanpy.read_visium``, ``squidpy.read.visium``).

    Spots: ``obsm['spatial']`` (full-resolution px); counts: ``X``, ``layers['counts']`` or
    ``.raw``, whichever holds raw counts. Image: ``image``, else ``uns['spatial'][library]
    ['metadata']['source_image_path']``, else the AnnData's own hires/lowres image (written
    beside it as a PNG; spots scaled by its scalefactor). µm/px as :func:`import_visium`.
    """
    path = Path(h5ad).expanduser()
    adata = read_h5ad(path, "AnnData not found")
    library_id, lib = _spatial_library(adata, path, library_id)
    if "spatial" not in adata.obsm:
        raise SectionError(f"{path}: no spot centres in obsm['spatial']")
    _check_unique(adata.obs_names, path, "AnnData")
    counts, genes, _ = _raw_counts(adata, path)
    factors = {
        k: float(v) for k, v in (lib.get("scalefactors") or {}).items()
        if isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0
    }
    source_image = (lib.get("metadata") or {}).get("source_image_path")
    if image is not None:
        image_path, scale, kind = Path(image).expanduser(), 1.0, "fullres"
    elif source_image and Path(str(source_image)).expanduser().is_file():
        image_path, scale, kind = Path(str(source_image)).expanduser(), 1.0, "fullres"
    else:
        image_path, kind = _embedded_image(path, library_id, lib)
        key = f"tissue_{kind}_scalef"
        if key not in factors:
            raise SectionError(
                f"{path}: uns['spatial'][{library_id!r}]['scalefactors'] lacks {key}, so the "
                "spots cannot be placed on its image; pass --image"
            )
        scale = factors[key]
    slide = _probe_slide(image_path)
    spatial = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2] * scale
    lattice = _visium_lattice(adata.obs, spatial, factors)
    mpp_value, origin = _visium_mpp(
        mpp, lattice, factors, scale, slide.mpp if kind == "fullres" else None, slide.path
    )
    check_spots_inside(spatial, slide.shape, path, slide.path)
    obs = adata.obs
    extra = {"mpp_source": origin, "library_id": library_id}
    if kind != "fullres":
        extra["fullres_scale"] = scale
    if not pd.Index(genes).is_unique:
        genes = ad.utils.make_index_unique(pd.Index(genes))
    return new_section(
        spatial,
        slide=slide.path,
        mpp=mpp_value,
        spot_diameter_um=factors.get("bin_size_um", VISIUM_SPOT_UM),
        name=name or library_id,
        source="scanpy",
        label=path,
        obs_names=adata.obs_names,
        counts=counts,
        genes=genes,
        array_row=obs["array_row"].astype(int) if "array_row" in obs else None,
        array_col=obs["array_col"].astype(int) if "array_col" in obs else None,
        extra=extra,
    )


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
