"""Metrics for predicted spatial expression, and the constant baseline they must beat.

Two correlations are in use and they answer different questions:

* :func:`spot_pcc` (the HiFusion paper's "PCC") correlates the genes *within each spot* and
  averages over spots. Every spot shares the same broad expression profile, so a constant
  predictor (the training mean) already scores ~0.45 on HER2ST. Never report it alone.
* :func:`gene_pcc` (ST-Net, Hist2ST, TRIPLEX, HEST) correlates each gene *across the spots of one
  section*: does the model find where a gene is high? A constant scores 0. Across sections it is
  averaged per section first (:func:`per_gene_pcc_by_section`), because pooling spots of several
  sections rewards predicting section-level offsets instead of spatial patterns.

Zero-variance convention: when either side of a correlation is constant (a constant predictor,
a gene never expressed in a section) the correlation is defined as **0** -- no linear
association can be shown. A constant predictor therefore gets per-gene PCC exactly 0, averages
stay finite, and NaN never appears in a result.

Inputs are ``(n_spots, n_genes)`` arrays (anything ``numpy.asarray`` takes, torch tensors
included); computation is in float64. NaN or inf in an input raises :class:`MetricInputError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import HiFusionError

#: Marker genes quoted by the paper (ERBB2 0.518, KRT19 0.230, CD74 0.357 per-gene PCC).
MARKER_GENES = ("ERBB2", "KRT19", "CD74")


class MetricInputError(HiFusionError, ValueError):
    """Predictions or targets that cannot be scored (wrong shape, NaN, inf)."""


# -- input checks ---------------------------------------------------------------------------------
def _as_table(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor: avoid importing torch here
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise MetricInputError(f"{name} must be a (spots, genes) table, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise MetricInputError(
            f"{name} holds {bad} NaN or infinite value(s); metrics need finite numbers "
            "(check the model output or the normalisation of the counts)"
        )
    return arr


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_table(pred, "pred"), _as_table(truth, "truth")
    if p.shape != t.shape:
        raise MetricInputError(f"pred has shape {p.shape} but truth has shape {t.shape}")
    if p.size == 0:
        raise MetricInputError(f"cannot score an empty table of shape {p.shape}")
    return p, t


# -- elementary metrics ---------------------------------------------------------------------------
def mse(pred: Any, truth: Any) -> float:
    """Mean squared error over all spots and genes."""
    p, t = _pair(pred, truth)
    return float(np.mean((p - t) ** 2))


def mae(pred: Any, truth: Any) -> float:
    """Mean absolute error over all spots and genes."""
    p, t = _pair(pred, truth)
    return float(np.mean(np.abs(p - t)))


def _row_pcc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; constant rows give 0.

    Constancy is tested exactly (peak-to-peak 0) rather than on the centred sum of squares,
    which rounding leaves at ~1e-33 for a constant row and would turn into a random ±1.
    """
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((ac * ac).sum(axis=1) * (bc * bc).sum(axis=1))
    defined = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0) & (den > 0)
    r = np.zeros(a.shape[0])
    r[defined] = (ac * bc).sum(axis=1)[defined] / den[defined]
    return np.clip(r, -1.0, 1.0)


def per_spot_pcc(pred: Any, truth: Any) -> np.ndarray:
    """Correlation across genes within each spot, ``(n_spots,)``."""
    p, t = _pair(pred, truth)
    return _row_pcc(p, t)


def spot_pcc(pred: Any, truth: Any) -> float:
    """The paper's PCC: correlation across genes within each spot, averaged over spots."""
    return float(per_spot_pcc(pred, truth).mean())


def gene_pcc(pred: Any, truth: Any) -> np.ndarray:
    """Correlation across spots for each gene, ``(n_genes,)``; spots should be one section."""
    p, t = _pair(pred, truth)
    return _row_pcc(p.T, t.T)


def _section_index(sections: Any, n_spots: int) -> dict[str, np.ndarray]:
    """Map each section label (as a string, in order of first appearance) to its spot indices."""
    labels = np.asarray(sections).astype(str)
    if labels.shape != (n_spots,):
        raise MetricInputError(
            f"sections must give one label per spot ({n_spots}), got shape {labels.shape}"
        )
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {label: np.asarray(idx) for label, idx in groups.items()}


def per_gene_pcc_by_section(pred: Any, truth: Any, sections: Any = None) -> np.ndarray:
    """Per-gene PCC computed within each section, then averaged over sections, ``(n_genes,)``.

    A section of a single spot shows no spatial variation and contributes 0 (the convention).
    """
    p, t = _pair(pred, truth)
    if sections is None:
        return gene_pcc(p, t)
    groups = _section_index(sections, p.shape[0])
    return np.mean([gene_pcc(p[idx], t[idx]) for idx in groups.values()], axis=0)


def skill(mse_model: float, mse_baseline: float) -> float:
    """Skill over a baseline, ``1 - MSE(model) / MSE(baseline)``: 0 = no better, 1 = perfect."""
    if not (np.isfinite(mse_model) and np.isfinite(mse_baseline)):
        raise MetricInputError(f"skill needs finite MSEs, got {mse_model} and {mse_baseline}")
    if mse_baseline <= 0:
        raise MetricInputError(
            f"skill is undefined for a baseline MSE of {mse_baseline}: the constant baseline "
            "already reproduces the targets exactly"
        )
    return float(1.0 - mse_model / mse_baseline)


# -- full evaluation ------------------------------------------------------------------------------
def _scores(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    return {
        "mse": mse(p, t),
        "mae": mae(p, t),
        "spot_pcc": spot_pcc(p, t),
        "gene_pcc": float(gene_pcc(p, t).mean()),
    }


def _baseline_table(train_mean: Any, truth: np.ndarray) -> tuple[np.ndarray, str]:
    if train_mean is None:
        return np.broadcast_to(truth.mean(axis=0), truth.shape), "test_mean"
    mean = _as_table(np.reshape(np.asarray(train_mean, dtype=np.float64), (1, -1)), "train_mean")
    if mean.shape[1] != truth.shape[1]:
        raise MetricInputError(
            f"train_mean has {mean.shape[1]} genes but the predictions have {truth.shape[1]}"
        )
    return np.broadcast_to(mean, truth.shape), "train_mean"


def evaluate_predictions(
    pred: Any,
    truth: Any,
    *,
    sections: Any = None,
    genes: Sequence[str] | None = None,
    train_mean: Any = None,
    marker_genes: Sequence[str] = MARKER_GENES,
) -> dict[str, Any]:
    """Score predictions against targets, beside the constant-mean baseline; JSON-ready.

    ``sections`` labels each spot with its section; per-gene PCC is computed within sections and
    averaged over them (then over genes). ``spot_pcc`` averages over all spots. The baseline
    predicts ``train_mean`` for every spot; without it, the test mean is used (the best constant
    in hindsight, so the reported skill is a lower bound). ``genes`` names the columns.
    """
    p, t = _pair(pred, truth)
    n_spots, n_genes = p.shape
    names = [str(g) for g in genes] if genes is not None else [str(i) for i in range(n_genes)]
    if len(names) != n_genes:
        raise MetricInputError(f"{len(names)} gene names given for {n_genes} predicted genes")
    base, base_source = _baseline_table(train_mean, t)
    groups = (
        _section_index(sections, n_spots) if sections is not None
        else {"all": np.arange(n_spots)}
    )

    per_section: dict[str, dict[str, Any]] = {}
    gene_pcc_sections, base_gene_pcc_sections = [], []
    for label, idx in groups.items():
        model, baseline = _scores(p[idx], t[idx]), _scores(base[idx], t[idx])
        model["skill"] = skill(model["mse"], baseline["mse"])
        per_section[label] = {"n_spots": int(len(idx)), **model, "baseline": baseline}
        gene_pcc_sections.append(gene_pcc(p[idx], t[idx]))
        base_gene_pcc_sections.append(gene_pcc(base[idx], t[idx]))

    gene_pcc_all = np.mean(gene_pcc_sections, axis=0)
    baseline = {
        "source": base_source,
        "mse": mse(base, t),
        "mae": mae(base, t),
        "spot_pcc": spot_pcc(base, t),
        "gene_pcc": float(np.mean(base_gene_pcc_sections, axis=0).mean()),
    }
    model_mse = mse(p, t)
    return {
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "n_sections": len(groups),
        "mse": model_mse,
        "mae": mae(p, t),
        "spot_pcc": spot_pcc(p, t),
        "gene_pcc": float(gene_pcc_all.mean()),
        "skill": skill(model_mse, baseline["mse"]),
        "baseline": baseline,
        "genes": {g: float(gene_pcc_all[names.index(g)]) for g in marker_genes if g in names},
        "gene_pcc_all": dict(zip(names, map(float, gene_pcc_all))),
        "per_section": per_section,
    }


def top_genes(gene_pccs: dict[str, float], n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` genes with the highest PCC, best first (ties keep the given order)."""
    return sorted(gene_pccs.items(), key=lambda kv: -kv[1])[:n]


__all__ = [
    "MARKER_GENES",
    "MetricInputError",
    "mse",
    "mae",
    "spot_pcc",
    "per_spot_pcc",
    "gene_pcc",
    "per_gene_pcc_by_section",
    "skill",
    "evaluate_predictions",
    "top_genes",
]
