"""HEST-1k samples: ``st/<id>.h5ad``, ``metadata/<id>.json`` and ``wsis/<id>.tif``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ...errors import SectionError, SlideError
from ..sections import check_spots_inside, new_section, read_h5ad
from ._common import IMAGE_SUFFIXES, check_counts, check_unique, first_mpp, probe_slide
from .her2st import ST_SPOT_UM
from .visium_scale import VISIUM_SPOT_UM


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
    check_unique(adata.obs_names, path, "AnnData")
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    check_counts(values, path)

    slide = probe_slide(_hest_image(path, image))
    meta_mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    mpp_value, origin = first_mpp(
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
