"""Expression maps: a prediction's spots as a raster over the tissue, aligned in µm with the slide.

A pathologist reads a heat map over the tissue, not 46,000 dots. :func:`expression_map` turns the
spot values of a prediction file (``X``, or its ``truth`` or ``uncertainty`` layer) into one
float32 image per gene by Gaussian-weighted splatting normalised by the weights: every pixel is
the weighted mean of the spots around it, the weight falling as ``exp(-d² / 2σ²)`` with the
distance ``d``. It is what the spots say and nothing more: no value is invented beyond
``reach_um`` of the nearest spot (those pixels are NaN: off the tissue, or a hole in the grid),
and with the default ``σ = pitch / 3`` a spot's neighbours (one pitch away) weigh 1 % as much as
the spot itself, so the map at a spot centre is the spot's value to within a few per cent of
the local contrast, while between spots it blends the nearest ones.

Coordinates. The map lives in the slide's frame in µm: a slide pixel ``(x, y)`` (as in
``obsm['spatial']``) is at ``(x · mpp, y · mpp)`` µm, the napari convention that puts pixel
centres at whole multiples of the scale. Map pixel ``(row, col)`` is centred at
``origin_um + (row, col) · um_per_px`` (``origin_um`` is ``(y, x)``), so in napari the map layer
takes ``scale = (um_per_px,) * 2`` and ``translate = origin_um`` and lies on the slide layer
(``scale = (mpp, mpp)``). The origin is a whole multiple of ``um_per_px``, so maps of one
resolution share one pixel lattice.

On disk (:func:`write_map`) a map is a tiled, pyramidal, float32 OME-TIFF, one channel per gene
named after it, ``PhysicalSizeX/Y`` in µm, the origin as each plane's ``PositionX/Y`` (µm, the
top-left pixel's centre) and the map's parameters as JSON in the image's ``Description``; the
spot values stay in the prediction ``.h5ad``.

>>> import numpy as np
>>> xy = np.array([[100.0, 100.0], [200.0, 100.0], [150.0, 186.6]])  # µm, a hex triangle
>>> m = interpolate_spots(xy, np.array([[1.0], [2.0], [3.0]]), ["ERBB2"], um_per_px=10)
>>> m.data.shape, m.um_per_px, m.origin_um
((1, 26, 27), 10.0, (20.0, 20.0))
>>> row, col = m.pixel_of((100.0, 100.0))     # the first spot, (x, y) µm
>>> round(float(m.data[0, row, col]), 1)     # ≈ its value
1.0
>>> bool(np.isnan(m.data[0, 0, 0]))          # a corner, farther than reach_um from any spot
True
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, SectionError
from ..io_utils import atomic_path
from ..progress import Progress

#: Marker and version of the map's JSON in the OME ``Description`` (what :func:`is_map_file` reads).
MAP_FORMAT = "hifusion-map/1"
#: Default map pixel: a fifth of the spot pitch (20 µm on Visium's 100 µm grid).
PX_PER_PITCH = 5
#: Default Gaussian σ and reach, in spot pitches (see the module docstring).
SIGMA_PER_PITCH = 1 / 3
REACH_PER_PITCH = 0.75
#: Pyramid levels are halved until the longest side is at most this (px).
PYRAMID_MIN_PX = 512
#: Most pixels per gene a map may have (16k × 16k): beyond, the resolution is a typo.
MAX_MAP_PIXELS = 16384**2
#: Summed weights below this are float32 underflow (a σ far below the reach), not a value.
TINY_WEIGHT = 1e-30
#: Values ``layer=`` may name, and the AnnData entry each reads.
LAYERS = {"predicted": None, "truth": "truth", "uncertainty": "uncertainty"}


@dataclass
class ExpressionMap:
    """One float32 image per gene, ``(G, H, W)``, NaN where no spot is within ``reach_um``.

    ``origin_um`` is the ``(y, x)`` µm of pixel ``(0, 0)``'s centre in the slide's frame;
    ``levels`` (when read from a file) holds its stored sub-resolutions.
    """

    data: np.ndarray
    genes: list[str]
    um_per_px: float
    origin_um: tuple[float, float]
    pitch_um: float
    sigma_um: float
    reach_um: float
    layer: str = "predicted"
    name: str = ""
    slide: str | None = None
    levels: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def scale(self) -> tuple[float, float]:
        """napari's ``scale`` (µm per map pixel, ``(y, x)``)."""
        return (self.um_per_px, self.um_per_px)

    @property
    def translate(self) -> tuple[float, float]:
        """napari's ``translate``: the µm of pixel ``(0, 0)``'s centre, ``(y, x)``."""
        return self.origin_um

    def channel(self, gene: str) -> np.ndarray:
        """The ``(H, W)`` image of ``gene``."""
        return self.data[_gene_index(self.genes, gene, self.name or "the map")]

    def pixel_of(self, xy_um: Sequence[float]) -> tuple[int, int]:
        """``(row, col)`` of the map pixel holding the point ``(x, y)`` µm."""
        x, y = float(xy_um[0]), float(xy_um[1])
        return (round((y - self.origin_um[0]) / self.um_per_px),
                round((x - self.origin_um[1]) / self.um_per_px))

    def pyramid(self, min_px: int = PYRAMID_MIN_PX) -> list[np.ndarray]:
        """Levels ``(G, h, w)`` halved by NaN-aware 2 × 2 means until the longest side is at most
        ``min_px``; level 0 is padded with NaN to a multiple of ``2^(levels-1)``, so every level
        is an exact halving and viewers place each at ``um_per_px · 2^k`` without drift."""
        if self.levels is not None:
            return self.levels
        return map_pyramid(self.data, min_px)


def map_pyramid(data: np.ndarray, min_px: int = PYRAMID_MIN_PX) -> list[np.ndarray]:
    """The pyramid of a ``(G, H, W)`` map (see :meth:`ExpressionMap.pyramid`)."""
    h, w = data.shape[-2:]
    n = 1
    while max(math.ceil(h / 2 ** (n - 1)), math.ceil(w / 2 ** (n - 1))) > min_px:
        n += 1
    step = 2 ** (n - 1)
    ph, pw = -h % step, -w % step
    base = np.pad(data, ((0, 0), (0, ph), (0, pw)), constant_values=np.nan) if ph or pw else data
    levels = [base]
    for _ in range(n - 1):
        levels.append(_half_nanmean(levels[-1]))
    return levels


def _half_nanmean(a: np.ndarray) -> np.ndarray:
    g, h, w = a.shape
    blocks = a.reshape(g, h // 2, 2, w // 2, 2)
    finite = np.isfinite(blocks)
    total = np.where(finite, blocks, 0).sum(axis=(2, 4), dtype=np.float32)
    count = finite.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


# -- building ---------------------------------------------------------------------------------
def lattice_pitch(xy_um: np.ndarray) -> float:
    """The spot grid's pitch (µm): the median distance from a spot to its nearest neighbour."""
    from scipy.spatial import cKDTree

    xy_um = np.asarray(xy_um, dtype=np.float64)
    if len(xy_um) < 2:
        raise SectionError(f"a map needs the pitch of the spot grid, and {len(xy_um)} spot has "
                           "none; give pitch_um (--pitch-um)")
    sample = xy_um[:: max(1, len(xy_um) // 5000)]  # a few thousand spots say it as well
    d = cKDTree(xy_um).query(sample, k=2)[0][:, 1]
    pitch = float(np.median(d))
    if not pitch > 0:
        raise SectionError("most spots share their position with another; a map needs distinct "
                           "spot centres")
    return pitch


def interpolate_spots(
    xy_um: np.ndarray,
    values: np.ndarray,
    genes: Sequence[str],
    *,
    um_per_px: float | None = None,
    pitch_um: float | None = None,
    sigma_um: float | None = None,
    reach_um: float | None = None,
    layer: str = "predicted",
    name: str = "",
    slide: str | None = None,
    progress: Progress | None = None,
) -> ExpressionMap:
    """The map of spot ``values`` ``(n, G)`` at spot centres ``xy_um`` ``(n, 2)``, ``(x, y)`` µm.

    ``um_per_px`` defaults to a fifth of the pitch, ``sigma_um`` to a third, ``reach_um`` to
    three quarters (farther than the centre of a hex or square cell, 0.58 and 0.71 pitch, so
    the grid's interior is covered, and the rim extends by less than a pitch). A spot whose
    value is NaN (added by hand) is left out of that gene's map, as if it were not there. ``progress(done, G, gene)``
    is called after each gene.
    """
    from scipy.ndimage import gaussian_filter

    xy_um = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(len(xy_um), -1)
    genes = [str(g) for g in genes]
    where = name or "the spots"
    if len(xy_um) == 0:
        raise SectionError(f"{where}: no spots to map")
    if values.shape[1] != len(genes):
        raise SectionError(f"{where}: {values.shape[1]} value columns for {len(genes)} genes")
    if not np.isfinite(xy_um).all():
        raise SectionError(f"{where}: some spot centres are not finite numbers")
    pitch = float(pitch_um) if pitch_um else lattice_pitch(xy_um)
    r = float(um_per_px) if um_per_px else float(f"{pitch / PX_PER_PITCH:.3g}")
    if not (math.isfinite(r) and r > 0):
        raise ConfigError(f"the map's µm per pixel must be a positive number, got {um_per_px}")
    if r > pitch:
        raise ConfigError(f"{where}: a map of {r:g} µm/px is coarser than the {pitch:.4g} µm "
                          f"between spots, so it cannot show them; use at most {pitch:.4g} "
                          f"(e.g. {pitch / PX_PER_PITCH:.3g})")
    # a Gaussian thinner than half a pixel would leave holes between a coarse map's spots
    sigma = max(float(sigma_um) if sigma_um else pitch * SIGMA_PER_PITCH, r / 2)
    reach = max(float(reach_um) if reach_um else pitch * REACH_PER_PITCH, r)
    for label, v in (("sigma_um", sigma), ("reach_um", reach)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"the map's {label} must be a positive number, got {v}")

    lo = xy_um.min(axis=0) - reach  # (x, y)
    hi = xy_um.max(axis=0) + reach
    ox, oy = (math.floor(v / r) * r for v in lo)
    width = math.floor((hi[0] - ox) / r) + 2
    height = math.floor((hi[1] - oy) / r) + 2
    if height * width > MAX_MAP_PIXELS:
        raise ConfigError(f"{where}: a map of {r:g} µm/px would be {height} × {width} px; choose "
                          f"a coarser resolution (e.g. {pitch / PX_PER_PITCH:.3g} µm/px)")

    # bilinear splat of each spot onto its 4 surrounding pixels, then one Gaussian blur of
    # numerator and weights: exact to a fraction of a pixel, and linear in pixels, not spots
    fy, fx = (xy_um[:, 1] - oy) / r, (xy_um[:, 0] - ox) / r
    i0, j0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = fy - i0, fx - j0
    index = np.concatenate([i0 * width + j0, (i0 + 1) * width + j0,
                            i0 * width + j0 + 1, (i0 + 1) * width + j0 + 1])
    share = np.concatenate([(1 - ty) * (1 - tx), ty * (1 - tx), (1 - ty) * tx, ty * tx])
    s_px = sigma / r
    radius = math.ceil(reach / r) + 1  # with the splat's pixel, every pixel within reach counts

    def blurred(weights: np.ndarray) -> np.ndarray:
        flat = np.bincount(index, weights=weights, minlength=height * width)
        return gaussian_filter(flat.reshape(height, width).astype(np.float32), s_px,
                               mode="constant", radius=radius)

    out = np.full((len(genes), height, width), np.nan, np.float32)
    all_finite = np.isfinite(values).all(axis=0)
    base = None
    if all_finite.any():
        base = blurred(share), _within_reach(fy, fx, reach / r, (height, width))
    for g, gene in enumerate(genes):
        column = values[:, g]
        known = np.isfinite(column)
        if known.any():
            weights, near = base if all_finite[g] else (
                blurred(share * np.tile(known, 4)),
                _within_reach(fy[known], fx[known], reach / r, (height, width)))
            numerator = blurred(share * np.tile(np.where(known, column, 0.0), 4))
            np.divide(numerator, weights, out=out[g], where=near & (weights > TINY_WEIGHT))
        if progress is not None:
            progress(g + 1, len(genes), gene)
    return ExpressionMap(data=out, genes=genes, um_per_px=r, origin_um=(oy, ox), pitch_um=pitch,
                         sigma_um=sigma, reach_um=reach, layer=layer, name=name, slide=slide)


def _within_reach(fy: np.ndarray, fx: np.ndarray, reach_px: float,
                  shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies within ``reach_px`` of a spot at ``(fy, fx)`` (pixel units).

    Exact distances: each spot covers, on each row of its disc, one run of columns, marked at
    its two ends and filled by a cumulative sum along the rows (linear in spots and pixels)."""
    h, w = shape
    k = math.ceil(reach_px) + 1
    rows = np.rint(fy).astype(np.int64)[:, None] + np.arange(-k, k + 1)[None]
    half2 = reach_px**2 - (rows - fy[:, None]) ** 2
    ok = (half2 >= 0) & (rows >= 0) & (rows < h)
    half = np.sqrt(half2[ok])
    centre = np.broadcast_to(fx[:, None], rows.shape)[ok]
    row = rows[ok]
    start = np.clip(np.ceil(centre - half), 0, w).astype(np.int64)
    stop = np.clip(np.floor(centre + half) + 1, 0, w).astype(np.int64)
    keep = stop > start
    row, start, stop = row[keep], start[keep], stop[keep]
    n = h * (w + 1)
    edges = (np.bincount(row * (w + 1) + start, minlength=n)
             - np.bincount(row * (w + 1) + stop, minlength=n))
    return np.cumsum(edges.reshape(h, w + 1), axis=1)[:, :w] > 0


def expression_map(
    pred: Any,
    genes: str | Sequence[str],
    *,
    um_per_px: float | None = None,
    layer: str = "predicted",
    pitch_um: float | None = None,
    sigma_um: float | None = None,
    reach_um: float | None = None,
    source: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ExpressionMap:
    """The map of ``genes`` of a prediction AnnData (from ``predict`` or ``hifusion predict``).

    ``layer``: ``predicted`` (``X``), ``truth`` or ``uncertainty``. The spots' µm comes from
    ``obsm['spatial']`` (full-resolution px) times ``uns['hifusion']['mpp']``; ``source`` names
    the file in errors. See :func:`interpolate_spots` for the other parameters.
    """
    from ..data.sections import UNS_KEY

    where = str(source or pred.uns.get(UNS_KEY, {}).get("name") or "the prediction")
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ConfigError(f"{where}: name at least one gene to map")
    if layer not in LAYERS:
        raise ConfigError(f"unknown map layer {layer!r}; use {', '.join(LAYERS)}")
    if pred.n_obs == 0:
        raise SectionError(f"{where}: has no spots to map")
    if "spatial" not in pred.obsm:
        raise SectionError(f"{where}: has no spot centres (obsm['spatial']); predict it again "
                           "with hifusion predict")
    meta = dict(pred.uns.get(UNS_KEY, {}))
    mpp = meta.get("mpp")
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        mpp = float("nan")
    if not (math.isfinite(mpp) and mpp > 0):
        raise SectionError(f"{where}: has no µm/px (uns['{UNS_KEY}']['mpp']), so its spots "
                           "cannot be placed in µm; predict it again with hifusion predict")
    key = LAYERS[layer]
    if key is not None and key not in pred.layers:
        raise SectionError(f"{where}: has no {layer} (layers['{key}']) to map; map the "
                           "predictions instead")
    names = [str(g) for g in pred.var_names]
    columns = [_gene_index(names, g, where) for g in genes]
    matrix = pred.X if key is None else pred.layers[key]
    chosen = matrix[:, columns]
    chosen = chosen.toarray() if hasattr(chosen, "toarray") else np.asarray(chosen)
    xy_um = np.asarray(pred.obsm["spatial"], dtype=np.float64)[:, :2] * mpp
    slide = meta.get("slide_abs") or meta.get("slide")
    return interpolate_spots(
        xy_um, chosen, genes, um_per_px=um_per_px, pitch_um=pitch_um, sigma_um=sigma_um,
        reach_um=reach_um, layer=layer, name=str(meta.get("name") or ""),
        slide=None if slide is None else str(slide), progress=progress)


def _gene_index(names: Sequence[str], gene: str, where: str) -> int:
    try:
        return list(names).index(gene)
    except ValueError:
        close = difflib.get_close_matches(gene, names, n=3) or list(names[:3])
        raise SectionError(f"{where}: no gene {gene!r} among its {len(names)} (e.g. "
                           f"{', '.join(close)}); pick one it holds") from None


# -- files ------------------------------------------------------------------------------------
def write_map(emap: ExpressionMap, path: str | os.PathLike, *, tile: int = 256,
              min_px: int = PYRAMID_MIN_PX) -> Path:
    """Write ``emap`` as a tiled, pyramidal float32 OME-TIFF, atomically (see the module).

    Deflate with the floating-point predictor: NaN off the tissue costs next to nothing.
    """
    import tifffile

    path = Path(path)
    levels = emap.pyramid(min_px)
    r = float(emap.um_per_px)
    oy, ox = (float(v) for v in emap.origin_um)
    n = len(emap.genes)
    info = {"format": MAP_FORMAT, "genes": emap.genes, "layer": emap.layer, "um_per_px": r,
            "origin_um": [oy, ox], "pitch_um": emap.pitch_um, "sigma_um": emap.sigma_um,
            "reach_um": emap.reach_um, "name": emap.name, "slide": emap.slide}
    metadata = {
        "axes": "CYX", "Name": emap.name or "expression map", "Description": json.dumps(info),
        "PhysicalSizeX": r, "PhysicalSizeY": r,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": list(emap.genes)},
        "Plane": {"PositionX": [ox] * n, "PositionY": [oy] * n,
                  "PositionXUnit": ["µm"] * n, "PositionYUnit": ["µm"] * n},
    }
    options = {"tile": (tile, tile), "compression": "zlib", "predictor": True,
               "photometric": "minisblack"}
    big = sum(level.nbytes for level in levels) > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big, ome=True) as tif:
        tif.write(levels[0].astype(np.float32, copy=False), subifds=len(levels) - 1,
                  metadata=metadata, resolution=(1e4 / r, 1e4 / r),
                  resolutionunit="CENTIMETER", **options)
        for k, level in enumerate(levels[1:], start=1):
            tif.write(level.astype(np.float32, copy=False), subfiletype=1,
                      resolution=(1e4 / (r * 2**k), 1e4 / (r * 2**k)),
                      resolutionunit="CENTIMETER", **options)
    return path


def _map_info(tif: Any) -> dict | None:
    """The map's JSON from an open TiffFile's OME ``Description``, or None if not a map."""
    import xml.etree.ElementTree as ET

    xml = tif.ome_metadata
    if not xml or MAP_FORMAT not in xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Description") and element.text and MAP_FORMAT in element.text:
            try:
                info = json.loads(element.text)
            except json.JSONDecodeError:
                return None
            return info if info.get("format") == MAP_FORMAT else None
    return None


def is_map_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a map :func:`write_map` wrote (reads the first header only)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _map_info(tif) is not None
    except Exception:  # noqa: BLE001 (not a TIFF, unreadable: not a map)
        return False


def read_map(path: str | os.PathLike) -> ExpressionMap:
    """A map written by :func:`write_map`, every stored level in memory (plain tifffile)."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SectionError(f"{path}: map file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            info = _map_info(tif)
            if info is None:
                raise SectionError(f"{path}: not an expression map (no {MAP_FORMAT} description); "
                                   "write one with hifusion map")
            series = tif.series[0]
            levels = [np.asarray(level.asarray(), dtype=np.float32) for level in series.levels]
    except tifffile.TiffFileError as e:
        raise SectionError(f"{path}: cannot read as a TIFF ({e})") from e
    levels = [level[None] if level.ndim == 2 else level for level in levels]
    return ExpressionMap(
        data=levels[0], genes=[str(g) for g in info["genes"]], um_per_px=float(info["um_per_px"]),
        origin_um=tuple(float(v) for v in info["origin_um"]), pitch_um=float(info["pitch_um"]),
        sigma_um=float(info["sigma_um"]), reach_um=float(info["reach_um"]),
        layer=str(info.get("layer", "predicted")), name=str(info.get("name") or ""),
        slide=info.get("slide"), levels=levels)


__all__ = [
    "ExpressionMap",
    "expression_map",
    "interpolate_spots",
    "is_map_file",
    "lattice_pitch",
    "map_pyramid",
    "read_map",
    "write_map",
]
