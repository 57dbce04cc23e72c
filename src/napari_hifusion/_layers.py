"""Conversions between core objects (Slide, section AnnData) and napari layers.

Everything that knows how a HiFusion layer is laid out lives here, so readers, widgets and the
demo agree: spots are ``(y, x)`` full-resolution pixels, every layer of a slide is scaled to µm,
and ``layer.metadata['hifusion']`` carries what the widgets need (the section, the slide path,
the layer's kind).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from napari.utils.colormaps import ensure_colormap

from hifusion_model.data.sections import new_section, section_mpp, section_name, section_slide_path
from hifusion_model.errors import SectionError

#: Key of our metadata in ``layer.metadata``.
META = "hifusion"
#: Face colour of spots without a value for the shown gene (e.g. added by hand).
NO_VALUE_COLOR = (0.5, 0.5, 0.5, 1.0)
#: Kinds of points layers; truth and prediction layers are coloured together by the Genes panel.
SPOTS, TRUTH, PREDICTION = "spots", "truth", "prediction"
#: At most this many measured genes become features of a truth layer (the model default).
MAX_FEATURE_GENES = 250
SPOT_ID = "spot_id"
DEFAULT_COLORMAP = "inferno"
#: The gene shown first when present (the HER2 amplicon, the point of HER2ST).
DEFAULT_GENE = "ERBB2"

LayerData = tuple[Any, dict, str]


# -- metadata ------------------------------------------------------------------------------------
def meta(layer: Any) -> dict:
    """The layer's HiFusion metadata (empty for foreign layers)."""
    return layer.metadata.get(META, {}) if hasattr(layer, "metadata") else {}


def kind(layer: Any) -> str | None:
    return meta(layer).get("kind")


def is_slide_layer(layer: Any) -> bool:
    return type(layer).__name__ == "Image" and kind(layer) == "slide"


def is_spots_layer(layer: Any) -> bool:
    return type(layer).__name__ == "Points" and kind(layer) in (SPOTS, TRUTH, PREDICTION)


def gene_columns(layer: Any) -> list[str]:
    """Feature columns holding expression values (every numeric column but bookkeeping)."""
    features = layer.features
    return [c for c in features.columns if c != SPOT_ID and pd.api.types.is_numeric_dtype(features[c])]


# -- slides ----------------------------------------------------------------------------------------
def slide_layer_data(slide: Any, name: str | None = None) -> LayerData:
    """A lazy multiscale image layer of ``slide``, scaled to µm when its µm/px is known.

    Contrast limits come from the smallest level, so napari never scans the full resolution.
    """
    levels = list(slide.levels)
    smallest = np.asarray(levels[-1])
    limits = (float(smallest.min()), float(smallest.max()))
    if limits[0] == limits[1]:
        limits = (0.0, 255.0)
    mpp = slide.mpp
    rgb = len(levels[0].shape) == 3 and levels[0].shape[-1] in (3, 4)
    kwargs = {
        "name": name or Path(slide.path).name,
        "rgb": rgb,
        "multiscale": len(levels) > 1,
        "contrast_limits": limits,
        "scale": (mpp, mpp) if mpp else (1.0, 1.0),
        "units": "um" if mpp else "pixel",
        "metadata": {META: {"kind": "slide", "path": str(slide.path), "mpp": mpp, "slide": slide}},
    }
    return (levels if len(levels) > 1 else levels[0]), kwargs, "image"


# -- expression ------------------------------------------------------------------------------------
def expression_features(section: Any, genes: Sequence[str] | None = None,
                        normalization: str = "log_relative") -> pd.DataFrame:
    """Spot ids plus normalised expression, as a model's targets are normalised.

    Without ``genes`` the section's most expressed genes (at most :data:`MAX_FEATURE_GENES`)
    are used; with them (a model's genes) the values are directly comparable to its predictions.
    """
    from hifusion_model.data.expression import section_targets, select_top_genes

    features = pd.DataFrame({SPOT_ID: np.asarray(section.obs_names, dtype=object)})
    if section.n_vars == 0:
        return features
    if genes is None:
        genes = select_top_genes([section], n=min(MAX_FEATURE_GENES, section.n_vars))
    values = section_targets(section, genes, normalization)
    expression = pd.DataFrame(np.asarray(values, dtype=np.float32), columns=genes)
    return pd.concat([features, expression], axis=1)


def truth_features(points: Any, genes: Sequence[str], normalization: str = "log_relative") -> pd.DataFrame:
    """Measured expression of ``genes`` for the spots *currently* on ``points`` (NaN for added ones)."""
    section = meta(points)["section"]
    ids = spot_ids(points)
    table = expression_features(section, genes, normalization).set_index(SPOT_ID)
    values = table.reindex(pd.Index(ids, dtype=object)).reset_index(drop=True)
    return pd.concat([pd.DataFrame({SPOT_ID: np.asarray(ids, dtype=object)}), values], axis=1)


# -- spots -----------------------------------------------------------------------------------------
def points_layer_data(
    section: Any,
    *,
    name: str,
    layer_kind: str,
    features: pd.DataFrame | None = None,
    color_by: str | None = None,
    extra_meta: dict | None = None,
) -> LayerData:
    """A points layer over the section's slide: ``(y, x)`` px, scaled to µm, sized to the spots."""
    mpp = section_mpp(section)
    diameter_px = float(section.uns[META]["spot_diameter_um"]) / mpp
    xy = np.asarray(section.obsm["spatial"], dtype=np.float64)
    if features is None:
        features = pd.DataFrame({SPOT_ID: np.asarray(section.obs_names, dtype=object)})
    kwargs: dict[str, Any] = {
        "name": name,
        "features": features,
        "feature_defaults": _blank_defaults(features),
        "size": diameter_px,
        "scale": (mpp, mpp),
        "units": "um",
        "border_width": 0.06,
        "border_color": "white",
        "face_color": "transparent",
        "metadata": {META: {"kind": layer_kind, "section": section,
                            "slide_path": str(section_slide_path(section)),
                            "mpp": mpp, **(extra_meta or {})}},
    }
    if color_by is None and len(features.columns) > 1:
        color_by = DEFAULT_GENE if DEFAULT_GENE in features else features.columns[1]
    if color_by is not None:
        kwargs.update(face_color=color_by, face_colormap=DEFAULT_COLORMAP,
                      face_contrast_limits=robust_limits([features[color_by]]))
    return xy[:, ::-1].copy(), kwargs, "points"


def _blank_defaults(features: pd.DataFrame) -> dict:
    """Defaults for spots the user adds: no id (one is made on use), no expression (transparent)."""
    return {c: ("" if c == SPOT_ID else np.nan) for c in features.columns}


def section_from_points(points: Any, *, counts: bool = False) -> Any:
    """A section for the spots as they are *now* on ``points`` (after any add, move or delete).

    Spots keep their ids; spots the user added get new ones. With ``counts`` the measured counts
    of the layer's original section follow the spots, and added spots (which have none) are
    dropped; a layer without counts then raises :class:`SectionError`.
    """
    info = meta(points)
    source = info.get("section")
    if source is None:
        raise SectionError(f"layer {points.name!r} is not a HiFusion spots layer; "
                           "make spots with the Spots panel or open a section file")
    xy = np.asarray(points.data, dtype=np.float64)[:, ::-1]
    ids = spot_ids(points)
    keep = np.ones(len(ids), bool)
    kwargs: dict[str, Any] = {}
    if counts:
        if source.n_vars == 0:
            raise SectionError(f"layer {points.name!r} has no measured counts; open a section "
                               "with counts (.h5ad, Space Ranger or HEST folder) to train on it")
        known = pd.Index(source.obs_names)
        keep = known.get_indexer(ids) >= 0
        if not keep.any():
            raise SectionError(f"layer {points.name!r}: none of its spots has measured counts")
        rows = known.get_indexer(np.asarray(ids)[keep])
        kwargs = {"counts": source.X[rows], "genes": list(source.var_names)}
    m = source.uns[META]
    return new_section(
        xy[keep], slide=section_slide_path(source), mpp=float(m["mpp"]),
        spot_diameter_um=float(m["spot_diameter_um"]), name=section_name(source),
        source=str(m.get("source", "napari")), obs_names=list(np.asarray(ids)[keep]), **kwargs,
    )


def spot_ids(points: Any) -> list[str]:
    """Unique ids for the layer's spots: the recorded ones, new ones for added or copied spots."""
    raw = points.features[SPOT_ID] if SPOT_ID in points.features else pd.Series([""] * len(points.data))
    ids: list[str] = []
    seen: set[str] = set()
    counter = 0
    for value in raw.astype(object).tolist():
        spot = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        while not spot or spot in seen:
            spot = f"added_{counter:05d}"
            counter += 1
        seen.add(spot)
        ids.append(spot)
    return ids


# -- colour ----------------------------------------------------------------------------------------
def robust_limits(columns: Sequence[Any]) -> tuple[float, float]:
    """Shared contrast limits over several value columns: the 1st and 99th percentiles."""
    values = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in columns] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def color_points(points: Any, gene: str, limits: tuple[float, float], colormap: str) -> None:
    """Recolour ``points`` in place by its feature column ``gene`` (one pass over the spots).

    napari's feature-driven colouring recomputes every spot's colour once per setter
    (``face_color``, ``face_colormap``, ``face_contrast_limits``): ~190 ms a gene switch on
    50,000 spots × 250 genes. Mapping the one column ourselves costs a single pass. Spots
    without a value (added by hand) are grey. The gene, limits and colormap shown are kept in
    the layer's metadata.
    """
    color_values(points, points.features[gene].to_numpy(dtype=np.float64), limits, colormap)
    meta(points).update(color_by=gene)


def uncertainty_values(points: Any, gene: str) -> np.ndarray | None:
    """The per-spot uncertainty of ``gene`` for the spots now on a prediction layer (NaN for
    spots added since), or None when its model gave none."""
    table = meta(points).get("uncertainty")
    if table is None or gene not in table:
        return None
    ids = points.features[SPOT_ID].to_numpy(dtype=object)
    return table[gene].reindex(pd.Index(ids, dtype=object)).to_numpy(dtype=np.float64)


def color_values(points: Any, values: np.ndarray, limits: tuple[float, float],
                 colormap: str) -> None:
    """Colour each spot of ``points`` by its entry of ``values`` (NaN: grey)."""
    lo, hi = limits
    scaled = np.clip((values - lo) / ((hi - lo) or 1.0), 0.0, 1.0)
    colors = ensure_colormap(colormap).map(np.nan_to_num(scaled))
    colors[~np.isfinite(values)] = NO_VALUE_COLOR
    points.face_color = colors
    meta(points).update(limits=(float(lo), float(hi)), colormap=colormap)


def put_image(viewer: Any, old: Any, data: Any, kwargs: dict[str, Any]) -> Any:
    """Show an image derived from spots (a map, sub-spot tiles): update ``old`` in place when it
    can take ``data`` (no flicker while the user steps through genes), else replace it. Returns
    the layer newly added, or ``None`` when ``old`` was updated."""
    if old is not None and old.multiscale == kwargs["multiscale"]:
        old.metadata = kwargs["metadata"]
        old.data = data
        old.name = kwargs["name"]
        old.scale, old.translate = kwargs["scale"], kwargs["translate"]
        old.colormap, old.contrast_limits = kwargs["colormap"], kwargs["contrast_limits"]
        return None
    if old is not None:
        viewer.layers.remove(old)
    return viewer.add_image(data, **kwargs)
