"""``hifusion convert``: any slide to a tiled pyramidal OME-TIFF that carries its µm/px.

The source is streamed one band of rows at a time (:class:`.png_rows.PngRows` for PNG, strips
or tiles for TIFF) and each level is the 2× block mean of the one before, buffered on disk when
large, so an image too big to open whole is converted within bounded memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from ..errors import Cancelled, SlideError
from ..io_utils import atomic_path
from ..progress import Progress, ShouldStop
from .png_rows import PngRows
from .slide import PLAIN_SUFFIXES, TIFF_SUFFIXES, Slide, check_channels, checked_mpp, to_rgb8
from .slide_plain import decode_plain, halve, pixel_limit, pixel_limit_off
from .slide_tiff import open_tiff

COMPRESSIONS = ("jpeg", "zlib")
#: Pyramid levels of ``convert_to_ome_tiff`` larger than this are buffered on disk, not in RAM.
MAX_BUFFER_BYTES = 64 * 2**20




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
    mpp_arg = None if mpp is None else checked_mpp(mpp, path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in PLAIN_SUFFIXES:
        if suffix in TIFF_SUFFIXES and path.is_file():
            levels, file_mpp, handle = open_tiff(path, lazy=True)
            check_channels(levels[0], path)
            return Slide(path, levels[:1], mpp_arg if mpp_arg is not None else file_mpp,
                         handle=handle, mpp_arg=mpp_arg)
        return Slide.open(path, mpp)  # its errors: missing file, unknown format
    try:  # the header only: the size decides how to decode
        with pixel_limit_off(), Image.open(path) as im:
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
        with pixel_limit_off():
            image = decode_plain(path, check_size=False)
    check_channels(image, path)
    return Slide(path, [image], mpp_arg, mpp_arg=mpp_arg)


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """An RGB or grey JPEG straight into numpy, or None to let Pillow do it (CMYK, odd files)."""
    try:
        import imagecodecs

        with pixel_limit(), Image.open(path) as im:
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
                        should_stop: ShouldStop | None = None) -> Path:
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
            return to_rgb8(slide._fetch(0, r0, r1, 0, slide.shape[1]))

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
            half = halve(band)
            below[r0 // 2:r0 // 2 + half.shape[0]] = half[:, :below.shape[1]]
        tick()  # before yielding: the writer stops pulling once it has the last tile
        for c0 in range(0, w, tile):
            yield np.ascontiguousarray(band[:, c0:c0 + tile])


__all__ = ["COMPRESSIONS", "convert_to_ome_tiff"]
