"""How much memory a slide may take, and the checks that refuse an image before allocating it.

A slide is opened from untrusted files: a few hundred bytes of PNG can claim 40,000 × 40,000 px,
an absurd µm/px turns one spot into a gigabyte window. Each check raises a one-line
:class:`SlideError` that says what to do instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError

#: JPEG, PNG and untiled TIFF are decoded whole on open; above this many pixels they are refused
#: (Pillow's decompression-bomb guard stays on at this limit) and ``hifusion convert`` streams
#: them into a tiled OME-TIFF instead. HER2ST's JPEGs hold 92 Mpx; 200 Mpx take ~0.8 GB as RGB.
#: The environment variable ``HIFUSION_MAX_IMAGE_PIXELS`` raises or lowers it.
MAX_OPEN_PIXELS = 200_000_000
#: One region read never allocates more than this; a larger one means an absurd µm/px or
#: region size, and is refused rather than swapping the machine to death.
MAX_WINDOW_BYTES = 2**30


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


def check_open_size(path: Path, height: int, width: int, kind: str, nbytes: int) -> None:
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


def level_nbytes(level: Any, height: int, width: int) -> int:
    channels = level.shape[2] if len(level.shape) > 2 else 1
    return height * width * channels * np.dtype(level.dtype).itemsize


def check_window(path: Path, height: int, width: int, level: Any, what: str) -> None:
    nbytes = height * width * max(3, level.shape[2] if len(level.shape) > 2 else 1) * \
        np.dtype(level.dtype).itemsize
    if nbytes > MAX_WINDOW_BYTES:
        raise SlideError(f"{path}: {what} would take {nbytes / 1e9:.1f} GB of memory; the µm per "
                         "pixel (--mpp) or the region size is far off, check them")
