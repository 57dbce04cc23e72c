"""npe2 writer and export helpers: a HiFusion points layer to ``.h5ad`` or CSV.

Exports read the layer as it is now (moved or deleted spots included). A prediction layer is
written as a predictions file (``X`` = predicted expression, the model's identity in ``uns``); a
spots or measured layer as a section (raw counts), loadable again by the reader and by training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hifusion_model.errors import SectionError
from hifusion_model.io_utils import atomic_path

from ._layers import (
    META,
    PREDICTION,
    SPOT_ID,
    TRUTH,
    gene_columns,
    meta,
    section_from_points,
    spot_ids,
)


@dataclass
class LayerView:
    """The parts of a points layer exports need, from a layer or from a writer's attributes."""

    name: str
    data: np.ndarray
    features: pd.DataFrame
    metadata: dict = field(default_factory=dict)

    @classmethod
    def of(cls, layer: Any) -> LayerView:
        return cls(layer.name, np.asarray(layer.data), layer.features, layer.metadata)


def write_points_h5ad(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer for points layers made by napari-hifusion."""
    view = LayerView(attributes.get("name", "points"), np.asarray(data),
                     pd.DataFrame(attributes.get("features", {})), attributes.get("metadata", {}))
    if META not in view.metadata:
        return []  # not ours: let napari try another writer
    return [str(export_h5ad(view, path))]


def export_h5ad(layer: Any, path: str | os.PathLike) -> Path:
    """Write the layer's spots (and predictions or counts) to ``path`` atomically."""
    from hifusion_model.data.sections import write_section
    from hifusion_model.inference.predict import write_predictions

    view = layer if isinstance(layer, LayerView) else LayerView.of(layer)
    path = Path(path)
    if path.suffix != ".h5ad":
        raise SectionError(f"{path}: an AnnData file must end in .h5ad")
    info = meta(view)
    if info.get("kind") == PREDICTION:
        return write_predictions(prediction_anndata(view), path)
    return write_section(section_from_points(view, counts=info.get("kind") == TRUTH), path)


def prediction_anndata(layer: Any) -> Any:
    """A prediction layer's spots as they are now, as the AnnData ``hifusion predict`` writes.

    The layer keeps the prediction it was made from (the Predict panel's result, or the file
    it was opened from); the values are the layer's, so moved or added spots keep theirs, and
    the truth, the uncertainty and the model's identity follow each spot by id."""
    view = layer if isinstance(layer, LayerView) else LayerView.of(layer)
    source = meta(view).get("predictions")
    if source is None:
        raise SectionError(f"layer {view.name!r} does not know its model; predict again")
    return _reopened_predictions(view, source)


def _reopened_predictions(view: LayerView, source: Any) -> Any:
    """The layer's spots as they are now, as a prediction file like its source AnnData.

    Values are the layer's (moved or added spots keep theirs); the truth and uncertainty follow
    each spot by id (NaN for spots the file did not hold); the model's identity is the file's.
    """
    import anndata as ad

    from hifusion_model.data.sections import UNS_KEY, section_slide_path
    from hifusion_model.inference.predict import SECTION_KEYS

    section = section_from_points(view)
    genes = [str(g) for g in source.var_names]
    missing = [g for g in genes if g not in view.features]
    if missing:
        raise SectionError(f"layer {view.name!r} lacks the predicted gene(s) "
                           f"{', '.join(missing[:3])}; open the prediction file again")
    rows = pd.Index(source.obs_names).get_indexer(section.obs_names)
    known = rows >= 0

    def follow(values: Any) -> np.ndarray:
        dense = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
        out = np.full((section.n_obs, len(genes)), np.nan, np.float32)
        out[known] = dense[rows[known]]
        return out

    meta = section.uns[UNS_KEY]
    uns = {UNS_KEY: {k: meta[k] for k in SECTION_KEYS} | {"slide_abs": str(section_slide_path(section))}}
    if "hifusion_model" in source.uns:
        uns["hifusion_model"] = source.uns["hifusion_model"]
    obs = pd.DataFrame(index=section.obs_names.copy())
    for col in ("array_row", "array_col"):
        if col in source.obs and known.all():
            obs[col] = source.obs[col].to_numpy()[rows]
    return ad.AnnData(
        X=view.features[genes].to_numpy(np.float32), obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        obsm={"spatial": np.asarray(section.obsm["spatial"], dtype=np.float64)},
        layers={k: follow(v) for k, v in source.layers.items()}, uns=uns,
    )


def export_csv(layer: Any, path: str | os.PathLike) -> Path:
    """Spot ids, centres in px and µm, and every gene column, one row per spot."""
    view = layer if isinstance(layer, LayerView) else LayerView.of(layer)
    path = Path(path)
    info = meta(view)
    mpp = info.get("mpp")
    yx = np.asarray(view.data, dtype=np.float64)
    table = pd.DataFrame({SPOT_ID: spot_ids(view), "x_px": yx[:, 1], "y_px": yx[:, 0]})
    if mpp:
        table["x_um"], table["y_um"] = yx[:, 1] * mpp, yx[:, 0] * mpp
    genes = gene_columns(view)
    table = pd.concat([table, view.features[genes].reset_index(drop=True)], axis=1)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path
