"""Sub-spot estimates: HiFusion's own read-out of expression from each HISM tile of a spot.

HISM cuts every spot into ``k × k`` tiles (``k = 7`` as released: 7 × 7 tiles of 32 px, 22 µm
of tissue each for a 154 µm spot) and encodes each tile with the shared ResNet-18. The shared
level head (``model.level_head``, one ``Linear``) turns a level's *pooled* features into
expression; it was trained (auxiliary loss) to predict the spot's measured expression from the
mean of its level's features. Applied to one tile's pooled features instead, it gives that
tile's expression estimate: :func:`subspot_predictions` returns these ``(n, k, k, G)`` values.

Why it is the model's own per-tile read-out: pooling is a mean and the head is linear, so the
mean over tiles of the per-tile read-outs is exactly the head applied to the mean over the
assembled level map. When that map already has the level-1 map's size (the released model:
7 × 7 tiles of 1 × 1 features on a 7 × 7 level-1 map), ``align_to`` leaves it as it is and that
mean *is* the model's level-``k`` prediction (:attr:`SubspotPrediction.exact`; agreement to
float rounding). Smaller configurations (the 56-px test models) max-pool the level map down, so
there the identity holds with the unaligned map only and the tile mean is an approximation.

The tile features are the ones the forward pass itself computed (a hook on the spot encoder
keeps the level-``k`` output), so each spot is encoded once and the final prediction, the
level prediction and the tiles come from one pass.

What it is not: there is no measurement at 22 µm to check it against. It is checked only
against the spot (:meth:`SubspotPrediction.agreement`: the tile mean against the level
prediction, an identity, and against the final prediction, which the cross-attention head
makes from all levels and the surrounding region, so they differ). Values are in the model's
target space (``ln`` relative expression), so the tile *mean* is the aggregate that matches.

>>> import numpy as np
>>> tiles = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 1)
>>> r = SubspotPrediction(tiles=tiles, level=tiles.mean(axis=(1, 2)),
...                       prediction=tiles.mean(axis=(1, 2)) + 1, genes=["ERBB2"],
...                       centers_um=np.array([[100.0, 100.0], [200.0, 100.0]]), tile_um=20.0,
...                       exact=True)
>>> r.tile_mean[:, 0].tolist()
[4.0, 13.0]
>>> m = subspot_map(r, "ERBB2")
>>> m.um_per_px, m.origin_um, m.data.shape
(20.0, (80.0, 80.0), (1, 3, 8))
>>> row, col = m.pixel_of((200.0 + 20, 100.0 - 20))   # spot 2, tile (0, 2): top right
>>> float(m.data[0, row, col])
11.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.dataset import SpotDataset, as_unit_float
from ..data.sections import section_name
from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import Cancelled, ConfigError, SectionError
from ..models.hifusion import full_precision
from ..progress import Progress, ShouldStop
from .maps import MAX_MAP_PIXELS, ExpressionMap, _gene_index
from .predict import CPU_CHUNK, prefetch_batches

#: ``ExpressionMap.layer`` of a sub-spot map (so a map file says what it holds).
SUBSPOT_LAYER = "subspot"


@dataclass
class SubspotPrediction:
    """Per-tile estimates of ``genes`` for ``n`` spots, with the spot-level predictions.

    ``tiles[s, i, j]`` is tile row ``i`` (down, y), column ``j`` (right, x) of spot ``s``;
    ``level`` the model's level-``k`` prediction, ``prediction`` its final one (both ``(n, G)``);
    ``centers_um`` the spots' ``(x, y)`` µm on the slide; ``tile_um`` a tile's side in µm;
    ``exact``: whether the tile mean must equal ``level`` (see the module).
    """

    tiles: np.ndarray
    level: np.ndarray
    prediction: np.ndarray
    genes: list[str]
    centers_um: np.ndarray
    tile_um: float
    exact: bool
    name: str = ""
    slide: str | None = None

    @property
    def k(self) -> int:
        """Tiles per side."""
        return int(self.tiles.shape[1])

    @property
    def tile_mean(self) -> np.ndarray:
        """``(n, G)``: the mean over each spot's tiles (the aggregate in the model's log space)."""
        return self.tiles.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)

    def tile_centers_um(self) -> np.ndarray:
        """``(n, k, k, 2)``: each tile's centre ``(x, y)`` in µm on the slide."""
        offsets = centred_offsets(self.k, self.tile_um)
        x = self.centers_um[:, 0, None, None] + offsets[None, None, :]
        y = self.centers_um[:, 1, None, None] + offsets[None, :, None]
        return np.stack(np.broadcast_arrays(x, y), axis=-1)

    def agreement(self) -> dict[str, dict[str, float]]:
        """How the tile mean agrees with the spot's level-``k`` and final predictions.

        Per comparison: the largest and the mean absolute difference over all spots and genes,
        and the median over genes of the Pearson correlation across spots (``gene_pcc``: 0 for
        a constant gene; NaN with fewer than 3 spots).
        """
        mean = self.tile_mean.astype(np.float64)
        return {name: _compare(mean, np.asarray(other, np.float64))
                for name, other in (("level", self.level), ("final", self.prediction))}

    def spread(self) -> dict[str, float]:
        """How much the tiles vary within a spot beside how much spots vary (medians over genes).

        ``within_spot_sd``: the SD over a spot's tiles, averaged over spots; ``across_spot_sd``:
        the SD over spots of the tile mean. The head was fitted to the *mean* of a spot's tiles,
        so a tile's own value carries noise that the spot's mean averages away: a large ratio
        is not by itself heterogeneity of the tissue.
        """
        within = self.tiles.std(axis=(1, 2), dtype=np.float64).mean(axis=0)  # (G,)
        across = self.tiles.mean(axis=(1, 2), dtype=np.float64).std(axis=0)  # (G,)
        return {"within_spot_sd": float(np.median(within)),
                "across_spot_sd": float(np.median(across))}


def centred_offsets(n: int, step: float) -> np.ndarray:
    """Centres of ``n`` cells of size ``step`` across a patch, relative to its centre.

    >>> centred_offsets(3, 20.0).tolist()
    [-20.0, 0.0, 20.0]
    """
    return (np.arange(n) - (n - 1) / 2) * step


def _compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from ..evaluation.metrics import gene_pcc

    diff = np.abs(a - b)
    pcc = float(np.median(gene_pcc(a, b))) if len(a) >= 3 else float("nan")
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "median_pcc": pcc}


# -- the read-out --------------------------------------------------------------------------------
def tile_level(model: nn.Module, level: int | None = None) -> int:
    """The HISM level to read (default: the finest); a clear error for networks without tiles."""
    config = getattr(model, "config", None)
    if config is None or config.arch != "hifusion" or not hasattr(model, "level_head"):
        arch = getattr(config, "arch", type(model).__name__)
        raise ConfigError(f"sub-spot estimates need a HiFusion model (it reads each spot as "
                          f"HISM tiles); this {arch} network reads the spot whole")
    tiled = [k for k in config.levels if k > 1]
    if not tiled:
        raise ConfigError(f"this HiFusion model has no tiled HISM level (levels "
                          f"{list(config.levels)}), so nothing to read below the spot")
    if level is None:
        return max(tiled)
    if level not in tiled:
        raise ConfigError(f"level {level} is not one of the model's tiled HISM levels "
                          f"({', '.join(map(str, tiled))})")
    return int(level)


def read_tiles(model: nn.Module, spot: Tensor, region: Tensor, k: int,
               columns: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, bool]:
    """One forward pass: ``(tiles (B, k, k, g), level (B, g), final (B, g), exact)`` for the
    gene ``columns``. Call under inference mode (and autocast, if wanted)."""
    b = spot.shape[0]
    kept: list[Tensor] = []

    def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
        if output.shape[0] == b * k * k:  # the level-k call: all tiles of the batch at once
            kept.append(output)

    handle = model.spot_encoder.register_forward_hook(keep)
    try:
        out = model(spot, region)
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"expected one spot-encoder call on {b * k * k} level-{k} tiles, saw "
                           f"{len(kept)}: HiFusion.encode_spot changed how it encodes levels")
    features = kept[0].float()  # (B·k², C, h, w), row-major tiles per spot
    exact = tuple(s * k for s in features.shape[-2:]) == tuple(out.level_features[0].shape[-2:])
    columns = torch.as_tensor(list(columns), device=features.device)
    head = model.level_head
    with full_precision(features.device):  # as the forward pass's tail
        pooled = features.mean(dim=(-2, -1))
        tiles = nn.functional.linear(pooled, head.weight.float()[columns],
                                     head.bias.float()[columns])
    level = out.level_predictions[list(model.config.levels).index(k)].float()[:, columns]
    final = out.prediction.float()[:, columns]
    return tiles.reshape(b, k, k, -1), level, final, exact


@torch.inference_mode()
def subspot_predictions(
    model: nn.Module,
    section: Any,
    slide: Any,
    *,
    genes: Sequence[str] | None = None,
    level: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: str = "auto",
    workers: int = 2,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> SubspotPrediction:
    """Per-tile expression of ``genes`` (default: all the model's) for every spot of ``section``.

    ``level``: the HISM grid to read (default: the finest, 7). The model (a HiFusion network,
    e.g. from ``load_model``) is moved to ``device`` and put in eval mode; ``precision`` and
    ``batch_size`` as in :func:`~.predict.predict_section`. The result holds ``n · k² · G``
    floats: name the genes you want for large sections.
    """
    k = tile_level(model, level)
    config = model.config
    genes = list(config.genes) if genes is None else [str(g) for g in genes]
    if not genes:
        raise ConfigError("name at least one gene to estimate below the spot")
    columns = [_gene_index(config.genes, g, "the model") for g in genes]
    name = section_name(section)
    n = section.n_obs
    if n == 0:
        raise SectionError(f"section {name!r} has no spots")
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    step = CPU_CHUNK if dev.type == "cpu" else batch_size
    tiles = np.empty((n, k, k, len(genes)), np.float32)
    level_pred = np.empty((n, len(genes)), np.float32)
    final = np.empty((n, len(genes)), np.float32)
    exact = True
    done = 0
    batches = prefetch_batches(SpotDataset(section, slide, config, raw=True), batch_size,
                               workers=workers)
    try:
        for batch in batches:
            for start in range(0, len(batch["spot"]), step):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"sub-spot estimates of {name!r} stopped after {done} spots")
                spot, region = (
                    as_unit_float(batch[key][start : start + step].to(dev))
                    .contiguous(memory_format=torch.channels_last) for key in ("spot", "region"))
                with autocast(dev, dtype):
                    t, lv, f, ok = read_tiles(model, spot, region, k, columns)
                m = len(spot)
                tiles[done : done + m] = t.cpu().numpy()
                level_pred[done : done + m] = lv.cpu().numpy()
                final[done : done + m] = f.cpu().numpy()
                exact &= ok
                done += m
            if progress is not None:
                progress(done, n, f"{name}: sub-spot tiles of {done}/{n} spots")
    finally:
        batches.close()
    mpp = slide.require_mpp()  # the scale the patches were cut at
    centers = np.asarray(section.obsm["spatial"], dtype=np.float64)[:, :2] * mpp
    slide_path = getattr(slide, "path", None)
    return SubspotPrediction(tiles=tiles, level=level_pred, prediction=final, genes=genes,
                             centers_um=centers, tile_um=float(config.spot_um) / k, exact=exact,
                             name=name, slide=None if slide_path is None else str(slide_path))


# -- the image -----------------------------------------------------------------------------------
def subspot_map(result: SubspotPrediction, genes: str | Sequence[str] | None = None, *,
                px_per_tile: int = 1) -> ExpressionMap:
    """The tiles of ``genes`` (default: all) as an image in µm on the slide.

    Pixels are ``tile_um / px_per_tile`` µm on a lattice whose origin is a whole multiple of
    that size (as :mod:`~.maps`); each tile fills the ``px_per_tile²`` pixels nearest its
    square, so a tile lies at most half a pixel (11 µm at tile resolution for the released
    model) from where the model read it. Pixels under no spot are NaN; where the spots' patches
    overlap (a grid finer than the patch), the tiles there are averaged. In napari the map layer
    takes ``scale = emap.scale`` and ``translate = emap.translate``, as any :class:`ExpressionMap`.
    """
    genes = result.genes if genes is None else [genes] if isinstance(genes, str) else list(genes)
    columns = [_gene_index(result.genes, g, result.name or "the sub-spot estimates")
               for g in genes]
    if px_per_tile < 1 or int(px_per_tile) != px_per_tile:
        raise ConfigError(f"px_per_tile must be a whole number of at least 1, got {px_per_tile}")
    n = int(px_per_tile)
    r = result.tile_um / n
    side = result.k * n  # pixels per spot patch and axis
    offsets = centred_offsets(side, r)
    x = result.centers_um[:, 0, None] + offsets[None]  # (spots, side) pixel-centre µm
    y = result.centers_um[:, 1, None] + offsets[None]
    ox, oy = (math.floor(float(v.min()) / r) * r for v in (x, y))
    cols, rows = np.rint((x - ox) / r).astype(np.int64), np.rint((y - oy) / r).astype(np.int64)
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if height * width > MAX_MAP_PIXELS:
        raise ConfigError(f"a sub-spot map of {r:g} µm/px would be {height} × {width} px; use "
                          "fewer pixels per tile")
    index = (rows[:, :, None] * width + cols[:, None, :]).ravel()  # (spots, side, side)
    count = np.bincount(index, minlength=height * width)
    values = result.tiles[..., columns].repeat(n, axis=1).repeat(n, axis=2)
    out = np.full((len(genes), height * width), np.nan, np.float32)
    covered = count > 0
    for g in range(len(genes)):
        total = np.bincount(index, weights=values[..., g].ravel(), minlength=height * width)
        out[g, covered] = total[covered] / count[covered]
    return ExpressionMap(data=out.reshape(len(genes), height, width), genes=genes,
                         um_per_px=r, origin_um=(oy, ox), pitch_um=result.tile_um, sigma_um=0.0,
                         reach_um=r / 2, layer=SUBSPOT_LAYER, name=result.name,
                         slide=result.slide)


__all__ = [
    "SUBSPOT_LAYER",
    "SubspotPrediction",
    "centred_offsets",
    "read_tiles",
    "subspot_map",
    "subspot_predictions",
    "tile_level",
]
