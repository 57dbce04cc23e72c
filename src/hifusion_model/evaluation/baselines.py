"""Baselines HiFusion must beat, each fitted on exactly the data the network trains on.

* :class:`ConstantBaseline` predicts the training mean everywhere: per-spot PCC is already high
  with it on HER2ST, per-gene PCC is exactly 0 (see :mod:`hifusion_model.evaluation.metrics`).
* :class:`RidgeBaseline` regresses expression on hand-made colour and texture features of the
  spot patch (RGB and HED statistics, a grey-level histogram, Sobel and LBP texture) plus the
  colour of its region: how much of the signal is plain stain and cell density?
* :class:`~hifusion_model.models.spot_only.SpotOnly`, the spot-only ResNet-18 (ST-Net style), is
  a network: it lives with the others in :mod:`hifusion_model.models` and is trained by the
  same engine and recipe as HiFusion (what do HISM and the region context add over a plain CNN?).

Model selection never looks at test data: the ridge penalty is chosen on the same spatial
validation blocks that training holds out (:func:`hifusion_model.data.splits.validation_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
from skimage.color import rgb2gray, rgb2hed
from skimage.feature import local_binary_pattern
from skimage.filters import sobel

from ..data.dataset import SpotDataset
from ..data.expression import counts_matrix, normalize_counts
from ..data.sections import section_name, section_slide
from ..data.splits import HoldOut, validation_masks
from ..errors import SectionError
from ..models.config import ModelConfig
from ..progress import Progress

# -- shared data preparation ------------------------------------------------------------------


def section_targets(section: ad.AnnData, genes: Sequence[str], normalization: str) -> np.ndarray:
    """The normalised expression the models are trained and scored on, ``(n, G)`` float64."""
    return normalize_counts(counts_matrix(section, genes), normalization).astype(np.float64)


def _split_targets(
    sections: Sequence[ad.AnnData], genes: Sequence[str], normalization: str, recipe: HoldOut
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    targets = [section_targets(s, genes, normalization) for s in sections]
    return targets, validation_masks(sections, recipe)


# -- constant ---------------------------------------------------------------------------------


@dataclass
class ConstantBaseline:
    """Predicts the mean training target of every gene for every spot."""

    genes: list[str]
    train_mean: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, section: ad.AnnData) -> np.ndarray:
        return np.tile(self.train_mean.astype(np.float32), (section.n_obs, 1))


def fit_constant(
    sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    *,
    normalization: str = "log_relative",
    recipe: HoldOut,
) -> ConstantBaseline:
    """The mean over the training spots (validation blocks excluded, as for the networks)."""
    targets, held = _split_targets(sections, genes, normalization, recipe)
    mean = np.concatenate([t[~h] for t, h in zip(targets, held, strict=True)]).mean(axis=0)
    n_train = int(sum((~h).sum() for h in held))
    return ConstantBaseline(list(genes), mean, {"n_train": n_train})


# -- colour and texture features --------------------------------------------------------------

PERCENTILES = (10, 50, 90)
GREY_BINS = 16
LBP_POINTS, LBP_RADIUS = 8, 1


def _as_unit_float(image: np.ndarray) -> np.ndarray:
    """RGB as float64 in ``[0, 1]`` (uint8 is divided by 255)."""
    image = np.asarray(image)
    scale = 1 / 255 if image.dtype == np.uint8 else 1.0
    return image.astype(np.float64) * scale


def _channel_stats(image: np.ndarray, prefix: str, channels: str) -> dict[str, float]:
    out = {}
    for c, name in enumerate(channels):
        v = image[..., c].ravel()
        out[f"{prefix}_{name}_mean"] = v.mean()
        out[f"{prefix}_{name}_std"] = v.std()
        for p, q in zip(PERCENTILES, np.percentile(v, PERCENTILES), strict=True):
            out[f"{prefix}_{name}_p{p}"] = q
    return out


def _named_patch_features(image: np.ndarray) -> dict[str, float]:
    rgb = _as_unit_float(image)
    grey = rgb2gray(rgb)
    features = _channel_stats(rgb, "rgb", "rgb") | _channel_stats(rgb2hed(rgb), "hed", "hed")
    hist = np.histogram(grey, bins=GREY_BINS, range=(0.0, 1.0))[0] / grey.size
    features |= {f"grey_hist_{i:02d}": h for i, h in enumerate(hist)}
    edges = sobel(grey)
    features |= {"sobel_mean": edges.mean(), "sobel_std": edges.std()}
    features |= {f"sobel_p{p}": q for p, q in zip((50, 90), np.percentile(edges, (50, 90)))}
    grey8 = np.round(grey * 255).astype(np.uint8)
    lbp = local_binary_pattern(grey8, LBP_POINTS, LBP_RADIUS, method="uniform")
    n_codes = LBP_POINTS + 2  # uniform patterns 0..P plus one bin for all non-uniform ones
    lbp_hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=n_codes) / lbp.size
    features |= {f"lbp_{i}": h for i, h in enumerate(lbp_hist)}
    return features


def _named_region_features(image: np.ndarray) -> dict[str, float]:
    rgb = _as_unit_float(image)
    hed = rgb2hed(rgb)
    out = {}
    for prefix, im, names in (("region_rgb", rgb, "rgb"), ("region_hed", hed, "hed")):
        for c, name in enumerate(names):
            out[f"{prefix}_{name}_mean"] = im[..., c].mean()
            out[f"{prefix}_{name}_std"] = im[..., c].std()
    return out


def patch_features(spot: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Colour and texture features of one spot (``(H, W, 3)`` RGB, float in ``[0, 1]`` or uint8).

    Spot: per-channel mean, std and 10/50/90th percentiles of RGB and of the haematoxylin,
    eosin and DAB stain densities (HED), a 16-bin grey histogram, Sobel edge-magnitude
    statistics and a uniform-LBP histogram (P=8, R=1); region: mean and std of RGB and HED.
    Names in :data:`FEATURE_NAMES`, in this order.
    """
    named = _named_patch_features(spot) | _named_region_features(region)
    return np.fromiter(named.values(), dtype=np.float64, count=len(named))


_probe = np.linspace(0, 1, 32 * 32 * 3).reshape(32, 32, 3)
#: Names of the columns :func:`patch_features` returns.
FEATURE_NAMES: tuple[str, ...] = tuple(
    _named_patch_features(_probe) | _named_region_features(_probe)
)
del _probe


def section_features(
    section: ad.AnnData, config: ModelConfig, progress: Progress | None = None
) -> np.ndarray:
    """:func:`patch_features` of every spot, ``(n, len(FEATURE_NAMES))``, from the patches
    the networks see (``config.spot_um``/``spot_px``, ``region_um``/``region_px``)."""
    slide = section_slide(section)
    try:
        dataset = SpotDataset(section, slide, config)
        rows = []
        for i in range(len(dataset)):
            sample = dataset[i]
            spot, region = (sample[k].numpy().transpose(1, 2, 0) for k in ("spot", "region"))
            rows.append(patch_features(spot, region))
            if progress is not None:
                progress(i + 1, len(dataset), f"{section_name(section)}: features")
    finally:
        slide.close()
    return np.stack(rows)


# -- ridge regression -------------------------------------------------------------------------

#: Penalties tried on the validation blocks (features are standardised, so one grid fits all).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))


@dataclass
class RidgeFit:
    """A multi-output ridge regression on standardised features."""

    coef: np.ndarray  #: (d, G)
    intercept: np.ndarray  #: (G,)
    x_mean: np.ndarray  #: (d,)
    x_scale: np.ndarray  #: (d,)
    alpha: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.x_mean) / self.x_scale) @ self.coef + self.intercept


def ridge_path(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> list[RidgeFit]:
    """Ridge fits for every ``alpha`` from one SVD of the standardised features.

    ``coef = V diag(s / (s² + α)) Uᵀ (Y − ȳ)``; constant features get scale 1 (they stay 0).
    """
    x_mean = X.mean(axis=0)
    x_scale = X.std(axis=0)
    x_scale[x_scale < 1e-12] = 1.0
    y_mean = Y.mean(axis=0)
    U, s, Vt = np.linalg.svd((X - x_mean) / x_scale, full_matrices=False)
    UtY = U.T @ (Y - y_mean)
    return [
        RidgeFit(Vt.T @ ((s / (s**2 + a))[:, None] * UtY), y_mean, x_mean, x_scale, float(a))
        for a in alphas
    ]


@dataclass
class RidgeBaseline:
    """Ridge regression from :func:`patch_features` to the normalised expression."""

    genes: list[str]
    config: ModelConfig
    fit: RidgeFit
    train_mean: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, section: ad.AnnData) -> np.ndarray:
        return self.fit.predict(section_features(section, self.config)).astype(np.float32)


def fit_ridge(
    sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    config: ModelConfig,
    *,
    recipe: HoldOut,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    progress: Progress | None = None,
) -> RidgeBaseline:
    """Fit on the training spots; pick ``alpha`` by MSE on the held-out spatial blocks.

    The training spots are those the networks train on; the validation blocks only choose the
    penalty (the fit is not repeated on them, so every model has seen the same spots).
    """
    targets, held = _split_targets(sections, genes, config.normalization, recipe)
    features = [section_features(s, config, progress) for s in sections]
    X_train = np.concatenate([f[~h] for f, h in zip(features, held, strict=True)])
    Y_train = np.concatenate([t[~h] for t, h in zip(targets, held, strict=True)])
    X_val = np.concatenate([f[h] for f, h in zip(features, held, strict=True)])
    Y_val = np.concatenate([t[h] for t, h in zip(targets, held, strict=True)])
    if len(X_train) < 2 or len(X_val) < 1:
        raise SectionError(
            f"ridge needs training and validation spots, got {len(X_train)} and {len(X_val)}; "
            "give larger sections"
        )
    fits = ridge_path(X_train, Y_train, alphas)
    val_mse = [float(np.mean((f.predict(X_val) - Y_val) ** 2)) for f in fits]
    best = fits[int(np.argmin(val_mse))]
    info = {
        "alpha": best.alpha,
        "validation_mse": dict(zip(map(str, alphas), val_mse, strict=True)),
        "n_features": len(FEATURE_NAMES),
        "n_train": len(X_train),
        "n_val": len(X_val),
    }
    return RidgeBaseline(list(genes), config, best, Y_train.mean(axis=0), info)


__all__ = [
    "DEFAULT_ALPHAS",
    "FEATURE_NAMES",
    "ConstantBaseline",
    "RidgeBaseline",
    "RidgeFit",
    "fit_constant",
    "fit_ridge",
    "patch_features",
    "ridge_path",
    "section_features",
    "section_targets",
]
