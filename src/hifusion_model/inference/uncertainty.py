"""Per-spot, per-gene uncertainty: the counting noise a prediction must expect at that spot.

Why this and not the model's own disagreement. Measured with the bundled model on its held-out
section C4 (``benchmarks/uncertainty.py``), the Spearman correlation between a candidate and the
absolute error, per gene across spots / on the spot means:

* spread of the level heads around the final prediction: 0.022 / −0.015;
* spread over the eight test-time views: 0.004 / −0.038;
* the counting noise at the spot's true library size (UMIs caught, an oracle): 0.159 / 0.744;
* the same at the library read from the stain, as shipped: 0.096 / 0.452.

The error of a spot is mostly how few transcripts it caught: with few UMIs the measured
``ln((c+1)/Σ(c+1))`` is mostly Poisson noise, whatever the tissue. And the library size can be
seen in the H&E: dense nuclei (haematoxylin) mean many cells and many transcripts. So the
uncertainty is the standard deviation the normalised target would have if each count were
Poisson around the prediction, with the spot's library estimated from its stain by a linear fit
made on the training sections (:class:`NoiseModel`, stored in the checkpoint card). It ranks
spots within a map (dense, well-captured tissue below sparse tissue); its absolute scale
follows the training sections' sequencing depth and is only indicative on another lab's slides.

What it is not: a measure of a model's error on a patient unlike its training data. Left out by
the leave-one-section-out protocol, patient C's sections get errors it ranks the right way, but
the new patient's section B4 gets them ranked backwards (Spearman −0.55 to −0.79 per spot,
``BENCHMARKS.md``): there the error is the patient's shift, which counting noise does not see.

>>> import numpy as np
>>> sd = poisson_log_sd(np.array([0.1, 10.0, 1000.0]))
>>> bool(sd[0] < sd[1]) and bool(sd[2] < sd[1])   # zeros are certain; large counts relatively so
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
from skimage.color import rgb2hed

from ..data.expression import counts_matrix
from ..errors import SectionError
from ..models.config import ModelConfig

#: What the library fit reads from a spot patch (at the model's spot scale, every 4th pixel).
#: Chosen by leaving one HER2ST section out (B4, C2, C3, C4): the Spearman correlation of the
#: fitted with the true library averaged 0.708 with the haematoxylin alone and 0.693 with the
#: eosin and the tissue fraction added (docs/experiments.md), so the simpler fit stays.
STAIN_FEATURES = ("haematoxylin",)


def stain_features(spots: np.ndarray) -> np.ndarray:
    """``(n, 1)`` mean haematoxylin optical density (colour deconvolution, Ruifrok & Johnston)
    of uint8 spot patches ``(n, 3, H, W)``; every 4th pixel is enough for a mean."""
    spots = np.asarray(spots)
    if spots.ndim == 3:
        spots = spots[None]
    small = np.ascontiguousarray(spots[:, :, ::4, ::4].transpose(0, 2, 3, 1))
    hed = rgb2hed(small.reshape(-1, small.shape[2], 3)).reshape(small.shape)
    return hed[..., 0].mean(axis=(1, 2))[:, None]


def section_stain_features(section: ad.AnnData, slide: Any, config: ModelConfig,
                           batch_size: int = 64) -> np.ndarray:
    """:func:`stain_features` of every spot of ``section``, read as the model reads it."""
    from ..data.dataset import SpotDataset

    dataset = SpotDataset(section, slide, config, raw=True)
    rows = []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        rows.append(stain_features(np.stack([dataset[i]["spot"].numpy() for i in idx])))
    return np.concatenate(rows) if rows else np.zeros((0, len(STAIN_FEATURES)))


def library_sizes(section: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
    """``Σ_g (c_g + 1)`` over the model's genes: the denominator of the normalised target."""
    return counts_matrix(section, list(genes)).sum(axis=1) + len(genes)


@dataclass(frozen=True)
class NoiseModel:
    """``ln Σ(c+1)`` of a spot as a linear function of its :data:`STAIN_FEATURES`."""

    intercept: float
    coef: tuple[float, ...]
    residual_sd: float  #: of the fit on the training spots, in ln units
    n_spots: int

    def log_library(self, features: np.ndarray) -> np.ndarray:
        return self.intercept + np.asarray(features, dtype=np.float64) @ np.asarray(self.coef)

    def uncertainty(self, pred: np.ndarray, features: np.ndarray) -> np.ndarray:
        """``(n, G)`` float32: :func:`poisson_log_sd` at ``λ = exp(pred)·L̂ − 1``."""
        library = np.exp(self.log_library(features))[:, None]
        lam = np.maximum(np.exp(np.asarray(pred, dtype=np.float64)) * library - 1.0, 0.0)
        return poisson_log_sd(lam).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "poisson_stain_library", "features": list(STAIN_FEATURES),
                "intercept": self.intercept, "coef": list(self.coef),
                "residual_sd": self.residual_sd, "n_spots": self.n_spots}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseModel:
        return cls(float(d["intercept"]), tuple(float(c) for c in d["coef"]),
                   float(d["residual_sd"]), int(d["n_spots"]))

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> NoiseModel | None:
        entry = card.get("noise_model")
        return cls.from_dict(entry) if entry else None


def fit_noise_model(features: np.ndarray, libraries: np.ndarray) -> NoiseModel:
    """Least squares of ``ln(libraries)`` on ``features`` (one row per training spot)."""
    features = np.asarray(features, dtype=np.float64)
    y = np.log(np.asarray(libraries, dtype=np.float64))
    if len(y) < len(STAIN_FEATURES) + 2:
        raise SectionError(f"the noise model needs at least {len(STAIN_FEATURES) + 2} spots "
                           f"with counts, got {len(y)}")
    design = np.column_stack([np.ones(len(y)), features])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ solution
    return NoiseModel(float(solution[0]), tuple(map(float, solution[1:])),
                      float(residual.std()), len(y))


def fit_on_sections(sections: Sequence[tuple[ad.AnnData, Any]], config: ModelConfig
                    ) -> NoiseModel:
    """:func:`fit_noise_model` on the spots of ``(section, slide)`` pairs with counts."""
    features = [section_stain_features(s, slide, config) for s, slide in sections]
    libraries = [library_sizes(s, config.genes) for s, _ in sections]
    return fit_noise_model(np.concatenate(features), np.concatenate(libraries))


# -- the Poisson noise of ln(c + 1) -----------------------------------------------------------

_GRID = np.exp(np.linspace(math.log(1e-4), math.log(1e5), 400))


def _log_sd_exact(lam: np.ndarray, n_max: int = 4000) -> np.ndarray:
    from scipy.special import gammaln

    c = np.arange(n_max, dtype=np.float64)[:, None]
    log_pmf = c * np.log(lam[None, :]) - lam[None, :] - gammaln(c + 1)
    w = np.exp(log_pmf)
    v = np.log1p(c)
    mean = (w * v).sum(axis=0)
    return np.sqrt(np.maximum((w * v * v).sum(axis=0) - mean**2, 0.0))


def _table() -> np.ndarray:
    exact = _GRID <= 1000
    sd = np.empty_like(_GRID)
    sd[exact] = _log_sd_exact(_GRID[exact])
    sd[~exact] = 1.0 / np.sqrt(_GRID[~exact])  # the delta method, exact enough past 1000
    return sd


_SD = _table()


def poisson_log_sd(lam: np.ndarray) -> np.ndarray:
    """SD of ``ln(c + 1)`` for ``c ~ Poisson(lam)``, interpolated in ``ln λ`` from a table."""
    lam = np.clip(np.asarray(lam, dtype=np.float64), _GRID[0], _GRID[-1])
    return np.interp(np.log(lam), np.log(_GRID), _SD)


# -- how well it ranks the error --------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def error_correlation(uncertainty: np.ndarray, pred: np.ndarray, truth: np.ndarray
                      ) -> dict[str, float]:
    """Spearman of the uncertainty with ``|pred − truth|``: ``per_gene`` across the spots of
    each gene, averaged; ``per_spot`` of the spot means over genes; ``pooled`` over all pairs."""
    error = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64))
    u = np.asarray(uncertainty, dtype=np.float64)
    per_gene = [_spearman(u[:, g], error[:, g]) for g in range(error.shape[1])]
    return {"per_gene": float(np.nanmean(per_gene)),
            "per_spot": _spearman(u.mean(axis=1), error.mean(axis=1)),
            "pooled": _spearman(u.ravel(), error.ravel())}


__all__ = [
    "STAIN_FEATURES",
    "NoiseModel",
    "error_correlation",
    "fit_noise_model",
    "fit_on_sections",
    "library_sizes",
    "poisson_log_sd",
    "section_stain_features",
    "stain_features",
]
