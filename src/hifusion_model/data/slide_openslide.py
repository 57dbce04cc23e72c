"""Scanner formats through OpenSlide, the optional ``openslide`` extra.

OpenSlide knows each vendor's layout (MIRAX's folder of files, Hamamatsu VMS, Leica SCN's
several images, Aperio's and NDPI's quirks), so it reads these suffixes whenever it is
installed and recognises the scanner's layout in the file. Without it the TIFF-based ones (.svs, .ndpi, .scn, .bif) are
still read by tifffile; the others need it. ``openslide`` is imported on the first such file
only, so nothing else pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError

#: Scanner formats that are TIFFs underneath, which tifffile reads too.
TIFF_BASED = (".svs", ".ndpi", ".scn", ".bif")
#: Scanner formats only OpenSlide reads.
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide")
OPENSLIDE_SUFFIXES = TIFF_BASED + OPENSLIDE_ONLY
INSTALL = "pip install napari-hifusion[openslide]"


def _openslide() -> Any:
    """The ``openslide`` module, or None without the extra (or without its C library)."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


def use_openslide(path: Path) -> bool:
    """Whether ``path`` is read through OpenSlide: only OpenSlide reads its format, or it is a
    TIFF-based scanner format and OpenSlide is installed and knows the scanner's layout."""
    suffix = path.suffix.lower()
    return suffix in OPENSLIDE_ONLY or (suffix in TIFF_BASED and _vendor_layout(path))


def _vendor_layout(path: Path) -> bool:
    """Whether OpenSlide is installed and recognises ``path`` as a scanner's own layout.

    A plain tiled TIFF under a scanner's suffix ("generic-tiff" to OpenSlide) gains nothing from
    it and stays with tifffile, which also reads µm/px from its resolution tags.
    """
    openslide = _openslide()
    if openslide is None:
        return False
    try:
        return openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-tiff")
    except Exception:  # noqa: BLE001 (an unreadable file: the TIFF reader names the problem)
        return False


def open_openslide(path: Path) -> tuple[list[OpenSlideLevel], float | None, Any]:
    """Levels of the slide at ``path``, its µm/px (``openslide.mpp-x``) and the open handle."""
    openslide = _openslide()
    if openslide is None:
        raise SlideError(f"{path}: reading {path.suffix} slides needs OpenSlide; install it with "
                         f"`{INSTALL}`")
    try:
        handle = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise SlideError(f"cannot read {path} with OpenSlide ({e}); the file may be truncated or "
                         f"not a {path.suffix} slide") from e
    levels = [OpenSlideLevel(handle, k) for k in range(handle.level_count)]
    return levels, _mpp(handle.properties.get(openslide.PROPERTY_NAME_MPP_X)), handle


def _mpp(value: str | None) -> float | None:
    """µm/px from OpenSlide's property text; None when absent or not a positive number."""
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp is not None and mpp > 0 else None


class OpenSlideLevel:
    """One pyramid level as an (H, W, 4) RGBA ``uint8`` array-like, read region by region.

    OpenSlide addresses regions by their level-0 origin and keeps its own tile cache, so a
    read is one ``read_region`` call; the alpha channel is 0 outside the scanned area.
    """

    def __init__(self, handle: Any, level: int) -> None:
        self.handle, self.level = handle, level
        self.downsample = float(handle.level_downsamples[level])
        width, height = handle.level_dimensions[level]
        self.shape = (int(height), int(width), 4)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise TypeError("only unit-step slices along (Y, X[, C]) are supported")
        rows, cols, *channels = (*key, slice(None), slice(None))[:3]
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return np.zeros((max(0, r1 - r0), max(0, c1 - c0), 4), np.uint8)[..., channels[0]]
        origin = (round(c0 * self.downsample), round(r0 * self.downsample))
        region = self.handle.read_region(origin, self.level, (c1 - c0, r1 - r0))
        return np.asarray(region)[..., channels[0]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
