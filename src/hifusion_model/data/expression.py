"""Gene panels and count normalisation: what the model is trained to predict.

HiFusion predicts the 250 most highly expressed genes, as ``ln((c + 1) / Σ_g (c + 1))`` over
those genes per spot (``log_relative``, the paper's labels). ``log1p_cp10k`` is the scanpy-style
alternative. Both sum over the *selected* genes only, so a spot's label never depends on genes
the model does not see.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, SectionError
from .sections import section_name

#: The per-spot normalisations of counts ``c`` a model may be trained on, and their formulas.
NORMALIZATIONS = {
    "log_relative": "ln((c + 1) / sum(c + 1)) per spot, as in the paper",
    "log1p_cp10k": "ln(1 + 1e4 * c / sum(c)) per spot",
}


def select_top_genes(sections: Sequence[ad.AnnData], n: int = 250) -> list[str]:
    """The ``n`` genes with the highest total counts over ``sections``, most expressed first.

    Only genes measured in every section compete, so the panel can be read from each of them;
    ties are broken by name to keep the panel reproducible.
    """
    if not sections:
        raise SectionError("no sections given to select genes from")
    if n < 1:
        raise ConfigError(f"number of genes must be at least 1, got {n}")
    for adata in sections:
        if adata.n_vars == 0:
            raise SectionError(
                f"section {section_name(adata)!r} has no counts; "
                "select genes from measured sections"
            )
    common = pd.Index(sections[0].var_names)
    for adata in sections[1:]:
        common = common[common.isin(adata.var_names)]
    if len(common) < n:
        raise SectionError(
            f"only {len(common)} genes are measured in all {len(sections)} sections, fewer "
            f"than the {n} asked for; ask for fewer genes or leave out the smallest panel"
        )
    totals = sum(_column_sums(adata, common) for adata in sections)
    order = np.lexsort((np.asarray(common, dtype=str), -totals))
    return [str(g) for g in common[order[:n]]]


def _column_sums(adata: ad.AnnData, genes: pd.Index) -> np.ndarray:
    idx = adata.var_names.get_indexer(genes)
    return np.asarray(adata.X[:, idx].sum(axis=0), dtype=np.float64).ravel()


def counts_matrix(adata: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
    """Dense ``(n_spots, len(genes))`` float64 counts of ``genes``, in that order."""
    idx = adata.var_names.get_indexer(pd.Index(genes))
    missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
    if missing:
        raise SectionError(
            f"section {section_name(adata)!r} lacks {len(missing)} of the {len(genes)} genes "
            f"(e.g. {', '.join(missing[:5])}); use a model whose genes this section measures"
        )
    X = adata.X[:, idx]
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def normalize_counts(counts: np.ndarray, method: str = "log_relative") -> np.ndarray:
    """Normalise ``(n_spots, G)`` raw counts per spot over the given genes; float32.

    ``log_relative``: ``ln((c + 1) / Σ_g (c + 1))``; ``log1p_cp10k``: ``ln(1 + 1e4 c / Σ_g c)``,
    with zeros for spots without counts.
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalisation {method!r}; use one of {', '.join(NORMALIZATIONS)}"
        )
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise SectionError(f"counts must be (spots, genes), got shape {c.shape}")
    if not np.isfinite(c).all():
        raise SectionError("counts hold NaN or infinite values; pass raw counts")
    if (c < 0).any():
        raise SectionError("counts hold negative values; pass raw counts")
    if method == "log_relative":
        c1 = c + 1.0
        return np.log(c1 / c1.sum(axis=1, keepdims=True)).astype(np.float32)
    total = c.sum(axis=1, keepdims=True)
    scaled = np.divide(1e4 * c, total, out=np.zeros_like(c), where=total > 0)
    return np.log1p(scaled).astype(np.float32)


def section_targets(
    section: ad.AnnData, genes: Sequence[str], normalization: str = "log_relative"
) -> np.ndarray:
    """What a model with ``genes`` is trained to predict for each spot of ``section``: their
    counts normalised per spot (:func:`normalize_counts`); ``(n_spots, len(genes))`` float32.

    Training targets, the measured truth beside a prediction and the viewer's expression all
    come from here, so they can be compared value for value.

    >>> import anndata as ad, pandas as pd
    >>> s = ad.AnnData(np.array([[1.0, 0.0], [3.0, 3.0]]), var=pd.DataFrame(index=["A", "B"]))
    >>> section_targets(s, ["B", "A"]).round(3)
    array([[-1.099, -0.405],
           [-0.693, -0.693]], dtype=float32)
    """
    return normalize_counts(counts_matrix(section, genes), normalization)
