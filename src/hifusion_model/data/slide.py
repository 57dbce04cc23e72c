"""Whole-slide images as lazy pyramids, addressed in micrometres.

A :class:`Slide` hides the file format: pyramidal TIFFs (OME-TIFF, SVS, NDPI, generic tiled
TIFF) are read through tifffile's zarr store, so a patch decodes only the tiles it covers;
plain JPEG/PNG and untiled TIFFs are decoded once and given a 2× block-mean pyramid, so
thumbnails and napari stay fast. Every read returns RGB ``uint8`` whatever the file holds,
because that is what the model and the viewer consume.

Pixel ``i`` spans ``[i, i + 1)``: a window of ``n`` px centred on ``c`` starts at
``round(c - n / 2)``, on every pyramid level.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import struct
import tempfile
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tifffile
import zarr
from PIL import Image

from ..errors import Cancelled, SlideError
from ..io_utils import atomic_path

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8",
                 ".tf2")
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES
COMPRESSIONS = ("jpeg", "zlib")
#: TIFF resolution tags outside this µm/px range are placeholders (72 dpi, 1 px/cm), not scans.
PLAUSIBLE_MPP = (0.05, 20.0)
#: In-memory pyramids stop halving once the longest side is at most this many px.
MIN_LEVEL_PX = 512
#: Pyramid levels of ``convert_to_ome_tiff`` larger than this are buffered on disk, not in RAM.
MAX_BUFFER_BYTES = 64 * 2**20
#: JPEG, PNG and untiled TIFF are decoded whole on open; above this many pixels they are refused
#: (Pillow's decompression-bomb guard stays on at this limit) and ``hifusion convert`` streams
#: them into a tiled OME-TIFF instead. HER2ST's JPEGs hold 92 Mpx; 200 Mpx take ~0.8 GB as RGB.
#: The environment variable ``HIFUSION_MAX_IMAGE_PIXELS`` raises or lowers it.
MAX_OPEN_PIXELS = 200_000_000
#: One region read never allocates more than this; a larger one means an absurd µm/px or
#: region size, and is refused rather than swapping the machine to death.
MAX_WINDOW_BYTES = 2**30
#: Opening a lazy slide decodes its smallest level when it is at most this big, so that a
#: truncated or corrupt file is refused at once (napari reads that level for its contrast).
CHECK_BYTES = 16 * 2**20
#: A thumbnail's source level larger than this is read in bands and halved on the way.
THUMBNAIL_BYTES = 256 * 2**20
#: Decoded tiles kept per slide. Neighbouring spots' regions share most of their tiles, so a
#: section's patches decode each tile about once instead of several times (docs/experiments.md).
TILE_CACHE_BYTES = 128 * 2**20

_UNIT_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "mm": 1e3,
            "cm": 1e4, "m": 1e6}
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit: inch, cm, mm, µm

Progress = Callable[[int, int, str], None]


class Slide:
    """A pyramidal image with its µm per pixel; see the module docstring for conventions.

    ``levels`` are ``(H, W, C)`` array-likes (zarr arrays or numpy; ``(H, W)`` for greyscale)
    holding the file's own values, for display. ``read_region*`` and ``thumbnail`` return RGB
    ``uint8``: alpha is composited on white, grey is stacked, other dtypes are scaled by their
    dtype range (16-bit: ``/ 65535 * 255``; float: clipped to ``[0, 1]``) so that all patches
    of a slide stay comparable.
    """

    def __init__(self, path: Path, levels: list[Any], mpp: float | None, *,
                 handle: tifffile.TiffFile | None = None, mpp_arg: float | None = None) -> None:
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
    @classmethod
    def open(cls, path: str | os.PathLike, mpp: float | None = None) -> Slide:
        """Open ``path`` lazily; ``mpp`` (µm per level-0 px) overrides what the file says."""
        path = Path(path)
        mpp_arg = None if mpp is None else _checked_mpp(mpp, path)
        if not path.exists():
            raise SlideError(f"slide {path} does not exist; check the path")
        from .spatialdata_io import is_zarr_image, zarr_image_levels

        zarr_image = path.is_dir() and is_zarr_image(path)  # e.g. a SpatialData image element
        if not zarr_image and not path.is_file():
            raise SlideError(f"slide {path} is not a file; give the image file itself")
        suffix = path.suffix.lower()
        if zarr_image:
            levels, file_mpp, handle = zarr_image_levels(path), None, None
        elif suffix in TIFF_SUFFIXES:
            levels, file_mpp, handle = _open_tiff(path)
        elif suffix in PLAIN_SUFFIXES:
            levels, file_mpp, handle = _memory_pyramid(_decode_plain(path)), None, None
        else:
            raise SlideError(f"{path}: unknown image format {suffix!r}; supported: "
                             f"{', '.join(SUPPORTED_SUFFIXES)}")
        _check_channels(levels[0], path)
        slide = cls(path, levels, mpp_arg if mpp_arg is not None else file_mpp,
                    handle=handle, mpp_arg=mpp_arg)
        smallest = levels[-1]
        if handle is not None and _nbytes(smallest, *smallest.shape[:2]) <= CHECK_BYTES:
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
        return patch if patch.shape[:2] == (out_px, out_px) else _resize(patch, (out_px, out_px))

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """The whole slide with its longest side at most ``max_px``, and its downsample."""
        if max_px < 1:
            raise SlideError(f"{self.path}: thumbnail size must be at least 1 px, got {max_px}")
        level = self._level_for(max(self.shape) / max_px)
        h, w = self.levels[level].shape[:2]
        if _nbytes(self.levels[level], h, w) <= THUMBNAIL_BYTES:
            image = _to_rgb8(self._fetch(level, 0, h, 0, w))
        else:  # one big level (a tiled TIFF without a pyramid): halve it band by band
            image = self._halved(level, max(0, int(math.log2(max(h, w) / max_px))))
        scale = max_px / max(h, w)
        if scale < 1:
            image = _resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))
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
            part = _to_rgb8(self._fetch(level, r0, min(r0 + band, h // step * step), 0, w))
            for _ in range(times):
                part = _half(part)
            parts.append(part)
        return np.concatenate(parts) if parts else _to_rgb8(self._fetch(level, 0, h, 0, w))

    def _level_for(self, px_size: float) -> int:
        """The coarsest level whose pixels are no larger than ``px_size`` level-0 px.

        1 % slack absorbs levels a pixel short of an exact halving (4.0006× for a 4× level).
        """
        fitting = [i for i, d in enumerate(self.downsamples) if d <= px_size * 1.01]
        return max(fitting, default=0)

    def _read_window(self, level: int, cy: float, cx: float, height: float,
                     width: float) -> np.ndarray:
        """The RGB window of about ``height × width`` level px centred there, white outside."""
        ny, nx = max(1, round(height)), max(1, round(width))
        y0, x0 = math.floor(cy - ny / 2 + 0.5), math.floor(cx - nx / 2 + 0.5)
        h, w = self.levels[level].shape[:2]
        r0, r1, c0, c1 = max(y0, 0), min(y0 + ny, h), max(x0, 0), min(x0 + nx, w)
        _check_window(self.path, ny, nx, self.levels[level],
                      f"a region of {ny} × {nx} px (level {level})")
        if (r0, r1, c0, c1) == (y0, y0 + ny, x0, x0 + nx):
            return _to_rgb8(self._fetch(level, r0, r1, c0, c1))
        out = np.full((ny, nx, 3), 255, np.uint8)
        if r0 < r1 and c0 < c1:
            out[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = _to_rgb8(self._fetch(level, r0, r1, c0, c1))
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
    if isinstance(level, _AxesView):
        chunks = getattr(level.array, "chunks", None)
        return None if chunks is None else (int(chunks[level.y]), int(chunks[level.x]))
    chunks = getattr(level, "chunks", None)
    return None if chunks is None else (int(chunks[0]), int(chunks[1]))


# -- TIFF ------------------------------------------------------------------------------------
def _open_tiff(path: Path, lazy: bool = False
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
            _check_open_size(path, series.shape[y], series.shape[x], "an untiled TIFF",
                             series.size * series.dtype.itemsize)
            levels = _memory_pyramid(_axes_to_yxs(series.asarray(), series.axes, path))
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
        return _AxesView(array, axes, channel[0] if channel else None)[:, :]
    return _AxesView(array, axes, channel[0] if channel else None)


class _AxesView:
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


# -- plain images -----------------------------------------------------------------------------
def max_open_pixels() -> int:
    """:data:`MAX_OPEN_PIXELS`, or ``HIFUSION_MAX_IMAGE_PIXELS`` when that is set."""
    value = os.environ.get("HIFUSION_MAX_IMAGE_PIXELS", "").strip()
    if not value:
        return MAX_OPEN_PIXELS
    try:
        return max(1, int(float(value)))
    except ValueError:
        raise SlideError(f"HIFUSION_MAX_IMAGE_PIXELS must be a number of pixels, got {value!r}"
                         ) from None


def _check_open_size(path: Path, height: int, width: int, kind: str, nbytes: int) -> None:
    """Refuse, before any allocation, an image that would be decoded whole above the limit."""
    limit = max_open_pixels()
    if height * width <= limit:
        return
    raise SlideError(
        f"{path} is {width} × {height} px ({height * width / 1e6:.0f} Mpx, {nbytes / 1e9:.1f} GB "
        f"decoded), more than the {limit / 1e6:.0f} Mpx that {kind} may have to be opened "
        f"whole; convert it once with `hifusion convert {path} {_stem(path)}.ome.tif` (add --mpp "
        "if the file does not record its µm/px), which writes a tiled pyramidal OME-TIFF, and "
        "open that")


def _stem(path: Path) -> Path:
    """Where the converted copy of ``path`` could go: ``X.png`` → ``X`` (+ ``.ome.tif``)."""
    stem = path.with_name(path.name.split(".")[0] or path.stem)
    return stem if stem.with_name(stem.name + ".ome.tif") != path else \
        stem.with_name(stem.name + "_tiled")


def _nbytes(level: Any, height: int, width: int) -> int:
    channels = level.shape[2] if len(level.shape) > 2 else 1
    return height * width * channels * np.dtype(level.dtype).itemsize


def _check_window(path: Path, height: int, width: int, level: Any, what: str) -> None:
    nbytes = height * width * max(3, level.shape[2] if len(level.shape) > 2 else 1) * \
        np.dtype(level.dtype).itemsize
    if nbytes > MAX_WINDOW_BYTES:
        raise SlideError(f"{path}: {what} would take {nbytes / 1e9:.1f} GB of memory; the µm per "
                         "pixel (--mpp) or the region size is far off, check them")


@contextlib.contextmanager
def _pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb guard at our limit (its default, ~89 Mpx, is below a slide).

    Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that, so it is set to half
    the limit and its warning is silenced: it refuses exactly what :func:`_check_open_size`
    refuses first (with a message that says what to do), as a second line of defence.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_open_pixels() // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode_plain(path: Path, check_size: bool = True) -> np.ndarray:
    """JPEG/PNG pixels as stored (no EXIF rotation: spot coordinates refer to stored pixels)."""
    try:
        with contextlib.ExitStack() as stack:
            if check_size:
                stack.enter_context(_pixel_limit())
            im = stack.enter_context(Image.open(path))
            if check_size:
                _check_open_size(path, im.height, im.width, f"a {im.format or 'plain'} image",
                                 im.width * im.height * len(im.getbands()))
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L"):
                im = im.convert("RGBA" if "transparency" in im.info or "A" in im.mode else "RGB")
            return np.asarray(im)
    except Image.DecompressionBombError as e:  # Pillow's guard (twice the limit): say the same
        with _pixel_limit_off(), Image.open(path) as im:
            _check_open_size(path, im.height, im.width, f"a {im.format or 'plain'} image",
                             im.width * im.height * len(im.getbands()))
        raise SlideError(f"{path} is too large to decode whole ({e}); convert it with "
                         "`hifusion convert`, which writes a tiled pyramidal OME-TIFF") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise SlideError(f"cannot decode {path} ({e}); the file may be truncated or not a "
                         f"{path.suffix} image") from e


class PngRows:
    """Rows of a PNG decoded in order, a band at a time: bounded memory for any size.

    Pillow decodes a PNG only whole. Here the zlib stream is inflated just far enough for the
    rows asked for, and Pillow's C code undoes the row filters: each band is handed to it as a
    small PNG of its own (stored, not recompressed), led by the last row of the band before,
    which the filters of the first row refer to. The band PNG pretends to be 8-bit grey, grey +
    alpha, RGB or RGBA with the real file's bytes per pixel, so the filter arithmetic is the
    same and the bytes come back exactly as stored; they are then read in the real format
    (palette, 1-16 bits). Interlaced and 16-bit colour PNGs cannot be read this way
    (:attr:`streamable` is False).
    """

    _FAKE: ClassVar[dict[int, int]] = {1: 0, 2: 4, 3: 2, 4: 6}  # bytes/px → 8-bit colour type
    _CHANNELS: ClassVar[dict[int, int]] = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
    SIGNATURE = b"\x89PNG\r\n\x1a\n"
    STEP_BYTES = 4 * 2**20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._next_row = 0
        self._previous: bytes | None = None
        self._inflate = zlib.decompressobj()
        self._pending = b""
        self._chunk_left = self._first_idat_length

    def _read_header(self) -> None:
        f = self._file
        if f.read(8) != self.SIGNATURE:
            raise SlideError(f"{self.path} is not a PNG file")
        self.palette: bytes | None = None
        self.transparency: bytes | None = None
        header = None
        while True:
            length, kind = self._chunk_head()
            if kind == b"IDAT":
                self._first_idat_length = length
                break
            if length > 2**26:
                raise SlideError(f"{self.path}: a {kind!r} chunk of {length} bytes; the file is "
                                 "corrupt")
            data = f.read(length)
            f.read(4)  # CRC
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", data[:13])
            elif kind == b"PLTE":
                self.palette = data
            elif kind == b"tRNS":
                self.transparency = data
            elif kind == b"IEND":
                raise SlideError(f"{self.path} holds no image data (no IDAT chunk)")
        if header is None:
            raise SlideError(f"{self.path} has no PNG header (IHDR)")
        width, height, self.depth, self.colour, _, _, interlace = header
        if self.colour not in self._CHANNELS or width < 1 or height < 1:
            raise SlideError(f"{self.path}: unsupported PNG header {header}")
        self.shape_hw = (height, width)
        channels = self._CHANNELS[self.colour]
        self.bpp = max(1, channels * self.depth // 8)
        self.row_bytes = (width * channels * self.depth + 7) // 8
        self.streamable = interlace == 0 and self.bpp in self._FAKE
        if self.colour == 3:
            self.channels = 4 if self.transparency else 3
        else:
            self.channels = channels
        self.dtype = np.dtype(np.uint16 if self.depth == 16 and channels == 1 else np.uint8)
        self.shape = (height, width) if self.channels == 1 else (height, width, self.channels)
        self.ndim = len(self.shape)

    def _chunk_head(self) -> tuple[int, bytes]:
        head = self._file.read(8)
        if len(head) < 8:
            raise SlideError(f"{self.path} ends before its image data; the file is truncated")
        return struct.unpack(">I", head[:4])[0], head[4:]

    def _compressed(self) -> bytes:
        """The next piece of the zlib stream (IDAT chunks joined), b"" at its end."""
        while self._chunk_left == 0:
            self._file.read(4)  # CRC of the chunk before
            length, kind = self._chunk_head()
            if kind != b"IDAT":
                return b""
            self._chunk_left = length
        piece = self._file.read(min(self._chunk_left, 2**20))
        if not piece:
            return b""
        self._chunk_left -= len(piece)
        return piece

    def _filtered(self, n: int) -> bytes:
        """The next ``n`` rows as stored: a filter byte and ``row_bytes`` bytes each."""
        need = n * (self.row_bytes + 1)
        out = bytearray()
        while len(out) < need:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self._compressed()
                if not data:
                    got = self._next_row + len(out) // (self.row_bytes + 1)
                    raise SlideError(f"{self.path} is truncated or corrupt: its image data ends "
                                     f"at row {got} of {self.shape_hw[0]}")
            try:
                out += self._inflate.decompress(data, need - len(out))
            except zlib.error as e:
                raise SlideError(f"cannot decode {self.path} ({e}); the file is corrupt") from e
            self._pending = self._inflate.unconsumed_tail
        return out

    def _unfilter(self, filtered: bytearray, n: int) -> bytes:
        """Raw row bytes of ``n`` filtered rows, through Pillow (see the class docstring)."""
        lead = b"" if self._previous is None else b"\0" + self._previous
        rows = n + (self._previous is not None)
        header = struct.pack(">IIBBBBB", self.row_bytes // self.bpp, rows, 8,
                             self._FAKE[self.bpp], 0, 0, 0)
        store = zlib.compressobj(0)
        data = store.compress(lead) + store.compress(filtered) + store.flush()
        del filtered
        png = b"".join((self.SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", data),
                        _png_chunk(b"IEND", b"")))
        del data
        try:
            with Image.open(io.BytesIO(png)) as im:
                raw = im.tobytes()
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"cannot decode {self.path} ({e}); the file is corrupt") from e
        raw = raw[self.row_bytes:] if lead else raw
        self._previous = raw[-self.row_bytes:]
        return raw

    def __getitem__(self, key: Any) -> np.ndarray:
        """``rows[r0:r1]`` or ``rows[r0:r1, c0:c1]``, rows following the ones read before."""
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = key[0], key[1] if len(key) > 1 else slice(None)
        r0, r1, _ = rows.indices(self.shape_hw[0])
        if not self.streamable:
            raise SlideError(f"{self.path} is an interlaced or 16-bit colour PNG, which cannot "
                             "be decoded a band at a time")
        if r0 != self._next_row:
            raise ValueError(f"rows must be read in order: {r0} asked, {self._next_row} next")
        out = np.empty((max(0, r1 - r0), *self.shape[1:]), self.dtype)
        step = max(1, self.STEP_BYTES // self.row_bytes)  # a few copies of this much at a time
        for a in range(r0, r1, step):
            n = min(step, r1 - a)
            out[a - r0:a - r0 + n] = self._pixels(self._unfilter(self._filtered(n), n), n)
            self._next_row = a + n
        return out[:, cols]

    def _pixels(self, raw: bytes, n: int) -> np.ndarray:
        """Raw row bytes in the real format as (n, W[, C]), the way Pillow + Slide show them."""
        width = self.shape_hw[1]
        flat = np.frombuffer(raw, np.uint8).reshape(n, self.row_bytes)
        if self.depth < 8:
            bits = np.unpackbits(flat, axis=1).reshape(n, -1, self.depth)
            weights = 1 << np.arange(self.depth - 1, -1, -1, dtype=np.uint8)
            values = (bits * weights).sum(axis=2, dtype=np.uint8)[:, :width]
            if self.colour == 0:  # Pillow scales grey to 0..255
                return values * np.uint8(255 // (2**self.depth - 1))
            flat = values
        if self.colour == 3:
            lut = np.zeros((256, 4), np.uint8)
            lut[:, 3] = 255
            colours = np.frombuffer(self.palette or b"", np.uint8)[: 256 * 3].reshape(-1, 3)
            lut[: len(colours), :3] = colours
            alpha = np.frombuffer(self.transparency or b"", np.uint8)[:256]
            lut[: len(alpha), 3] = alpha
            return lut[flat[:, :width], : self.channels]
        if self.depth == 16:
            pixels = flat.reshape(n, width, -1, 2)
            if self.colour == 0:
                return (pixels[..., 0, 0].astype(np.uint16) << 8) | pixels[..., 0, 1]
            return pixels[..., 0].copy()  # grey + alpha: Pillow keeps the high bytes
        return flat.reshape(n, width, self.channels) if self.channels > 1 else flat.copy()

    def close(self) -> None:
        self._file.close()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _memory_pyramid(image: np.ndarray) -> list[np.ndarray]:
    levels = [image]
    while max(levels[-1].shape[:2]) > MIN_LEVEL_PX and min(levels[-1].shape[:2]) >= 2:
        levels.append(_half(levels[-1]))
    return levels


def _half(a: np.ndarray) -> np.ndarray:
    """2× block mean (odd last row/column dropped), in the input's dtype."""
    a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2]
    if a.dtype == np.uint8 and (a.ndim == 2 or a.shape[2] in (3, 4)):
        # Pillow's C box filter gives the same result 3× faster than numpy.
        return np.asarray(Image.fromarray(np.ascontiguousarray(a)).reduce(2))
    acc = np.uint16 if a.dtype == np.uint8 else np.float64
    total = a[0::2, 0::2].astype(acc) + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    if a.dtype == np.uint8:
        return ((total + 2) // 4).astype(np.uint8)
    mean = total / 4
    return (np.rint(mean) if np.issubdtype(a.dtype, np.integer) else mean).astype(a.dtype)


# -- pixel conversion -------------------------------------------------------------------------
def _check_channels(level: Any, path: Path) -> None:
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


def _to_rgb8(a: np.ndarray) -> np.ndarray:
    """Any (H, W[, C]) pixels as (H, W, 3) uint8 RGB (see :class:`Slide`)."""
    a = _as_uint8(a if a.ndim == 3 else a[..., None])
    if a.shape[2] in (2, 4):
        alpha = a[..., -1:].astype(np.float32) / 255
        a = np.rint(a[..., :-1] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to ``shape`` (H, W).

    Pillow's bilinear filter widens with the shrink factor, so it anti-aliases like
    ``skimage.transform.resize(anti_aliasing=True)`` at a tenth of the cost per patch.
    """
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize(shape[::-1], Image.Resampling.BILINEAR))


def _checked_mpp(mpp: float, path: Path) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SlideError(f"µm per pixel for {path} must be a positive number, got {mpp!r}")
    return value


# -- conversion -------------------------------------------------------------------------------
def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(path: Path, nbytes: int, why: str) -> None:
    available = _available_memory()
    if available is not None and nbytes > 0.8 * available:
        raise SlideError(f"{path}: {why} needs {nbytes / 1e9:.1f} GB of memory and "
                         f"{available / 1e9:.1f} GB are available; convert it on a machine with "
                         "more memory, or save it as a tiled TIFF with another tool (vips, QuPath)")


def _open_for_streaming(path: str | os.PathLike, mpp: float | None) -> Slide:
    """``path`` as a one-level slide whose rows can be read in order with bounded memory.

    PNG rows are decoded a band at a time (:class:`PngRows`); TIFF strips and tiles are read
    as needed. A JPEG cannot be decoded in parts: it is decoded once, straight into one array
    (libjpeg-turbo via imagecodecs: the same pixels as Pillow, without Pillow's 4 bytes per
    pixel and the copy to numpy), after checking that the memory is there.
    """
    path = Path(path)
    mpp_arg = None if mpp is None else _checked_mpp(mpp, path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in PLAIN_SUFFIXES:
        if suffix in TIFF_SUFFIXES and path.is_file():
            levels, file_mpp, handle = _open_tiff(path, lazy=True)
            _check_channels(levels[0], path)
            return Slide(path, levels[:1], mpp_arg if mpp_arg is not None else file_mpp,
                         handle=handle, mpp_arg=mpp_arg)
        return Slide.open(path, mpp)  # its errors: missing file, unknown format
    try:  # the header only: the size decides how to decode
        with _pixel_limit_off(), Image.open(path) as im:
            kind, (w, h), bands = im.format, im.size, len(im.getbands())
    except (OSError, SyntaxError, ValueError) as e:
        raise SlideError(f"cannot decode {path} ({e}); the file may be truncated or not a "
                         f"{path.suffix} image") from e
    if kind == "PNG":
        rows = PngRows(path)
        if rows.streamable:
            return Slide(path, [rows], mpp_arg, handle=rows, mpp_arg=mpp_arg)  # type: ignore[arg-type]
        rows.close()
    _check_memory(path, w * h * max(bands, 3) * 2, f"decoding this {w} × {h} px {kind} whole")
    image = _decode_jpeg(path) if kind == "JPEG" else None
    if image is None:
        with _pixel_limit_off():
            image = _decode_plain(path, check_size=False)
    _check_channels(image, path)
    return Slide(path, [image], mpp_arg, mpp_arg=mpp_arg)


@contextlib.contextmanager
def _pixel_limit_off() -> Iterator[None]:
    """For conversion only, which streams or has checked the memory first."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """An RGB or grey JPEG straight into numpy, or None to let Pillow do it (CMYK, odd files)."""
    try:
        import imagecodecs

        with _pixel_limit(), Image.open(path) as im:
            mode, size = im.mode, im.size
        if mode not in ("RGB", "L"):
            return None
        image = imagecodecs.jpeg8_decode(path.read_bytes())
    except Exception:  # noqa: BLE001 (Pillow gets its chance, and names the problem)
        return None
    expected = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return image if image.dtype == np.uint8 and image.shape == expected else None


def convert_to_ome_tiff(src: str | os.PathLike, dst: str | os.PathLike, mpp: float | None = None,
                        tile: int = 512, progress: Progress | None = None, *,
                        compression: str = "jpeg", quality: int = 90,
                        should_stop: Callable[[], bool] | None = None) -> Path:
    """Write ``src`` as a tiled pyramidal OME-TIFF carrying its µm/px; returns ``dst``.

    Level 0 is streamed from the source one band of ``tile`` rows at a time, and each level is
    the 2× block mean of the one before (buffered on disk when large), so a big TIFF is never
    loaded whole. Pixels are written as RGB ``uint8``; ``jpeg`` at ``quality``, ``zlib`` lossless.
    """
    dst = Path(dst)
    if tile < 16 or tile % 16:
        raise SlideError(f"tile size must be a positive multiple of 16, got {tile}")
    if compression not in COMPRESSIONS:
        raise SlideError(f"compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"got {compression!r}")
    with _open_for_streaming(src, mpp) as slide:
        if slide.mpp is None:
            raise SlideError(f"{slide.path} does not record its µm per pixel; give it with --mpp "
                             "(mpp=...) so that the OME-TIFF carries it")
        shapes = _pyramid_shapes(slide.shape, tile)
        total = sum(math.ceil(h / tile) for h, _ in shapes)
        done = 0

        def tick(level: int) -> None:
            nonlocal done
            if should_stop is not None and should_stop():
                raise Cancelled(f"conversion of {slide.path} cancelled; {dst} was not written")
            done += 1
            if progress is not None:
                progress(done, total, f"level {level + 1}/{len(shapes)}")

        def level0_rows(r0: int, r1: int) -> np.ndarray:
            return _to_rgb8(slide._fetch(0, r0, r1, 0, slide.shape[1]))

        codec = {"compression": "jpeg", "compressionargs": {"level": quality}} \
            if compression == "jpeg" else {"compression": "zlib", "predictor": True}
        with atomic_path(dst) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent) as scratch, \
                contextlib.ExitStack() as buffers, \
                tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as writer:
            rows: Callable[[int, int], np.ndarray] = level0_rows
            for k, (h, w) in enumerate(shapes):
                below = _scratch_array(shapes[k + 1], Path(scratch) / f"{k + 1}.rows") \
                    if k + 1 < len(shapes) else None
                if isinstance(below, DiskRows):
                    buffers.callback(below.close)
                level_um = slide.mpp * 2**k
                extra: dict[str, Any] = {"subfiletype": 1} if k else {
                    "subifds": len(shapes) - 1,
                    "metadata": {"axes": "YXS", "Name": slide.path.stem,
                                 "PhysicalSizeX": slide.mpp, "PhysicalSizeXUnit": "µm",
                                 "PhysicalSizeY": slide.mpp, "PhysicalSizeYUnit": "µm"}}
                writer.write(_level_tiles(rows, (h, w), tile, below, lambda k=k: tick(k)),
                             shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                             resolution=(1e4 / level_um, 1e4 / level_um),
                             resolutionunit="CENTIMETER", **codec, **extra)
                if below is not None:
                    rows = lambda r0, r1, b=below: b[r0:r1]  # noqa: E731
    return dst


def _pyramid_shapes(shape: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Level shapes, halving (floor) until the longest side fits in one tile."""
    shapes = [shape]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


def _scratch_array(shape: tuple[int, int], path: Path) -> Any:
    if shape[0] * shape[1] * 3 <= MAX_BUFFER_BYTES:
        return np.empty((*shape, 3), np.uint8)
    return DiskRows(path, (*shape, 3))


class DiskRows:
    """A (H, W, C) uint8 array in a scratch file, written and read by whole rows.

    Plain reads and writes rather than a memory map: the pages of a map count as the process's
    own memory (RSS) until the kernel writes them back; these stay in the page cache.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.shape, self.dtype = shape, np.dtype(np.uint8)
        self._row = int(np.prod(shape[1:]))
        self._file = open(path, "w+b")  # noqa: SIM115 (closed with the scratch folder's file)
        self._file.truncate(shape[0] * self._row)

    def __setitem__(self, rows: slice, value: np.ndarray) -> None:
        r0, r1, _ = rows.indices(self.shape[0])
        value = np.ascontiguousarray(np.broadcast_to(value, (r1 - r0, *self.shape[1:])),
                                     np.uint8)
        os.pwrite(self._file.fileno(), value.tobytes(), r0 * self._row)

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, _ = rows.indices(self.shape[0])
        data = os.pread(self._file.fileno(), (r1 - r0) * self._row, r0 * self._row)
        return np.frombuffer(data, np.uint8).reshape(r1 - r0, *self.shape[1:])

    def close(self) -> None:
        self._file.close()


def _level_tiles(rows: Callable[[int, int], np.ndarray], shape: tuple[int, int], tile: int,
                 below: np.ndarray | None, tick: Callable[[], None]) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order; fills the next level's buffer on the way."""
    h, w = shape
    for r0 in range(0, h, tile):
        band = rows(r0, min(r0 + tile, h))
        if below is not None:
            half = _half(band)
            below[r0 // 2:r0 // 2 + half.shape[0]] = half[:, :below.shape[1]]
        tick()  # before yielding: the writer stops pulling once it has the last tile
        for c0 in range(0, w, tile):
            yield np.ascontiguousarray(band[:, c0:c0 + tile])


__all__ = ["COMPRESSIONS", "SUPPORTED_SUFFIXES", "Slide", "convert_to_ome_tiff"]
