"""TIFF slides through tifffile: the levels of the first series and the µm/px the file records."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from ..errors import SlideError
from .slide_limits import MAX_WINDOW_BYTES, check_open_size
from .slide_plain import memory_pyramid

#: TIFF resolution tags outside this µm/px range are placeholders (72 dpi, 1 px/cm), not scans.
PLAUSIBLE_MPP = (0.05, 20.0)

_UNIT_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "mm": 1e3,
            "cm": 1e4, "m": 1e6}
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit: inch, cm, mm, µm


def open_tiff(path: Path, lazy: bool = False
               ) -> tuple[list[Any], float | None, tifffile.TiffFile | None]:
    """Levels of the first series; untiled single-level files are decoded into memory.

    ``lazy`` reads untiled files strip by strip instead (for conversion): nothing is decoded
    whole unless one strip holds it all.
    """
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise SlideError(f"cannot read {path} as a TIFF ({e}); the file may be truncated or "
                         "not a TIFF") from e
    try:
        series = tif.series[0]
        mpp = _tiff_mpp(tif)
        if len(series.levels) == 1 and not series.keyframe.is_tiled and not lazy:
            y, x = series.axes.index("Y"), series.axes.index("X")
            check_open_size(path, series.shape[y], series.shape[x], "an untiled TIFF",
                             series.size * series.dtype.itemsize)
            levels = memory_pyramid(_axes_to_yxs(series.asarray(), series.axes, path))
            tif.close()
            return levels, mpp, None
        root = zarr.open(series.aszarr(), mode="r")
        arrays = ([root[k] for k in sorted(root.keys(), key=int)]
                  if isinstance(root, zarr.Group) else [root])
        for a in arrays:
            chunk = math.prod(a.chunks) * a.dtype.itemsize
            if chunk > MAX_WINDOW_BYTES:
                raise SlideError(
                    f"{path} stores its pixels in blocks of {' × '.join(map(str, a.chunks))} "
                    f"values ({chunk / 1e9:.1f} GB each once decoded), too big to read a part "
                    "at a time; save it again as a tiled TIFF (e.g. with QuPath or vips)")
        return [_axes_to_yxs(a, series.axes, path) for a in arrays], mpp, tif
    except SlideError:
        tif.close()
        raise
    except Exception as e:
        tif.close()
        raise SlideError(f"cannot read {path} ({e}); the file may be truncated or corrupt") from e


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """µm/px from OME PhysicalSizeX, then the SVS description, then plausible resolution tags."""
    page = tif.pages.first
    for mpp in (_ome_mpp(tif.ome_metadata) if tif.is_ome else None,
                _svs_mpp(page.description) if tif.is_svs else None):
        if mpp is not None:
            return mpp
    return _resolution_mpp(page)


def _ome_mpp(xml: str | None) -> float | None:
    if not xml:
        return None
    image = tifffile.xml2dict(xml).get("OME", {}).get("Image", {})
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
    if size is None or unit not in _UNIT_UM or not float(size) > 0:
        return None
    return float(size) * _UNIT_UM[unit]


def _svs_mpp(description: str) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    return float(match.group(1)) if match and float(match.group(1)) > 0 else None


def _resolution_mpp(page: tifffile.TiffPage) -> float | None:
    unit_um = _RESUNIT_UM.get(int(page.resolutionunit))
    px_per_unit = page.resolution[0]
    if unit_um is None or not px_per_unit > 0:
        return None
    mpp = unit_um / px_per_unit
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _axes_to_yxs(array: Any, axes: str, path: Path) -> Any:
    """Present a level as (H, W[, C]): YXS and YX as they are, planar or 5-D OME via a view."""
    if axes in ("YXS", "YX"):
        return array
    extra = [(i, a) for i, a in enumerate(axes) if a not in "YX"]
    channel = [i for i, a in extra if a in "CS" and array.shape[i] > 1]
    if any(array.shape[i] > 1 for i, _ in extra if i not in channel) or len(channel) > 1:
        raise SlideError(f"{path} has axes {axes} with shape {tuple(array.shape)}, not one 2-D "
                         "RGB or greyscale image; export a single plane")
    if isinstance(array, np.ndarray):
        return AxesView(array, axes, channel[0] if channel else None)[:, :]
    return AxesView(array, axes, channel[0] if channel else None)


class AxesView:
    """A lazy level whose axes are reordered to (H, W[, C]) on each read (planar/OME-5D files)."""

    def __init__(self, array: Any, axes: str, channel: int | None) -> None:
        self.array, self.axes, self.channel = array, axes, channel
        self.y, self.x = axes.index("Y"), axes.index("X")
        yx = (array.shape[self.y], array.shape[self.x])
        self.shape = yx if channel is None else (*yx, array.shape[channel])
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not all(isinstance(k, slice) for k in key) or len(key) > self.ndim:
            raise TypeError("only slices along (Y, X[, C]) are supported")
        key = key + (slice(None),) * (self.ndim - len(key))
        index: list[Any] = [0] * len(self.axes)
        index[self.y], index[self.x] = key[0], key[1]
        order = [self.y, self.x]
        if self.channel is not None:
            index[self.channel] = key[2]
            order.append(self.channel)
        kept = sorted(order)  # integer indices drop the other axes; keep the relative order
        return np.asarray(self.array[tuple(index)]).transpose([kept.index(a) for a in order])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
