"""Sections: spots (and their counts) on one slide, stored as a HEST-1k-compatible ``.h5ad``.

A section is an :class:`anndata.AnnData` with raw counts in ``X``, spot centres ``(x, y)`` in
full-resolution pixels in ``obsm['spatial']``, ``obs['array_row']``/``obs['array_col']`` where
known, and ``uns['hifusion']`` = ``{"slide", "mpp", "spot_diameter_um", "name", "source"}``.
On disk the slide path is relative to the ``.h5ad``'s folder when the slide lies below it, so a
folder of sections and slides can be moved as a whole; in memory ``uns['hifusion']['slide_abs']``
holds the resolved absolute path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import SectionError
from ..io_utils import anndata_nbytes, atomic_path, check_space
from .slide import Slide

#: Key of the section metadata in ``adata.uns``.
UNS_KEY = "hifusion"
REQUIRED_KEYS = ("slide", "mpp", "spot_diameter_um", "name", "source")
#: µm/px a real H&E scan can have: 0.05 (beyond any light microscope) to 20 (a thumbnail). A
#: value outside is a typo or a unit mix-up that would ruin every patch (or, tiny, allocate
#: gigabytes); ``check_mpp_plausible(..., allow=True)`` (``--any-mpp``) accepts it.
MPP_RANGE = (0.05, 20.0)


def new_section(
    spatial: np.ndarray,
    *,
    slide: str | os.PathLike,
    mpp: float,
    spot_diameter_um: float,
    name: str,
    source: str,
    obs_names: Sequence[str] | None = None,
    counts: np.ndarray | sp.spmatrix | None = None,
    genes: Sequence[str] | None = None,
    array_row: Sequence[int] | None = None,
    array_col: Sequence[int] | None = None,
    extra: dict | None = None,
    label: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Build a validated section; without ``counts`` it has no genes (a grid on a bare slide).

    ``label`` names the input in error messages (default: the section name).
    """
    spatial = np.asarray(spatial, dtype=np.float64)
    n = len(spatial)
    if obs_names is None:
        obs_names = [f"spot_{i:05d}" for i in range(n)]
    if counts is None:
        X = sp.csr_matrix((n, 0), dtype=np.float32)
        genes = []
    else:
        X = sp.csr_matrix(counts, dtype=np.float32)
    obs = pd.DataFrame(index=pd.Index([str(o) for o in obs_names], dtype=object))
    if array_row is not None:
        obs["array_row"] = np.asarray(array_row, dtype=np.int64)
    if array_col is not None:
        obs["array_col"] = np.asarray(array_col, dtype=np.int64)
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes], dtype=object))
    slide_abs = str(Path(slide).expanduser().resolve())
    meta = {
        "slide": slide_abs,
        "slide_abs": slide_abs,
        "mpp": float(mpp),
        "spot_diameter_um": float(spot_diameter_um),
        "name": str(name),
        "source": str(source),
        **(extra or {}),
    }
    adata = ad.AnnData(X=X, obs=obs, var=var, obsm={"spatial": spatial}, uns={UNS_KEY: meta})
    validate_section(adata, label if label is not None else name)
    return adata


def validate_section(adata: ad.AnnData, source: str | os.PathLike) -> None:
    """Raise :class:`SectionError`, naming ``source``, unless ``adata`` is a valid section."""
    meta = adata.uns.get(UNS_KEY)
    if not isinstance(meta, dict) or missing_keys(meta):
        raise SectionError(
            f"{source}: not a hifusion section (uns['{UNS_KEY}'] lacks "
            f"{', '.join(missing_keys(meta or {})) or 'everything'}); "
            "create it with `hifusion import` or the Spots panel"
        )
    _check_positive(meta["mpp"], "µm/px (mpp)", source)
    _check_positive(meta["spot_diameter_um"], "spot diameter (spot_diameter_um)", source)
    _check_spatial(adata, source)
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise SectionError(
            f"{source}: {len(dup)} duplicated spot ids (e.g. {', '.join(map(str, dup[:3]))}); "
            "each spot needs a unique id"
        )
    for col in ("array_row", "array_col"):
        if col in adata.obs and not pd.api.types.is_integer_dtype(adata.obs[col]):
            raise SectionError(
                f"{source}: obs['{col}'] must hold integers, not {adata.obs[col].dtype}"
            )
    if adata.n_vars:
        _check_counts(adata, source)


def missing_keys(meta: dict) -> list[str]:
    return [k for k in REQUIRED_KEYS if k not in meta]


def _check_positive(value: object, what: str, source: str | os.PathLike) -> None:
    try:
        ok = np.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SectionError(f"{source}: {what} must be a positive number, got {value!r}")


def _check_spatial(adata: ad.AnnData, source: str | os.PathLike) -> None:
    if "spatial" not in adata.obsm:
        raise SectionError(f"{source}: no spot centres (obsm['spatial']); re-import the section")
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.number):
        raise SectionError(
            f"{source}: obsm['spatial'] must be (n_spots, 2) numbers (x, y in pixels), got shape "
            f"{xy.shape}"
        )
    if not np.isfinite(xy).all():
        raise SectionError(
            f"{source}: {int((~np.isfinite(xy)).any(axis=1).sum())} spot centres are NaN or "
            "infinite"
        )


def _check_counts(adata: ad.AnnData, source: str | os.PathLike) -> None:
    """Counts must be raw (finite integers ≥ 0): normalised data would be normalised twice."""
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if not np.issubdtype(values.dtype, np.number):
        raise SectionError(f"{source}: counts (X) are not numbers ({values.dtype})")
    if not np.isfinite(values).all():
        raise SectionError(f"{source}: counts (X) hold NaN or infinite values; import raw counts")
    if (values < 0).any():
        raise SectionError(f"{source}: counts (X) hold negative values; import raw counts")
    if not np.array_equal(values, np.round(values)):
        raise SectionError(
            f"{source}: counts (X) are not whole numbers, so they look normalised; "
            "import the raw counts (e.g. adata.raw or layers['counts'])"
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise SectionError(
            f"{source}: {len(dup)} duplicated gene names (e.g. {', '.join(map(str, dup[:3]))}); "
            "call adata.var_names_make_unique() first"
        )


def read_h5ad(path: Path, missing: str) -> ad.AnnData:
    """``anndata.read_h5ad`` with a :class:`SectionError` naming the file (``missing``: why/how)."""
    if not path.is_file():
        raise SectionError(f"{path}: {missing}")
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for a file that is not an .h5ad
        raise SectionError(
            f"{path}: cannot read as an AnnData .h5ad ({type(e).__name__}: {e})"
        ) from e


def read_section(path: str | os.PathLike) -> ad.AnnData:
    """Read and validate a section; ``uns['hifusion']['slide_abs']`` is the resolved slide path."""
    path = Path(path)
    adata = read_h5ad(path, "section file not found; create one with `hifusion import`")
    validate_section(adata, path)
    meta = adata.uns[UNS_KEY]
    slide = Path(str(meta["slide"])).expanduser()
    meta["slide_abs"] = str(slide if slide.is_absolute() else (path.parent / slide).resolve())
    meta["mpp"] = float(meta["mpp"])
    meta["spot_diameter_um"] = float(meta["spot_diameter_um"])
    return adata


def write_section(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Validate and write ``adata`` atomically; the slide path is stored relative when possible."""
    path = Path(path)
    validate_section(adata, path)
    out = adata.copy()
    meta = dict(out.uns[UNS_KEY])
    slide = section_slide_path(adata)
    folder = path.parent.resolve()
    meta["slide"] = (
        slide.relative_to(folder).as_posix() if slide.is_relative_to(folder) else str(slide)
    )
    meta.pop("slide_abs", None)
    out.uns[UNS_KEY] = meta
    if not sp.issparse(out.X) and out.n_vars:
        out.X = sp.csr_matrix(out.X, dtype=np.float32)
    check_space(path, anndata_nbytes(out))
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp, compression="gzip")
    return path


def section_slide_path(adata: ad.AnnData) -> Path:
    """The absolute path of the section's slide (``slide_abs``, else ``slide`` from the cwd)."""
    meta = adata.uns[UNS_KEY]
    return Path(str(meta.get("slide_abs") or meta["slide"])).expanduser().resolve()


def section_mpp(adata: ad.AnnData) -> float:
    """µm per full-resolution pixel of the section's slide."""
    meta = adata.uns.get(UNS_KEY, {})
    _check_positive(meta.get("mpp"), "µm/px (mpp)", section_name(adata))
    return float(meta["mpp"])


def check_mpp_plausible(mpp: float, source: str | os.PathLike, origin: str = "",
                        allow: bool = False) -> None:
    """Refuse a µm/px outside :data:`MPP_RANGE` (unless ``allow``), naming where it came from."""
    _check_positive(mpp, "µm/px" + (f" from {origin}" if origin else ""), source)
    low, high = MPP_RANGE
    if not allow and not low <= float(mpp) <= high:
        raise SectionError(
            f"{source}: µm/px {float(mpp):g}" + (f" (from {origin})" if origin else "")
            + f" is outside the plausible {low:g} to {high:g} µm per pixel of an H&E scan; "
            "check the value and its unit, or add --any-mpp if it is right"
        )


def section_fingerprint(adata: ad.AnnData) -> str:
    """A hash of what training reads from a section: spot ids and centres, genes and counts.

    ``train --resume`` compares it, so a different file that carries the same section name is
    refused instead of trained on.
    """
    h = hashlib.sha256()
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    for a in (X.data, X.indices.astype(np.int64), X.indptr.astype(np.int64),
              np.asarray(adata.obsm["spatial"], dtype=np.float64)):
        h.update(np.ascontiguousarray(a).tobytes())
    for names in (adata.obs_names, adata.var_names):
        h.update("\n".join(map(str, names)).encode() + b"\0")
    return h.hexdigest()[:20]


def section_name(adata: ad.AnnData) -> str:
    return str(adata.uns.get(UNS_KEY, {}).get("name", "section"))


def section_slide(adata: ad.AnnData, mpp_override: float | None = None) -> Slide:
    """Open the section's slide at its µm/px (or ``mpp_override``), checking that the spots fit."""
    path = section_slide_path(adata)
    if not path.exists():
        raise SectionError(
            f"section {section_name(adata)!r}: its slide {path} does not exist; "
            "put the slide back or re-import the section with the slide's new path"
        )
    slide = Slide.open(path, mpp=mpp_override if mpp_override is not None else section_mpp(adata))
    check_spots_inside(adata.obsm["spatial"], slide.shape, f"section {section_name(adata)!r}", path)
    return slide


def check_spots_inside(
    spatial: np.ndarray,
    shape: tuple[int, int],
    source: str | os.PathLike,
    slide_path: str | os.PathLike,
) -> None:
    """Raise when spot centres fall outside the slide: they belong to another image or scale."""
    xy = np.asarray(spatial, dtype=np.float64)
    h, w = shape[:2]
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise SectionError(
            f"{source}: {int(outside.sum())} of {len(xy)} spot centres lie outside the slide "
            f"{slide_path} ({w}×{h} px), e.g. ({xy[i, 0]:.0f}, {xy[i, 1]:.0f}); "
            "check that the spots belong to this full-resolution image"
        )
