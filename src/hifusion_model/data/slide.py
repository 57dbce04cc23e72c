"""Whole-slide images as lazy pyramids, addressed in micrometres.

A :class:`Slide` hides the file format: pyramidal TIFFs (OME-TIFF, SVS, NDPI, generic tiled
TIFF) are read through tifffile's zarr store (:mod:`.slide_tiff`), so a patch decodes only the
tiles it covers; scanner formats go through OpenSlide when it is installed
(:mod:`.slide_openslide`); plain JPEG/PNG and untiled TIFFs are decoded once and given a 2×
block-mean pyramid (:mod:`.slide_plain`), so thumbnails and napari stay fast. Every read
returns RGB ``uint8`` whatever the file holds, because that is what the model and the viewer
consume. :mod:`.slide_limits` bounds the memory any of this may take.

Pixel ``i`` spans ``[i, i + 1)``: a window of ``n`` px centred on ``c`` starts at
``round(c - n / 2)``, on every pyramid level.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import SlideError
from .slide_limits import check_window, level_nbytes
from .slide_openslide import OPENSLIDE_SUFFIXES, open_openslide, use_openslide
from .slide_plain import decode_plain, halve, memory_pyramid
from .slide_tiff import AxesView, open_tiff

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8",
                 ".tf2")
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")
SUPPORTED_SUFFIXES = tuple(dict.fromkeys(TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + PLAIN_SUFFIXES))
#: Opening a lazy slide decodes its smallest level when it is at most this big, so that a
#: truncated or corrupt file is refused at once (napari reads that level for its contrast).
CHECK_BYTES = 16 * 2**20
#: A thumbnail's source level larger than this is read in bands and halved on the way.
THUMBNAIL_BYTES = 256 * 2**20
#: Decoded tiles kept per slide. Neighbouring spots' regions share most of their tiles, so a
#: section's patches decode each tile about once instead of several times (docs/experiments.md).
TILE_CACHE_BYTES = 128 * 2**20


class Slide:
    """A pyramidal image with its µm per pixel; see the module docstring for conventions.

    ``levels`` are ``(H, W, C)`` array-likes (zarr arrays, OpenSlide levels or numpy; ``(H, W)``
    for greyscale) holding the file's own values, for display; ``handle`` is the open file behind
    lazy levels (anything with ``close()``). ``read_region*`` and ``thumbnail`` return RGB
    ``uint8``: alpha is composited on white, grey is stacked, other dtypes are scaled by their
    dtype range (16-bit: ``/ 65535 * 255``; float: clipped to ``[0, 1]``) so that all patches
    of a slide stay comparable.
    """

    def __init__(self, path: Path, levels: list[Any], mpp: float | None, *,
                 handle: Any = None, mpp_arg: float | None = None) -> None:
        self.path = path
        self.levels = levels
        self.mpp = mpp
        self._handle = handle
        self._mpp_arg = mpp_arg
        self._pid = os.getpid()
        self._closed = False
        h0, w0 = levels[0].shape[:2]
        self.shape: tuple[int, int] = (int(h0), int(w0))
        self._scales = [(h0 / lv.shape[0], w0 / lv.shape[1]) for lv in levels]
        self.downsamples: list[float] = [(sy + sx) / 2 for sy, sx in self._scales]
        self._tiles = [_tile_shape(lv) for lv in levels]
        self._cache = TileCache(TILE_CACHE_BYTES)

    # -- opening -----------------------------------------------------------------------------

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, mpp: float | None = None) -> Slide:
        """Open ``path`` lazily; ``mpp`` (µm per level-0 px) overrides what the file says."""
        path = Path(path)
        mpp_arg = None if mpp is None else checked_mpp(mpp, path)
        if not path.exists():
            raise SlideError(f"slide {path} does not exist; check the path")
        from .spatialdata_stores import is_zarr_image, zarr_image_levels

        zarr_image = path.is_dir() and is_zarr_image(path)  # e.g. a SpatialData image element
        if not zarr_image and not path.is_file():
            raise SlideError(f"slide {path} is not a file; give the image file itself")
        suffix = path.suffix.lower()
        if zarr_image:
            levels, file_mpp, handle = zarr_image_levels(path), None, None
        elif use_openslide(path):
            levels, file_mpp, handle = open_openslide(path)
        elif suffix in TIFF_SUFFIXES:
            levels, file_mpp, handle = open_tiff(path)
        elif suffix in PLAIN_SUFFIXES:
            levels, file_mpp, handle = memory_pyramid(decode_plain(path)), None, None
        else:
            raise SlideError(f"{path}: unknown image format {suffix!r}; supported: "
                             f"{', '.join(SUPPORTED_SUFFIXES)}")
        check_channels(levels[0], path)
        slide = cls(path, levels, mpp_arg if mpp_arg is not None else file_mpp,
                    handle=handle, mpp_arg=mpp_arg)
        smallest = levels[-1]
        if handle is not None and level_nbytes(smallest, *smallest.shape[:2]) <= CHECK_BYTES:
            try:  # a truncated or corrupt file fails here, with a SlideError, not in a viewer
                slide._fetch(len(levels) - 1, 0, smallest.shape[0], 0, smallest.shape[1])
            except SlideError:
                slide.close()
                raise
        return slide

    def require_mpp(self) -> float:
        """The µm/px, or a SlideError saying how to supply it (never a silent default)."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path} does not record its µm per pixel; give it with --mpp (mpp=...), "
                "or import spots with array coordinates so it can be measured")
        return self.mpp

    # -- reading -----------------------------------------------------------------------------
    def read_region(self, center_um: tuple[float, float], size_um: float,
                    out_px: int) -> np.ndarray:
        """A square of ``size_um`` µm centred on ``center_um`` = (x, y) µm: (out, out, 3)."""
        mpp = self.require_mpp()
        if not size_um > 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size_um} µm")
        cx, cy = center_um
        return self.read_region_px((cx / mpp, cy / mpp), size_um / mpp, out_px)

    def read_region_px(self, center_px: tuple[float, float], size_px: float,
                       out_px: int) -> np.ndarray:
        """A square of ``size_px`` level-0 px centred on ``center_px`` = (x, y): (out, out, 3).

        Reads the coarsest level whose pixels are still no larger than the output's, then
        resizes with anti-aliasing; when the crop already has ``out_px`` px it is returned as is.
        """
        size_px, out_px = float(size_px), int(out_px)
        if not size_px > 0 or not math.isfinite(size_px):
            raise SlideError(f"{self.path}: region size must be positive, got {size_px} px")
        if out_px < 1:
            raise SlideError(f"{self.path}: output size must be at least 1 px, got {out_px}")
        level = self._level_for(size_px / out_px)
        sy, sx = self._scales[level]
        cx, cy = center_px
        patch = self._read_window(level, cy / sy, cx / sx, size_px / sy, size_px / sx)
        return patch if patch.shape[:2] == (out_px, out_px) else resize(patch, (out_px, out_px))

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """The whole slide with its longest side at most ``max_px``, and its downsample."""
        if max_px < 1:
            raise SlideError(f"{self.path}: thumbnail size must be at least 1 px, got {max_px}")
        level = self._level_for(max(self.shape) / max_px)
        h, w = self.levels[level].shape[:2]
        if level_nbytes(self.levels[level], h, w) <= THUMBNAIL_BYTES:
            image = to_rgb8(self._fetch(level, 0, h, 0, w))
        else:  # one big level (a tiled TIFF without a pyramid): halve it band by band
            image = self._halved(level, max(0, int(math.log2(max(h, w) / max_px))))
        scale = max_px / max(h, w)
        if scale < 1:
            image = resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))
        return image, self.shape[1] / image.shape[1]

    def close(self) -> None:
        """Release the file; a closed slide cannot be read."""
        if self._handle is not None:
            self._handle.close()
        self._handle, self._closed = None, True

    # -- internals ---------------------------------------------------------------------------
    def _halved(self, level: int, times: int) -> np.ndarray:
        """Level ``level`` halved ``times`` times, read in bands of rows of bounded size."""
        h, w = self.levels[level].shape[:2]
        step = 2**times
        band = max(step, THUMBNAIL_BYTES // 4 // (w * 3) // step * step)
        parts = []
        for r0 in range(0, h // step * step, band):
            part = to_rgb8(self._fetch(level, r0, min(r0 + band, h // step * step), 0, w))
            for _ in range(times):
                part = halve(part)
            parts.append(part)
        return np.concatenate(parts) if parts else to_rgb8(self._fetch(level, 0, h, 0, w))

    def _level_for(self, px_size: float) -> int:
        """The coarsest level whose pixels are no larger than ``px_size`` level-0 px.

        1 % slack absorbs levels a pixel short of an exact halving (4.0006× for a 4× level).
        """
        fitting = [i for i, d in enumerate(self.downsamples) if d <= px_size * 1.01]
        return max(fitting, default=0)

    def _read_window(self, level: int, cy: float, cx: float, height: float,
                     width: float) -> np.ndarray:
        """The RGB window of about ``height × width`` level px centred there, white outside."""
        ny, nx = window_size(height), window_size(width)
        y0, x0 = window_start(cy, ny), window_start(cx, nx)
        h, w = self.levels[level].shape[:2]
        r0, r1, c0, c1 = max(y0, 0), min(y0 + ny, h), max(x0, 0), min(x0 + nx, w)
        check_window(self.path, ny, nx, self.levels[level],
                      f"a region of {ny} × {nx} px (level {level})")
        if (r0, r1, c0, c1) == (y0, y0 + ny, x0, x0 + nx):
            return to_rgb8(self._fetch(level, r0, r1, c0, c1))
        out = np.full((ny, nx, 3), 255, np.uint8)
        if r0 < r1 and c0 < c1:
            out[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = to_rgb8(self._fetch(level, r0, r1, c0, c1))
        return out

    def _fetch(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Raw pixels of a level; decodes only the tiles covering the window."""
        if self._closed:
            raise SlideError(f"{self.path} was closed; open it again with Slide.open")
        if self._handle is not None and os.getpid() != self._pid:
            self._reopen()  # a forked DataLoader worker must not share the parent's file offset
        try:
            if self._tiles[level] is None:
                return np.asarray(self.levels[level][r0:r1, c0:c1])
            return self._assemble(level, r0, r1, c0, c1)
        except SlideError:
            raise
        except Exception as e:  # codec and I/O errors of a damaged file
            raise SlideError(f"cannot decode {self.path} (level {level}, rows {r0}:{r1}, "
                             f"columns {c0}:{c1}): {e}; the file may be truncated or corrupt"
                             ) from e

    def _assemble(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The window cut from whole decoded tiles, each decoded once while it stays cached."""
        array, (th, tw) = self.levels[level], self._tiles[level]
        h, w = array.shape[:2]
        out = np.empty((r1 - r0, c1 - c0, *array.shape[2:]), array.dtype)
        for ty in range(r0 // th, (r1 - 1) // th + 1):
            for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                y0, x0 = ty * th, tx * tw
                tile = self._cache.get(
                    (level, ty, tx),
                    lambda: np.asarray(array[y0:min(y0 + th, h), x0:min(x0 + tw, w)]))
                ya, yb = max(r0, y0), min(r1, y0 + th)
                xa, xb = max(c0, x0), min(c1, x0 + tw)
                out[ya - r0:yb - r0, xa - c0:xb - c0] = tile[ya - y0:yb - y0, xa - x0:xb - x0]
        return out

    def _reopen(self) -> None:
        fresh = Slide.open(self.path, self._mpp_arg)
        self.levels, self._handle, self._pid = fresh.levels, fresh._handle, os.getpid()
        self._cache = fresh._cache  # a fresh lock: a forked one may be held by a dead thread

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for spawned DataLoader workers: they reopen the file rather than copy pixels.
        return {"path": self.path, "mpp": self._mpp_arg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(Slide.open(state["path"], state["mpp"]).__dict__)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g}"
        return (f"Slide({str(self.path)!r}, shape={self.shape}, levels={len(self.levels)}, "
                f"mpp={mpp})")


def window_size(size_px: float) -> int:
    """The whole px a window of ``size_px`` px spans when read (at least one)."""
    return max(1, round(size_px))


def window_start(center_px: float, n: int) -> int:
    """The first px of the ``n``-px window read around ``center_px`` (px ``i`` covers
    ``[i, i + 1)``; a half-px centre tie goes to the later start)."""
    return math.floor(center_px - n / 2 + 0.5)


class TileCache:
    """Decoded tiles by key, least recently used dropped first past ``max_bytes``.

    Thread-safe: prefetching threads share a slide. Two threads missing the same tile may both
    decode it (the lock is not held while decoding); the result is the same.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = load()
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > self.max_bytes and len(self._tiles) > 1:
                    self._bytes -= self._tiles.popitem(last=False)[1].nbytes
        return tile

    def __len__(self) -> int:
        return len(self._tiles)


def _tile_shape(level: Any) -> tuple[int, int] | None:
    """(rows, columns) of a lazily decoded level's chunks; None for in-memory levels."""
    if isinstance(level, np.ndarray):
        return None
    if isinstance(level, AxesView):
        chunks = getattr(level.array, "chunks", None)
        return None if chunks is None else (int(chunks[level.y]), int(chunks[level.x]))
    chunks = getattr(level, "chunks", None)
    return None if chunks is None else (int(chunks[0]), int(chunks[1]))


# -- pixel conversion -------------------------------------------------------------------------
def check_channels(level: Any, path: Path) -> None:
    if len(level.shape) not in (2, 3) or (len(level.shape) == 3 and not 1 <= level.shape[2] <= 4):
        raise SlideError(f"{path} has shape {tuple(level.shape)}; expected (H, W) greyscale or "
                         "(H, W, 3|4) RGB(A)")


def _as_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        scaled = np.clip(a, 0, None).astype(np.float32) * (255 / np.iinfo(a.dtype).max)
    else:
        scaled = np.clip(a.astype(np.float32), 0, 1) * 255
    return np.rint(scaled).astype(np.uint8)


def to_rgb8(a: np.ndarray) -> np.ndarray:
    """Any (H, W[, C]) pixels as (H, W, 3) uint8 RGB (see :class:`Slide`)."""
    a = _as_uint8(a if a.ndim == 3 else a[..., None])
    if a.shape[2] in (2, 4):
        alpha = a[..., -1:].astype(np.float32) / 255
        a = np.rint(a[..., :-1] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to ``shape`` (H, W).

    Pillow's bilinear filter widens with the shrink factor, so it anti-aliases like
    ``skimage.transform.resize(anti_aliasing=True)`` at a tenth of the cost per patch.
    """
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize(shape[::-1], Image.Resampling.BILINEAR))


def checked_mpp(mpp: float, path: Path) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SlideError(f"µm per pixel for {path} must be a positive number, got {mpp!r}")
    return value


__all__ = ["SUPPORTED_SUFFIXES", "Slide"]
