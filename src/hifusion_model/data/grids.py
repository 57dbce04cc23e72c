"""Spot grids on a bare slide: where to predict when there is no spatial-transcriptomics run.

A grid mimics a real array (Visium: 55 µm spots on a 100 µm hexagonal lattice; legacy ST:
100 µm spots on a 200 µm square lattice) so predictions are comparable with measured data, and
is restricted to tissue by a mask (from :func:`tissue_mask`) and/or a user-drawn polygon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from skimage import filters, measure, morphology

from ..errors import SectionError

if TYPE_CHECKING:
    from .slide import Slide

#: kind -> (pitch µm, spot diameter µm) of the array it imitates.
GRID_DEFAULTS = {"hex": (100.0, 55.0), "square": (200.0, 100.0)}


def grid_source(kind: str) -> str:
    """The ``uns['hifusion']['source']`` of a section of grid spots: what marks its spots as
    placed by the project, not measured (the dense path is the default for them).

    >>> grid_source("hex"), is_grid_source(grid_source("hex"))
    ('grid:hex', True)
    """
    return f"grid:{kind}"


def is_grid_source(source: object) -> bool:
    """Whether a section's ``source`` says its spots are a placed grid (:func:`grid_source`)."""
    return str(source).startswith("grid:")


def spot_grid(
    slide_shape_px: tuple[int, int],
    mpp: float,
    kind: str = "hex",
    pitch_um: float | None = None,
    diameter_um: float | None = None,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
    polygon: np.ndarray | None = None,
    origin: tuple[float, float] | None = None,
    return_indices: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres ``(n, 2)`` as ``(x, y)`` full-resolution px, whole spots inside the slide.

    ``kind='hex'`` puts rows √3/2·pitch apart with odd rows shifted by pitch/2 (every neighbour
    at one pitch, as on Visium); ``'square'`` is the legacy ST lattice. ``pitch_um`` and
    ``diameter_um`` default to the imitated array's. ``origin`` (x, y px) is one lattice point
    (default: the first spot touches the top-left corner). A spot is kept when its centre lies on
    ``mask`` (a boolean image at ``mask_downsample``) and inside ``polygon`` ((N, 2) x, y px).
    With ``return_indices`` also returns ``array_row`` and ``array_col`` (Visium convention on
    hex grids: columns step by 2 along a row, odd rows have odd columns).
    """
    if kind not in GRID_DEFAULTS:
        raise SectionError(
            f"unknown grid kind {kind!r}; use 'hex' (Visium-like) or 'square' (legacy ST)"
        )
    pitch_um = GRID_DEFAULTS[kind][0] if pitch_um is None else float(pitch_um)
    diameter_um = GRID_DEFAULTS[kind][1] if diameter_um is None else float(diameter_um)
    _check_geometry(mpp, pitch_um, diameter_um)
    h, w = slide_shape_px[:2]
    pitch, radius = pitch_um / mpp, diameter_um / 2 / mpp
    dy = pitch * np.sqrt(3) / 2 if kind == "hex" else pitch
    ox, oy = (radius, radius) if origin is None else (float(origin[0]), float(origin[1]))

    rows = np.arange(
        np.ceil((radius - oy) / dy), np.floor((h - radius - oy) / dy) + 1, dtype=np.int64
    )
    shift = (rows % 2) * 0.5 if kind == "hex" else np.zeros(len(rows))
    xs, ys, ii, jj = [], [], [], []
    for i, s in zip(rows, shift, strict=True):
        j = np.arange(
            np.ceil((radius - ox) / pitch - s),
            np.floor((w - radius - ox) / pitch - s) + 1,
            dtype=np.int64,
        )
        xs.append(ox + (j + s) * pitch)
        ys.append(np.full(len(j), oy + i * dy))
        ii.append(np.full(len(j), i))
        jj.append(j)
    if not xs:
        raise SectionError(
            f"a {diameter_um:g} µm spot does not fit on a {w}×{h} px slide at {mpp:g} µm/px"
        )
    xy = np.column_stack([np.concatenate(xs), np.concatenate(ys)])
    row, col = np.concatenate(ii), np.concatenate(jj)

    keep = np.ones(len(xy), bool)
    if mask is not None:
        keep &= _on_mask(xy, mask, mask_downsample)
    if polygon is not None:
        keep &= _in_polygon(xy, polygon)
    if not keep.any():
        raise SectionError(
            "no spot centre lies on the tissue mask and inside the polygon; "
            "draw a polygon over the tissue or lower the grid pitch"
        )
    xy, row, col = xy[keep], row[keep], col[keep]
    if not return_indices:
        return xy
    return xy, *_array_indices(row, col, kind)


def _check_geometry(mpp: float, pitch_um: float, diameter_um: float) -> None:
    for what, value in (("µm/px", mpp), ("pitch", pitch_um), ("spot diameter", diameter_um)):
        if not (np.isfinite(value) and value > 0):
            raise SectionError(f"grid {what} must be a positive number, got {value}")
    if diameter_um > pitch_um:
        raise SectionError(
            f"spot diameter {diameter_um:g} µm exceeds the pitch {pitch_um:g} µm: "
            "spots would overlap"
        )


def _array_indices(row: np.ndarray, col: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Shift indices to start at 0 by even amounts, so row parity (the hex offset) survives."""
    row0 = row.min() - row.min() % 2
    if kind == "hex":
        col = 2 * col + row % 2
    col0 = col.min() - col.min() % 2
    return row - row0, col - col0


def _on_mask(xy: np.ndarray, mask: np.ndarray, downsample: float) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise SectionError(f"the tissue mask must be a 2-D boolean image, got shape {mask.shape}")
    if not downsample > 0:
        raise SectionError(f"mask downsample must be positive, got {downsample}")
    c = np.clip((xy[:, 0] / downsample).astype(np.int64), 0, mask.shape[1] - 1)
    r = np.clip((xy[:, 1] / downsample).astype(np.int64), 0, mask.shape[0] - 1)
    return mask.astype(bool)[r, c]


def _in_polygon(xy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    polygon = np.asarray(polygon, dtype=float)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
        raise SectionError(
            f"the polygon must be (N ≥ 3, 2) vertices (x, y), got shape {polygon.shape}"
        )
    return measure.points_in_poly(xy, polygon)


def on_tissue(xy: np.ndarray, slide: Slide) -> np.ndarray:
    """Which points ``(n, 2)`` (x, y full-resolution px) lie on the slide's tissue mask."""
    return _on_mask(np.asarray(xy, dtype=np.float64), *tissue_mask(slide))


def tissue_mask(slide: Slide, max_px: int = 2048) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail, and its downsample relative to level 0.

    H&E tissue is coloured and the glass is white or grey, so Otsu on the HSV saturation
    separates them; closing joins fragmented stroma, and specks and holes smaller than ~0.1 % of
    the thumbnail are removed.
    """
    image, downsample = slide.thumbnail(max_px)
    mask = tissue_mask_from_image(image)
    if not mask.any():
        raise SectionError(
            f"{slide.path}: no tissue found (the image looks like empty glass); "
            "draw a polygon over the tissue or place a grid without a mask"
        )
    return mask, float(downsample)


def tissue_mask_from_image(image: np.ndarray) -> np.ndarray:
    """The tissue mask of an RGB(A) or grey ``uint8`` image (all False when there is no tissue)."""
    saturation = _saturation(np.asarray(image))
    if np.ptp(saturation) < 0.05:  # uniform: all glass (or all tissue, which Otsu cannot tell)
        return np.full(saturation.shape, saturation.mean() >= 0.1)
    mask = saturation > max(filters.threshold_otsu(saturation), 0.05)
    footprint = morphology.disk(max(1, round(min(mask.shape) / 200)), decomposition="sequence")
    mask = morphology.opening(morphology.closing(mask, footprint), footprint)
    min_area = max(16, mask.size // 1000)
    mask = morphology.remove_small_objects(mask, max_size=min_area)
    return morphology.remove_small_holes(mask, max_size=min_area)


def _saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation, (max − min) / max per pixel, without a float64 HSV copy of the image."""
    if image.ndim == 2:
        return np.zeros(image.shape, np.float32)
    rgb = image[..., :3]
    hi, lo = rgb.max(axis=2).astype(np.float32), rgb.min(axis=2).astype(np.float32)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)

#: Grids above this many spots get a warning with a time estimate, at the CPU speed measured
#: for the released architecture (BENCHMARKS.md: 10 to 18 spots/s on 2 cores).
LARGE_GRID = 100_000
CPU_SPOTS_PER_S = 10


def large_grid_warning(n_spots: int) -> str | None:
    """What to tell a user about to predict ``n_spots`` (None below :data:`LARGE_GRID`)."""
    if n_spots <= LARGE_GRID:
        return None
    return (f"the grid has {n_spots:,} spots, roughly {n_spots / CPU_SPOTS_PER_S / 3600:.1f} h "
            "to predict on a CPU; a larger pitch or the tissue mask needs fewer")
