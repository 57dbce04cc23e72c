"""Dense inference: neighbouring spots of a grid share the spot encoder's finest tiles.

On a Visium-like grid (100 µm pitch) a 154 µm spot patch overlaps its neighbours ~2.7 times, so
the exact path (:func:`~.predict.predict_section`) encodes most tissue several times. Here the
finest HISM level, the 7×7 tiles of 32 model px, is computed once per piece of tissue: every
tile of a lattice of ``step`` = 32 model px (the tile size and the ResNet's output stride) is
encoded once, z-scored by the spot-sized window centred on it, and a spot takes the 7×7 tiles
under it. A spot between lattice points takes the bilinear blend of the windows at the four
surrounding ones, so no spot moves. Its other levels (the whole spot, the 2×2 tiles) and the
region encoder run per spot, exactly as the exact path runs them.

Only the tiles are shared because only they stay within a per-gene PCC of 0.98 of the exact
path on every gene (the bundled model, HER2ST C4, fp32; docs/experiments.md, 2026-12-03 and
2026-12-04): shared and blended, the tiles keep mean / worst gene 0.997 / 0.989 on C4's own
spots and 0.998 / 0.989 on its hex:100 grid. Level 1 shared too (fully convolutional, each pixel
z-scored by the window centred on it) kept the mean at 0.992 but dropped the worst gene to 0.965
on the spots, 0.973 on the grid; the region shared drops it below 0.87. Level 1 per spot costs
~9 % of the spots/s on C4's grid (bf16, compiled).

The lattice and the windows' statistics are :mod:`.lattice`'s. The slide is processed in bands
of lattice rows, top to bottom; the shared tiles of a band are kept only until its spots are
predicted (the last rows carry over to the next band), so memory stays bounded by the slide's
width, not its area. The tiles are held in the encoder's own output dtype (bf16 under bf16
autocast, so nothing is rounded), the encoder sees a few batch shapes only (:data:`TILE_ROUND`),
and freed heap memory is handed back after every band. The per-spot part runs where the exact
path's network would (:func:`~.fast_cpu.choose_path`: large CPU jobs with int8 convolutions,
whose tiles are then encoded in int8 too; bf16 compiled or fp32 through ONNX Runtime when
asked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.dataset import SpotDataset, as_unit_float
from ..data.grids import is_grid_source
from ..data.sections import section_name
from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import Cancelled, ConfigError, SectionError
from ..models.backbones import use_level
from ..models.config import ModelConfig
from ..models.hifusion import (
    HiFusion,
    align_to,
    encode_level,
    full_precision,
    hism_tiles,
    zscore_per_channel,
)
from ..progress import Progress, ShouldStop
from .blocks import block_batches, read_model_px
from .compiled_cpu import CompiledChunks
from .fast_cpu import (
    COMPILING,
    QUANTIZING,
    OnnxChunks,
    choose_path,
    export_path,
    held_runner,
    int8_asked,
)
from .int8_cpu import sample_patches
from .heap import return_freed_memory, reused_heap
from .lattice import Lattice, dense_step, needed_cells, tile_zscore

#: Lattice rows of spot origins per band. A band computes ``BAND_ROWS`` new rows of shared tiles
#: and keeps the spot extent's rows from the band above; larger bands hold more memory.
BAND_ROWS = 32
#: Lattice columns per chunk of slide read at once for its tiles.
CHUNK_COLS = 32
#: Tiles per encoder call.
TILE_BATCH = 512
#: A chunk's last batch of tiles is padded to a multiple of ``TILE_ROUND`` tiles, so that the
#: encoder sees a few input shapes: oneDNN keeps its kernels per shape, and with every batch its
#: own shape the 50,000-px slide's resident size grew by hundreds of MB.
TILE_ROUND = 64


# -- shared tiles of a band -----------------------------------------------------------------------
class SharedTiles:
    """The finest level's features of every lattice cell that the current band's spots need.

    Cell ``(r, c)`` is the lattice cell of model px ``[step·r, step·r + step)`` (rows and columns
    counted from ``first``, the top-left cell any spot needs). :meth:`hold` computes rows as they
    are first asked for and drops those above, so each cell is encoded once. The map is
    ``(rows, cols, C)``, channels last: a spot's window gathers whole feature vectors
    (channels first, gathering the windows took 0.7 ms a spot on the 50,000-px slide).
    """

    def __init__(self, model: HiFusion, slide: Any, lattice: Lattice, needed: np.ndarray,
                 first: tuple[int, int], dev: torch.device, dtype: torch.dtype | None,
                 should_stop: ShouldStop | None = None,
                 runner: Callable[[Tensor], Tensor] | None = None) -> None:
        config = model.config
        self.model, self.slide, self.lattice, self.needed = model, slide, lattice, needed
        self.first, self.dev, self.dtype, self.should_stop = first, dev, dtype, should_stop
        #: z-scored tiles ``(n, 3, step, step)`` → features ``(n, C)`` (:func:`tile_runner`),
        #: else the eager encoder under ``dtype`` autocast
        self.runner = runner
        self.level = config.levels.index(max(config.levels))
        self.normalize = config.input_norm == "image"
        self.spot_px, self.step = config.spot_px, lattice.step
        #: what a tile's z-score window reaches beyond it on each side
        self.halo = (self.spot_px - self.step) // 2
        self.cell = math.gcd(self.step, self.halo)
        #: the encoder's own output dtype (bf16 under bf16 autocast), so holding it loses nothing
        self.store = (runner is None and dtype) or torch.float32
        self.top = 0
        self.map = self._blank(0)  #: rows [top, top + held)

    @property
    def bottom(self) -> int:
        return self.top + self.map.shape[0]

    def hold(self, top: int, bottom: int) -> None:
        """Keep rows ``[top, bottom)``, computing the new ones; rows above ``top`` go.

        The rows kept are copied into the new map, which is then filled in place: no
        concatenation, so at most the old and the new maps are alive at once."""
        bottom = min(bottom, self.needed.shape[0])
        if bottom <= self.bottom and top == self.top:
            return
        new = self._blank(bottom - top)
        kept = max(0, min(self.bottom, bottom) - top)
        if kept:
            new[:kept] = self.map[top - self.top:top - self.top + kept]
        self.map = new[:0]  # the old map goes before the new rows' activations arrive
        self._compute(new, top, top + kept, bottom)
        self.map, self.top = new, top
        return_freed_memory()

    def windows(self, origins: np.ndarray, size: int) -> Tensor:
        """The ``size × size`` windows at ``origins`` (``(n, 2)`` lattice x, y, absolute), each
        blended bilinearly from the four lattice points around it: ``(n, C, size, size)``."""
        corner = np.floor(origins).astype(np.int64)
        frac = torch.as_tensor(origins - corner, dtype=torch.float32, device=self.dev)
        cols = corner[:, 0] - self.first[0]
        rows = corner[:, 1] - self.first[1] - self.top
        span = np.arange(size + 1)
        r = torch.as_tensor(np.minimum(rows[:, None] + span, self.map.shape[0] - 1))
        c = torch.as_tensor(np.minimum(cols[:, None] + span, self.map.shape[1] - 1))
        fx, fy = (frac[:, i].view(-1, 1, 1, 1) for i in (0, 1))
        # channels last, so each gathered cell is one contiguous vector
        w = self.map[r[:, :, None], c[:, None, :]].float()  # (n, s+1, s+1, C)
        top = (1 - fx) * w[:, :size, :size] + fx * w[:, :size, 1:]
        low = (1 - fx) * w[:, 1:, :size] + fx * w[:, 1:, 1:]
        return ((1 - fy) * top + fy * low).permute(0, 3, 1, 2)

    # -- computing rows ----------------------------------------------------------------------
    def _blank(self, rows: int) -> Tensor:
        """A zeroed map of ``rows`` rows (zero where no spot needs a cell)."""
        shape = (rows, self.needed.shape[1], self.model.config.feature_dim)
        return torch.zeros(shape, dtype=self.store, device=self.dev)

    def _compute(self, out: Tensor, top: int, r0: int, r1: int) -> None:
        """Fill rows ``[r0, r1)`` of ``out`` (whose row 0 is row ``top``), chunk by chunk of
        :data:`CHUNK_COLS` columns; each chunk reads the box of its needed cells only."""
        for start in range(0, self.needed.shape[1], CHUNK_COLS):
            box = _bounding_box(self.needed[r0:r1, start:start + CHUNK_COLS])
            if box is None:
                continue
            if self.should_stop is not None and self.should_stop():
                raise Cancelled("dense prediction stopped while encoding the slide")
            (a, b), (x, y) = (r0 + box[0], r0 + box[1]), (start + box[2], start + box[3])
            with autocast(self.dev, self.dtype):
                self._encode(self._read(a, b, x, y), self.needed[a:b, x:y],
                             out[a - top:b - top, x:y])

    def _read(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Model-scale pixels of lattice rows/cols ``[r0, r1) × [c0, c1)`` and their tiles'
        z-score windows: ``(3, H, W)`` float in [0, 1] on the device (white beyond the slide,
        as the exact path)."""
        step, halo = self.step, self.halo
        x0 = (self.first[0] + c0) * step - halo
        y0 = (self.first[1] + r0) * step - halo
        h, w = (r1 - r0) * step + 2 * halo, (c1 - c0) * step + 2 * halo
        pixels = read_model_px(self.slide, self.lattice.scale, x0, y0, h, w)
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return as_unit_float(image.to(self.dev))

    def _encode(self, image: Tensor, need: np.ndarray, into: Tensor) -> None:
        """Encode the ``need``-ed tiles of ``image`` into the cells of ``into`` (a view of the
        map, ``(rows, cols, C)``), in batches of :data:`TILE_BATCH`."""
        if self.normalize:
            tiles = tile_zscore(image, self.step, self.spot_px, self.cell)
        else:
            halo, (rows, cols) = self.halo, need.shape
            frame = image[:, halo:image.shape[1] - halo, halo:image.shape[2] - halo]
            tiles = frame.reshape(3, rows, self.step, cols, self.step).permute(1, 3, 0, 2, 4)
        mask = torch.as_tensor(need, device=self.dev)
        picked = tiles[mask]
        n = len(picked)
        if self.runner is not None:
            into[mask] = self.runner(picked).to(self.store)
            return
        picked = F.pad(picked, (0, 0, 0, 0, 0, 0, 0, -(-n // TILE_ROUND) * TILE_ROUND - n))
        encoder = self.model.spot_encoder
        features = []
        with use_level(encoder, self.level):
            for start in range(0, len(picked), TILE_BATCH):
                batch = picked[start:start + TILE_BATCH]
                batch = batch.contiguous(memory_format=torch.channels_last)
                features.append(encoder(batch).to(self.store).flatten(1))
        if features:
            into[mask] = torch.cat(features)[:n]


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row0, row1, col0, col1)`` of the True cells of ``mask`` (None when there are none)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# -- the tail of the network ----------------------------------------------------------------------
def fuse_and_attend(model: HiFusion, features: list[Tensor], region_map: Tensor) -> Tensor:
    """HiFusion's prediction from its level maps (``config.levels`` order, aligned to level 1)
    and the region encoder's map: what :meth:`HiFusion.forward` does after the encoders."""
    with full_precision(region_map.device):
        features = [f.float() for f in features]
        weights = model.level_logits.softmax(dim=0)
        fused = sum(w * f for w, f in zip(weights, features))
        query = region_map.float().mean(dim=(-2, -1)).unsqueeze(1)
        tokens = F.adaptive_avg_pool2d(fused, model.config.token_grid).flatten(2).transpose(1, 2)
        attended, _ = model.cross_attention(query, tokens, tokens, need_weights=False)
        return model.head((attended + query).squeeze(1))


def predict_spots(model: HiFusion, finest: Tensor, spot: Tensor, region: Tensor) -> Tensor:
    """Predictions ``(n, G)`` from the shared finest-level windows ``(n, C, 7, 7)`` and the
    spots' own patches (``[0, 1]`` float): the other levels and the region are encoded per spot,
    as exactly."""
    config = model.config
    if config.input_norm == "image":
        spot, region = zscore_per_channel(spot), zscore_per_channel(region)
    size = tuple(finest.shape[-2:])
    features = []
    for i, k in enumerate(config.levels):
        if k == max(config.levels):
            features.append(finest)
            continue
        with use_level(model.spot_encoder, i):
            features.append(align_to(encode_level(model.spot_encoder, spot, k), size))
    return fuse_and_attend(model, features, model.region_encoder(region))


class _OwnLevels(nn.Module):
    """:func:`predict_spots` as a module of three tensors, for :class:`CompiledChunks` and
    :class:`OnnxChunks`."""

    def __init__(self, model: HiFusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, finest: Tensor, spot: Tensor, region: Tensor) -> Tensor:
        return predict_spots(self.model, finest, spot, region)


SpotRunner = Callable[[Tensor, Tensor, Tensor], Tensor]


def spot_runner(model: HiFusion, dev: torch.device, dtype: torch.dtype | None,
                n_spots: int, chunk: int, announce: Callable[[str], None] | None = None,
                int8: bool | None = False) -> SpotRunner:
    """:func:`predict_spots` for ``chunk``-spot calls, on the CPU path the exact path's network
    would take (:func:`~.fast_cpu.choose_path`, which ``int8`` is passed to: large CPU jobs
    with int8 convolutions, or fp32 through ONNX Runtime, or bf16 compiled), else eager;
    ``announce(message)`` hears of a compilation or quantisation before it starts. A path that
    fails to set up warns and runs eager."""
    def eager(finest: Tensor, spot: Tensor, region: Tensor) -> Tensor:
        with autocast(dev, dtype):
            return predict_spots(model, finest, spot, region)

    path = choose_path(dev, dtype, n_spots, int8=int8)
    if path == "eager":
        return eager
    c, side = model.config, model.config.spot_px // dense_step(model.config)
    shapes = [(c.feature_dim, side, side), (3, c.spot_px, c.spot_px),
              (3, c.region_px, c.region_px)]
    own_levels = _OwnLevels(model)

    def build() -> CompiledChunks | OnnxChunks:
        if path == "compile":
            if announce is not None:
                announce(COMPILING)
            return CompiledChunks(own_levels, chunk, shapes, dtype)
        cache = export_path(own_levels, chunk, int8=path == "int8")
        if path == "onnx":
            return OnnxChunks(own_levels, chunk, shapes, cache)
        if announce is not None and not cache.is_file():
            announce(QUANTIZING)
        return OnnxChunks(own_levels, chunk, shapes, cache, lambda: calibration_inputs(model))

    runner = held_runner(model, ("dense", path, chunk, dtype), build)
    return eager if runner is None else runner


def calibration_inputs(model: HiFusion) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`predict_spots`'s inputs for the packaged sample's calibration spots
    (:func:`~.int8_cpu.sample_patches`, one a call), each spot's finest level encoded from its
    own patch as the exact path encodes it."""
    config, k = model.config, max(model.config.levels)
    side = config.spot_px // dense_step(config)
    out = []
    with torch.no_grad(), use_level(model.spot_encoder, config.levels.index(k)):
        for spot, region in sample_patches(config, 1):
            z = zscore_per_channel(spot) if config.input_norm == "image" else spot
            finest = align_to(encode_level(model.spot_encoder, z, k), (side, side))
            out.append((finest, spot, region))
    return out


class _FinestTiles(nn.Module):
    """The spot encoder on z-scored finest-level tiles, ``(n, 3, step, step)`` → ``(n, C)``,
    for :class:`OnnxChunks`."""

    def __init__(self, model: HiFusion) -> None:
        super().__init__()
        self.model = model
        self.level = model.config.levels.index(max(model.config.levels))

    def forward(self, tiles: Tensor) -> Tensor:
        with use_level(self.model.spot_encoder, self.level):
            return self.model.spot_encoder(tiles).flatten(1)


def tile_runner(model: HiFusion, dev: torch.device, dtype: torch.dtype | None, n_spots: int,
                int8: bool | None = False) -> Callable[[Tensor], Tensor] | None:
    """The shared tiles' encoder in int8 (batches of :data:`TILE_ROUND` tiles) where the
    per-spot part runs in int8 (:func:`~.fast_cpu.choose_path`), else None: the eager encoder.
    In bf16 eager it took 2.8 ms of a spot's 23 on C4's hex:100 grid."""
    if choose_path(dev, dtype, n_spots, int8=int8) != "int8":
        return None
    module, step = _FinestTiles(model), dense_step(model.config)

    def calibration() -> list[tuple[Tensor]]:  # a spot's tiles a call
        k = max(model.config.levels)
        spots = [spot for spot, _ in sample_patches(model.config, 1)]
        if model.config.input_norm == "image":
            spots = [zscore_per_channel(spot) for spot in spots]
        return [(hism_tiles(spot, k).contiguous(),) for spot in spots]

    return held_runner(model, ("tiles", "int8"), lambda: OnnxChunks(
        module, TILE_ROUND, [(3, step, step)], export_path(module, TILE_ROUND, int8=True),
        calibration))


# -- when to use it -------------------------------------------------------------------------------
#: The dense path pays when the spots' windows cover at most this many lattice cells per tile of
#: theirs (each cell is encoded once, each tile once per spot on the exact path). C4's hex:100
#: grid covers 0.40 and ran 1.13–1.19× faster dense in bf16; its own 200 µm spots, which do not
#: overlap, cover 1.28 and took 11.1 s dense against 9.3 s exact (fp32; benchmarks/dense.py).
SHARED_ENOUGH = 0.5


def dense_unsupported(model: nn.Module, config: ModelConfig, tta: int = 1) -> str | None:
    """Why the dense path cannot run this model (None when it can)."""
    if tta != 1:
        return "test-time views flip and rotate each spot, and the shared tiles hold one view"
    if not isinstance(model, HiFusion):
        return f"{type(model).__name__} is not a HiFusion network"
    try:
        dense_step(config)
    except ConfigError as e:
        return str(e)
    return None


def sharing(section: ad.AnnData, config: ModelConfig, mpp: float) -> float:
    """Lattice cells the section's spots cover per finest-level tile they hold: below 1, spots
    overlap and share; 1 / 2.7 on a Visium-like hex grid of 100 µm."""
    lattice = Lattice.of(config, mpp)
    size = config.spot_px // lattice.step
    origins = lattice.positions(np.asarray(section.obsm["spatial"]), config.spot_px)
    mask, _ = needed_cells(origins, size)
    return float(mask.sum()) / (section.n_obs * size * size)


def choose_dense(dense: bool | None, section: ad.AnnData, model: nn.Module, config: ModelConfig,
                 mpp: float, tta: int = 1, *, device: torch.device | None = None,
                 runs_in: str = "fp32") -> bool:
    """Whether to predict ``section`` on the dense path. ``dense``: True forces it (a
    ConfigError says why it cannot), False the exact path; None (auto) takes it where it was
    measured faster: a grid (``source`` ``grid:…``) whose spots overlap enough to share
    (:data:`SHARED_ENOUGH`), on a CPU whose network ``runs_in`` int8 or bf16
    (:func:`~.fast_cpu.precision_run`): 1.13× and 1.12× the exact path's spots/s on C4's
    hex:100 grid. In fp32 it measured 1.05–1.09×, which does not pay for leaving the exact
    predictions, so auto keeps the exact path there, and on GPUs, where it was not measured.
    A section's own spots stay exact too: their predictions are the ones compared with
    measurements.
    """
    if dense is False:
        return False
    reason = dense_unsupported(model, config, tta)
    if dense:
        if reason:
            raise ConfigError(f"the dense path cannot predict here: {reason}; "
                              "use the exact path (dense=False, --dense no)")
        return True
    source = section.uns.get("hifusion", {}).get("source", "")
    measured_faster = (device is not None and device.type == "cpu"
                       and runs_in in ("int8", "bfloat16"))
    return (reason is None and measured_faster and is_grid_source(source)
            and section.n_obs > 0 and sharing(section, config, mpp) <= SHARED_ENOUGH)


# -- driving a section ----------------------------------------------------------------------------
def band_order(origins: np.ndarray,
               first: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spots by block (:data:`BAND_ROWS` lattice rows × :data:`CHUNK_COLS` columns, blocks in
    raster order) and in raster order of their lattice origin within a block; the band and the
    block of each (in that order)."""
    corner = np.floor(origins).astype(np.int64) - first
    band, column = corner[:, 1] // BAND_ROWS, corner[:, 0] // CHUNK_COLS
    order = np.lexsort((corner[:, 0], corner[:, 1], column, band))
    block = band * (int(column.max(initial=0)) + 1) + column
    return order, band[order], block[order]


@torch.inference_mode()
@reused_heap()
def predict_dense(
    model: nn.Module,
    config: ModelConfig,
    section: ad.AnnData,
    slide: Any,
    *,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: str = "auto",
    workers: int = 2,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    observe: Callable[[int, dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """Predicted normalised expression ``(n_spots, G)`` float32, in the section's spot order,
    with the finest level's tiles shared between overlapping spots.

    Arguments as :func:`~.predict.predict_section` (without test-time views; ``workers`` > 0
    reads the next block of slide in a thread, :mod:`.blocks`); ``progress`` counts spots as
    they are finished, block by block, and ``should_stop`` is asked before every batch and
    every chunk of slide. ``observe(done, batch)`` sees each batch of uint8 patches; the
    batch's ``index`` says which spots they are (blocks go in raster order).
    """
    reason = dense_unsupported(model, config)
    if reason:
        raise ConfigError(f"the dense path cannot predict here: {reason}")
    if section.n_obs == 0:
        raise SectionError(f"section {section_name(section)!r} has no spots to predict")
    if batch_size < 1:
        raise SectionError(f"batch size must be at least 1, got {batch_size}")
    from .predict import CPU_CHUNK

    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    lattice = Lattice.of(config, slide.require_mpp())
    size = config.spot_px // lattice.step
    dataset = SpotDataset(section, slide, config, raw=True)
    origins = lattice.positions(dataset.centers, config.spot_px)
    needed, first = needed_cells(origins, size)
    order, bands, blocks = band_order(origins, first)
    out = np.empty((section.n_obs, config.n_genes), np.float32)
    name, n, done = section_name(section), section.n_obs, 0
    step, int8 = CPU_CHUNK if dev.type == "cpu" else batch_size, int8_asked(precision)
    own_levels = spot_runner(model, dev, dtype, n, step, announce=None
                             if progress is None else lambda m: progress(0, n, f"{name}: {m}"),
                             int8=int8)
    tiles = SharedTiles(model, slide, lattice, needed, first, dev, dtype, should_stop,
                        tile_runner(model, dev, dtype, n, int8))
    sizes = ((dataset.spot_size_px, config.spot_px), (dataset.region_size_px, config.region_px))
    batches = block_batches(slide, dataset.centers, order, blocks, sizes,
                            batch_size, prefetch=workers > 0)
    try:
        for batch in batches:
            if should_stop is not None and should_stop():
                raise Cancelled(f"prediction of {name!r} stopped after {done} spots")
            if observe is not None:
                observe(done, batch)
            for part in _runs(bands[done:done + len(batch["index"])], step):
                band = int(bands[done + part.start])
                tiles.hold(band * BAND_ROWS, (band + 1) * BAND_ROWS + size + 1)
                index = batch["index"][part].numpy()
                spot, region = (as_unit_float(batch[k][part].to(dev)).contiguous(
                    memory_format=torch.channels_last) for k in ("spot", "region"))
                pred = own_levels(tiles.windows(origins[index], size), spot, region)
                out[index] = pred.float().cpu().numpy()
            done += len(batch["index"])
            if progress is not None:
                progress(done, n, f"{name}: {done}/{n} spots (dense)")
    finally:
        batches.close()
    return out


def _runs(bands: np.ndarray, step: int) -> Iterator[slice]:
    """Consecutive slices of at most ``step`` items that stay within one band."""
    start = 0
    while start < len(bands):
        stop = start + 1
        while stop < len(bands) and stop - start < step and bands[stop] == bands[start]:
            stop += 1
        yield slice(start, stop)
        start = stop


__all__ = [
    "SHARED_ENOUGH",
    "SharedTiles",
    "choose_dense",
    "dense_unsupported",
    "fuse_and_attend",
    "predict_dense",
    "predict_spots",
    "sharing",
    "spot_runner",
]
