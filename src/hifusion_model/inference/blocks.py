"""Spot and region patches cut from blocks of the slide, each block read once at model scale.

The exact path reads each spot's patch and region from the slide on their own: on a hex:100 grid
each piece of tissue is cut and resampled ~11 times for the regions it lies in and ~3 times for
the spots, 4.7 ms of CPU a spot on the generated 50,000-px slide, taken from the cores the
network runs on. The dense path goes through the slide block by block (:func:`~.dense.band_order`),
reads each block's slide px once, resampled to model px, and cuts the spots' patches and
regions out of it as slices.

A cut starts at the model px nearest to where the exact path's crop of the same slide px
starts, so it sits within half a model px of it; where the slide already has the model's pixel
size (nothing resampled) the cuts are the exact path's pixels. On HER2ST C4 the dense path's
agreement with the exact one did not move (docs/experiments.md, 2026-12-04).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..data.slide import window_size, window_start


def read_model_px(slide: Any, scale: float, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """The slide's pixels of model px ``[y0, y0 + h) × [x0, x0 + w)`` (model px = slide px ×
    ``scale``): ``(h, w, 3)`` uint8, white beyond the slide (as the exact path reads them)."""
    side = max(h, w)
    centre = ((x0 + side / 2) / scale, (y0 + side / 2) / scale)
    return slide.read_region_px(centre, side / scale, side)[:h, :w]


def crop_starts(centers: np.ndarray, size_px: float) -> np.ndarray:
    """First slide px ``(n, 2)`` (x, y) of the exact path's ``size_px``-px crops around
    ``centers`` (slide px), as :meth:`~hifusion_model.data.slide.Slide.read_region_px` reads."""
    n = window_size(size_px)
    return np.array([[window_start(x, n), window_start(y, n)] for x, y in centers], np.int64)


def block_batches(slide: Any, centers: np.ndarray, order: np.ndarray, blocks: np.ndarray,
                  sizes: Sequence[tuple[float, int]], batch_size: int, *,
                  prefetch: bool = True) -> Iterator[dict[str, Any]]:
    """Batches ``{"spot", "region", "index"}`` (uint8 ``(n, 3, s, s)``, channels-last, and the
    spots' indices)
    of the spots in ``order``, as the exact path's reader yields them.

    ``blocks[k]`` names the block of spot ``order[k]``; a block's spots are consecutive in
    ``order`` and are cut from one read of the slide px their crops cover. ``sizes``: the spot's
    and the region's (slide px, model px). A block's side is a multiple of the spot's slide px
    over their common divisor with its model px, so that it is resampled by exactly the spot's
    ratio (a rounded ratio drifts by up to half a px across a block). ``prefetch`` reads the
    next block in a thread while this one is cut.
    """
    starts = [crop_starts(centers, slide_px) for slide_px, _ in sizes]
    spans = [window_size(slide_px) for slide_px, _ in sizes]
    slide_unit, model_unit = spans[0], sizes[0][1]
    common = math.gcd(slide_unit, model_unit)
    slide_unit, model_unit = slide_unit // common, model_unit // common
    edges = [0, *np.flatnonzero(np.diff(blocks)) + 1, len(order)]
    runs = [order[a:b] for a, b in zip(edges[:-1], edges[1:])]

    def read(index: np.ndarray) -> tuple[np.ndarray, torch.Tensor, list[np.ndarray]]:
        first = np.min([s[index].min(axis=0) for s in starts], axis=0) - 2
        last = np.max([s[index].max(axis=0) + n for s, n in zip(starts, spans)], axis=0) + 2
        units = -(-int((last - first).max()) // slide_unit)  # one square, 2 px more a side
        side, out = units * slide_unit, units * model_unit
        pixels = slide.read_region_px(tuple(first + side / 2), side, out)
        ratio = model_unit / slide_unit
        cuts = [np.floor((s[index] - first) * ratio + 0.5).astype(np.int64) for s in starts]
        return index, torch.from_numpy(np.array(pixels)), cuts

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hifusion-read") \
        if prefetch else None
    pending: Future | None = None
    batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    try:
        for k, run in enumerate(runs):
            if pool is None:
                index, image, cuts = read(run)
            else:
                pending = pending or pool.submit(read, run)
                index, image, cuts = pending.result()
                pending = pool.submit(read, runs[k + 1]) if k + 1 < len(runs) else None
            for j, i in enumerate(index.tolist()):
                patches = [image[y:y + px, x:x + px]
                           for (x, y), (_, px) in zip((c[j] for c in cuts), sizes)]
                batch.append((i, *patches))
                if len(batch) == batch_size:
                    yield _collated(batch)
                    batch = []
        if batch:
            yield _collated(batch)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _collated(batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The batch's ``(h, w, 3)`` cuts as ``(n, 3, h, w)`` in channels-last memory: stacked as
    they lie in the slide (whole rows copied) and ready for the network without another copy."""
    index, spot, region = zip(*batch)
    return {"spot": _channels_last(spot), "region": _channels_last(region),
            "index": torch.as_tensor(index, dtype=torch.int64)}


def _channels_last(patches: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(patches).permute(0, 3, 1, 2)


__all__ = ["block_batches", "crop_starts", "read_model_px"]
