"""scanpy/squidpy Visium AnnData (``uns['spatial'][library]``): spots, raw counts, image."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import SectionError, SlideError
from ..sections import check_spots_inside, new_section, read_h5ad
from ._common import CoarseImageWarning, check_unique, probe_slide
from .visium_scale import VISIUM_SPOT_UM, visium_lattice, visium_mpp


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


def is_raw_counts(matrix) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return (
        np.issubdtype(values.dtype, np.number)
        and bool(np.isfinite(values).all())
        and not (values < 0).any()
        and np.array_equal(values, np.round(values))
    )


def _raw_counts(adata: ad.AnnData, path: Path) -> tuple[object, pd.Index, str]:
    """The raw counts of a scanpy AnnData: ``X``, else ``layers['counts']``, else ``.raw``."""
    if is_raw_counts(adata.X):
        return adata.X, adata.var_names, "X"
    if "counts" in adata.layers and is_raw_counts(adata.layers["counts"]):
        return adata.layers["counts"], adata.var_names, "layers['counts']"
    if adata.raw is not None and is_raw_counts(adata.raw.X):
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

    from ...io_utils import atomic_path

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
    check_unique(adata.obs_names, path, "AnnData")
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
    slide = probe_slide(image_path)
    spatial = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2] * scale
    lattice = visium_lattice(adata.obs, spatial, factors)
    mpp_value, origin = visium_mpp(
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
