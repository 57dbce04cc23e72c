"""Figures with matplotlib: one predicted gene over the H&E and how every gene did, and the
curves of a training run.

The layout a pathologist reads in one glance: the predicted map over the slide, the measured
map beside it on the same colour scale (when the section had counts), the uncertainty (when
the model has a noise model), and the per-gene PCC of all predicted genes, sorted, with the
chosen gene and the markers marked. The H&E comes from the file's ``uns['spatial']`` (the
scanpy convention every prediction file follows), so no slide has to be opened.

>>> fig = gene_figure(pred, "ERBB2")                    # doctest: +SKIP
>>> fig.savefig("erbb2.png", dpi=150)                   # doctest: +SKIP
>>> curve_figure([{"epoch": 1, "train_loss": 0.9, "val_mse": 0.5, "val_gene_pcc": 0.1,
...                "best": True}]).axes[0].get_xlabel()
'epoch'

Figures are built without pyplot or a GUI backend, so they are safe in worker threads and
embed in Qt as they are.
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


def _figure(width: float, height: float) -> Any:
    """A Figure with its own Agg canvas: no pyplot, no GUI backend (safe in a worker thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def gene_figure(pred: ad.AnnData, gene: str, *, cmap: str = "inferno",
                markers: Sequence[str] = MARKER_GENES) -> Any:
    """A matplotlib Figure of ``gene``: predicted (and measured, uncertainty) maps over the
    H&E, and the sorted per-gene PCC of every gene when the file holds the truth."""
    if gene not in pred.var_names:
        close = [g for g in pred.var_names if g.lower() == gene.lower()]
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SectionError(f"{gene} is not among the {pred.n_vars} predicted genes{hint}")
    column = list(pred.var_names).index(gene)
    predicted = np.asarray(pred.X[:, column], dtype=np.float64).ravel()
    truth = pred.layers.get("truth")
    uncertainty = pred.layers.get("uncertainty")
    panels = 1 + (truth is not None) + (uncertainty is not None) + (truth is not None)
    fig = _figure(4.6 * panels, 4.4)
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


#: Curve colours: training loss, validation MSE, validation gene PCC.
CURVE_COLORS = {"train_loss": "tab:blue", "val_mse": "tab:orange", "val_gene_pcc": "tab:green"}


def curve_figure(records: Sequence[dict[str, Any]], fig: Any = None) -> Any:
    """A training run's curves (``MODEL.curves.json``, or the ``on_epoch`` records so far):
    training loss and validation MSE per epoch on the left axis, validation gene PCC on the
    right, the kept epoch marked; a refit's epochs (trained on every spot, no validation) are
    drawn dashed. Draws into ``fig`` when given (a live plot), clearing it first."""
    if fig is None:
        fig = _figure(5.0, 3.0)
    fig.clear()
    ax = fig.add_subplot()
    pcc_ax = ax.twinx()
    stages = [[r for r in records if bool(r.get("refit")) == refit] for refit in (False, True)]
    for stage, style in zip(stages, ("-", "--")):
        for key, axis in (("train_loss", ax), ("val_mse", ax), ("val_gene_pcc", pcc_ax)):
            points = [(r["epoch"], r[key]) for r in stage if r.get(key) is not None]
            if points:
                label = key.replace("_", " ") + (" (refit)" if style == "--" else "")
                axis.plot(*zip(*points), style, marker=".", color=CURVE_COLORS[key], label=label)
    best = [r["epoch"] for r in stages[0] if r.get("best")]
    if best:
        ax.axvline(best[-1], color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss, MSE")
    pcc_ax.set_ylabel("gene PCC", color=CURVE_COLORS["val_gene_pcc"])
    lines = [line for line in ax.get_lines() + pcc_ax.get_lines()
             if not line.get_label().startswith("_")]  # the kept-epoch marker has no label
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    return fig


__all__ = ["CURVE_COLORS", "curve_figure", "gene_figure"]
