"""Images decoded whole (JPEG, PNG, untiled TIFF) and the 2× block-mean pyramid given to them."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SlideError
from .slide_limits import check_open_size, max_open_pixels

#: In-memory pyramids stop halving once the longest side is at most this many px.
MIN_LEVEL_PX = 512


@contextlib.contextmanager
def pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb guard at our limit (its default, ~89 Mpx, is below a slide).

    Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that, so it is set to half
    the limit and its warning is silenced: it refuses exactly what :func:`check_open_size`
    refuses first (with a message that says what to do), as a second line of defence.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_open_pixels() // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_plain(path: Path, check_size: bool = True) -> np.ndarray:
    """JPEG/PNG pixels as stored (no EXIF rotation: spot coordinates refer to stored pixels)."""
    try:
        with contextlib.ExitStack() as stack:
            if check_size:
                stack.enter_context(pixel_limit())
            im = stack.enter_context(Image.open(path))
            if check_size:
                check_open_size(path, im.height, im.width, f"a {im.format or 'plain'} image",
                                 im.width * im.height * len(im.getbands()))
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L"):
                im = im.convert("RGBA" if "transparency" in im.info or "A" in im.mode else "RGB")
            return np.asarray(im)
    except Image.DecompressionBombError as e:  # Pillow's guard (twice the limit): say the same
        with pixel_limit_off(), Image.open(path) as im:
            check_open_size(path, im.height, im.width, f"a {im.format or 'plain'} image",
                             im.width * im.height * len(im.getbands()))
        raise SlideError(f"{path} is too large to decode whole ({e}); convert it with "
                         "`hifusion convert`, which writes a tiled pyramidal OME-TIFF") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise SlideError(f"cannot decode {path} ({e}); the file may be truncated or not a "
                         f"{path.suffix} image") from e


@contextlib.contextmanager
def pixel_limit_off() -> Iterator[None]:
    """For conversion only, which streams or has checked the memory first."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def memory_pyramid(image: np.ndarray) -> list[np.ndarray]:
    levels = [image]
    while max(levels[-1].shape[:2]) > MIN_LEVEL_PX and min(levels[-1].shape[:2]) >= 2:
        levels.append(halve(levels[-1]))
    return levels


def halve(a: np.ndarray) -> np.ndarray:
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
