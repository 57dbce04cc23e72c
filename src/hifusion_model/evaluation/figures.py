"""Figures of a prediction file with matplotlib: one gene over the H&E, and how every gene did.

The layout a pathologist reads in one glance: the predicted map over the slide, the measured
map beside it on the same colour scale (when the section had counts), the uncertainty (when
the model has a noise model), and the per-gene PCC of all predicted genes, sorted, with the
chosen gene and the markers marked. The H&E comes from the file's ``uns['spatial']`` (the
scanpy convention every prediction file follows), so no slide has to be opened.

>>> fig = gene_figure(pred, "ERBB2")                    # doctest: +SKIP
>>> fig.savefig("erbb2.png", dpi=150)                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np

from ..errors import SectionError
from .metrics import MARKER_GENES, gene_pcc


def _background(pred: ad.AnnData) -> tuple[np.ndarray | None, float, float]:
    """The H&E thumbnail, its scale from full-res px, and the spot diameter in full-res px."""
    spatial = pred.uns.get("spatial") or {}
    for lib in spatial.values():
        factors = lib.get("scalefactors") or {}
        images = lib.get("images") or {}
        image = images.get("hires")
        scale = float(factors.get("tissue_hires_scalef", 1.0))
        if image is None and "lowres" in images:
            image, scale = images["lowres"], float(factors.get("tissue_lowres_scalef", 1.0))
        diameter = float(factors.get("spot_diameter_fullres", 0.0))
        return (None if image is None else np.asarray(image)), scale, diameter
    meta = pred.uns.get("hifusion") or {}
    diameter = float(meta.get("spot_diameter_um", 0.0)) / float(meta.get("mpp") or 1.0)
    return None, 1.0, diameter


def _spot_map(ax: Any, pred: ad.AnnData, values: np.ndarray, title: str, limits: tuple,
              cmap: str, label: str) -> None:
    """Spots as discs of their true diameter (in data units) over the H&E thumbnail."""
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    image, scale, diameter = _background(pred)
    xy = np.asarray(pred.obsm["spatial"], dtype=np.float64) * scale
    d = max(diameter * scale, 1.0)
    if image is not None:
        ax.imshow(image)
    discs = EllipseCollection(d, d, 0.0, units="xy", offsets=xy, offset_transform=ax.transData,
                              cmap=cmap, norm=Normalize(*limits), linewidths=0)
    discs.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(discs)
    ax.set_aspect("equal")
    ax.set_xlim(xy[:, 0].min() - d, xy[:, 0].max() + d)
    ax.set_ylim(xy[:, 1].max() + d, xy[:, 1].min() - d)  # image rows grow downwards
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.figure.colorbar(discs, ax=ax, shrink=0.7, label=label)


def _limits(*columns: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([c[np.isfinite(c)] for c in columns])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99])
    return (float(lo), float(hi)) if hi > lo else (float(values.min()), float(values.min()) + 1)


def gene_figure(pred: ad.AnnData, gene: str, *, cmap: str = "inferno",
                markers: Sequence[str] = MARKER_GENES) -> Any:
    """A matplotlib Figure of ``gene``: predicted (and measured, uncertainty) maps over the
    H&E, and the sorted per-gene PCC of every gene when the file holds the truth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if gene not in pred.var_names:
        close = [g for g in pred.var_names if g.lower() == gene.lower()]
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SectionError(f"{gene} is not among the {pred.n_vars} predicted genes{hint}")
    column = list(pred.var_names).index(gene)
    predicted = np.asarray(pred.X[:, column], dtype=np.float64).ravel()
    truth = pred.layers.get("truth")
    uncertainty = pred.layers.get("uncertainty")
    panels = 1 + (truth is not None) + (uncertainty is not None) + (truth is not None)
    fig = Figure(figsize=(4.6 * panels, 4.4), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot, no GUI backend: safe in a worker thread
    axes = fig.subplots(1, panels, squeeze=False)[0]
    name = (pred.uns.get("hifusion") or {}).get("name", "section")
    if truth is not None:
        measured = np.asarray(truth[:, column], dtype=np.float64).ravel()
        limits = _limits(predicted, measured)
        r = gene_pcc(predicted[:, None], measured[:, None])[0]
        _spot_map(axes[0], pred, predicted, f"{name}: {gene} predicted (PCC {r:+.2f})", limits,
                  cmap, "ln relative expression")
        _spot_map(axes[1], pred, measured, f"{gene} measured", limits, cmap,
                  "ln relative expression")
    else:
        _spot_map(axes[0], pred, predicted, f"{name}: {gene} predicted", _limits(predicted),
                  cmap, "ln relative expression")
    if uncertainty is not None:
        u = np.asarray(uncertainty[:, column], dtype=np.float64).ravel()
        _spot_map(axes[1 + (truth is not None)], pred, u, f"{gene} uncertainty", _limits(u),
                  "viridis", "SD, ln units")
    if truth is not None:
        _pcc_panel(axes[-1], pred, gene, markers)
    return fig


def _pcc_panel(ax: Any, pred: ad.AnnData, gene: str, markers: Sequence[str]) -> None:
    pcc = gene_pcc(np.asarray(pred.X, dtype=np.float64),
                   np.asarray(pred.layers["truth"], dtype=np.float64))
    order = np.argsort(pcc)[::-1]
    genes = np.asarray(pred.var_names)[order]
    ax.bar(np.arange(len(pcc)), pcc[order], width=1.0, color="0.7")
    for g, color in [(m, "tab:blue") for m in markers] + [(gene, "tab:red")]:
        hit = np.flatnonzero(genes == g)
        if hit.size:
            i = int(hit[0])
            ax.bar(i, pcc[order][i], width=1.0, color=color)
            ax.annotate(g, (i, pcc[order][i]), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=7, color=color)
    ax.axhline(float(np.nanmean(pcc)), color="k", lw=0.8, ls="--")
    ax.set_title(f"per-gene PCC, mean {np.nanmean(pcc):.3f} ({len(pcc)} genes)", fontsize=10)
    ax.set_xlabel("genes, best first")
    ax.set_ylabel("PCC across spots")


__all__ = ["gene_figure"]
