"""The lattice on which overlapping spots share work, and z-score statistics of its windows.

Model px are slide px times :attr:`Lattice.scale`; lattice cell ``(r, c)`` holds model px
``[step·r, step·r + step)``. ``step`` is the spot encoder's output stride, so one cell is one
position of the level-1 map and one 32-px tile of the finest HISM level. A spot's position is
the lattice coordinate of its patch's top-left corner: integer on the lattice, fractional
between. The statistics sum pixels over cells of ``cell`` px (a divisor of the step and of the
windows' reach beyond a tile), so every window that :mod:`.dense` needs is a sum of whole cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.config import ModelConfig
from ..models.hifusion import NORM_EPS

#: Output stride of the ResNet trunks (conv1, max pool and three stride-2 stages).
ENCODER_STRIDE = 32

# -- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lattice:
    """The shared lattice of a model on a slide: model px per slide px, and the step in px.

    ``scale`` is the scale at which the exact path reads a spot (``spot_px`` output px for the
    ``round(spot_um / mpp)`` slide px it crops), so both paths see the same pixels.

    >>> lattice = Lattice(scale=1.0, step=32, mpp=0.6875)
    >>> lattice.step_um
    22.0
    """

    scale: float  #: model px per slide px
    step: int  #: lattice step, model px
    mpp: float  #: µm per model px

    @classmethod
    def of(cls, config: ModelConfig, slide_mpp: float) -> Lattice:
        slide_px = max(1, round(config.spot_um / slide_mpp))
        scale = config.spot_px / slide_px
        return cls(scale=scale, step=dense_step(config), mpp=slide_mpp / scale)

    @property
    def step_um(self) -> float:
        return self.step * self.mpp

    def positions(self, xy: np.ndarray, spot_px: int) -> np.ndarray:
        """Spot origins (top-left of the spot patch) in lattice units, ``(n, 2)`` as ``(x, y)``.

        ``xy`` are spot centres in slide px. A spot on the lattice has integer coordinates.

        >>> Lattice(1.0, 32, 0.6875).positions(np.array([[112.0, 144.0]]), 224)
        array([[0., 1.]])
        """
        origin = np.asarray(xy, dtype=np.float64) * self.scale - spot_px / 2
        if self.scale == 1.0:  # the exact path's integer crop (Slide.read_region_px)
            origin = np.floor(origin + 0.5)
        return origin / self.step


def dense_step(config: ModelConfig) -> int:
    """The lattice step (px) on which a model's spots can share work, or a ConfigError why not.

    Level 1's map has one cell per :data:`ENCODER_STRIDE` px, and the finest level's tiles must
    be those cells, so ``spot_px / max(levels)`` must equal the stride.

    >>> from hifusion_model.models.config import ModelConfig
    >>> dense_step(ModelConfig(genes=["ERBB2"]))
    32
    """
    finest = max(config.levels)
    problems = []
    if config.arch != "hifusion":
        problems.append(f"the {config.arch} network has no HISM levels to share")
    elif finest == 1 or config.spot_px != finest * ENCODER_STRIDE:
        problems.append(f"its finest tiles are {config.spot_px}/{finest} px, not the encoder's "
                        f"{ENCODER_STRIDE}-px cells")
    if problems:
        raise ConfigError(f"this model cannot share work between spots ({problems[0]}); "
                          "predict with the exact path (dense=False, --dense no)")
    return ENCODER_STRIDE


def needed_cells(origins: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Which lattice cells some spot's window (and its blend neighbours) covers, and the
    absolute index ``(x, y)`` of the mask's first cell.

    >>> mask, first = needed_cells(np.array([[2.0, 3.0]]), 2)
    >>> mask.astype(int), first
    (array([[1, 1],
           [1, 1]]), (2, 3))
    """
    corner = np.floor(origins).astype(np.int64)
    extra = (origins - corner > 0).astype(np.int64)  # a blended spot reaches one cell further
    first = corner.min(axis=0)
    last = (corner + size + extra).max(axis=0)
    mask = np.zeros((last[1] - first[1], last[0] - first[0]), bool)
    for (x, y), (ex, ey) in zip(corner - first, extra):
        mask[y:y + size + ey, x:x + size + ex] = True
    return mask, (int(first[0]), int(first[1]))


# -- local statistics -----------------------------------------------------------------------------
def _integral(a: Tensor) -> Tensor:
    """2-D inclusive prefix sums of ``(C, h, w)`` with a zero row and column in front."""
    return F.pad(a.cumsum(1).cumsum(2), (1, 0, 1, 0))


def _box(integral: Tensor, k: int) -> Tensor:
    """Sums over every ``k × k`` window of the table behind ``integral``: ``(C, h-k+1, w-k+1)``."""
    i = integral
    return i[:, k:, k:] - i[:, :-k, k:] - i[:, k:, :-k] + i[:, :-k, :-k]


def window_statistics(image: Tensor, window: int, cell: int) -> tuple[Tensor, Tensor]:
    """Mean and std per channel of every ``window``-px square whose corners lie on a ``cell``-px
    lattice: ``(3, n, m)`` each, entry ``(j, i)`` for the window with top-left ``(cell·j,
    cell·i)``. Sums in float64 over cells, so that a slide-sized frame costs one pass.

    >>> m, s = window_statistics(torch.ones(3, 64, 64), 32, 16)
    >>> tuple(m.shape), float(m.max()), float(s.max())
    ((3, 3, 3), 1.0, 0.0)
    """
    c, h, w = image.shape
    x = image.double().reshape(c, h // cell, cell, w // cell, cell)
    k = window // cell
    area = float(window * window)
    mean = _box(_integral(x.sum((2, 4))), k) / area
    var = _box(_integral((x * x).sum((2, 4))), k) / area - mean * mean
    return mean.float(), var.clamp_min(0).sqrt().float()


def tile_zscore(image: Tensor, tile: int, window: int, cell: int) -> Tensor:
    """Every ``tile``-px tile of the frame inside a ``(window - tile) / 2`` halo, z-scored by the
    ``window``-px square centred on it: ``(rows, cols, 3, tile, tile)``."""
    halo = (window - tile) // 2
    mean, std = window_statistics(image, window, cell)
    every = tile // cell
    mean, std = mean[:, ::every, ::every], std[:, ::every, ::every]
    frame = image[:, halo:image.shape[1] - halo, halo:image.shape[2] - halo]
    c, h, w = frame.shape
    rows, cols = h // tile, w // tile
    tiles = frame.reshape(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    mean = mean[:, :rows, :cols].permute(1, 2, 0)[..., None, None]
    std = std[:, :rows, :cols].permute(1, 2, 0)[..., None, None]
    return (tiles - mean) / (std + NORM_EPS)


__all__ = [
    "ENCODER_STRIDE",
    "Lattice",
    "dense_step",
    "needed_cells",
    "tile_zscore",
    "window_statistics",
]
