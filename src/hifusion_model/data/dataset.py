"""Samples for training and inference: a spot patch, its surrounding region, and its target.

Patches are cut in micrometres, so a model sees the same tissue extent whatever the scanner:
``config.spot_um`` µm resampled to ``config.spot_px`` px, ``config.region_um`` µm to
``config.region_px`` px, both centred on the spot. Images leave here as float32 in ``[0, 1]``
(uint8 for inference, which converts per model call); per-image standardisation happens inside the model (``config.input_norm``), so training and
inference feed exactly the same thing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from skimage.color import hed2rgb, rgb2hed
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import ConfigError, SectionError
from ..models.config import ModelConfig
from .expression import section_targets
from .slide import Slide

#: skimage's ``rgb2hed`` divides natural-log optical density by ``-ln(1e-6)``.
_HED_PER_OD = -np.log(1e-6)


@dataclass
class Augment:
    """One random draw per sample, applied identically to the spot and its region.

    The dihedral part (horizontal flip, vertical flip, 90° rotation) is the released recipe.
    ``color_gain``/``color_bias`` add a per-channel ``gain ∈ 1 ± color_gain``,
    ``bias ∈ ± color_bias``; ``hed_sigma`` scales the haematoxylin, eosin and DAB
    concentrations by ``1 ± σ`` and shifts them by ``± σ`` optical density (natural log), a
    stain jitter in the manner of Tellez et al. (0.02-0.05 is mild). Both are off by default.
    ``seed`` makes the draws reproducible (see :meth:`SpotDataset.generator`).
    """

    flips: bool = True
    rotations: bool = True
    color_gain: float = 0.0
    color_bias: float = 0.0
    hed_sigma: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("color_gain", "color_bias", "hed_sigma"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"augmentation {name} must be in [0, 1), got {value}")

    def __call__(self, spot: np.ndarray, region: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Transform two (H, W, 3) float32 images in ``[0, 1]`` with the same draw from ``rng``."""
        images = [spot, region]
        if self.flips:
            for axis in (1, 0):  # horizontal (columns), then vertical (rows)
                if rng.random() < 0.5:
                    images = [np.flip(im, axis) for im in images]
        if self.rotations:
            k = int(rng.integers(4))
            images = [np.rot90(im, k, axes=(0, 1)) for im in images]
        if self.color_gain or self.color_bias:
            gain = 1 + rng.uniform(-self.color_gain, self.color_gain, 3)
            bias = rng.uniform(-self.color_bias, self.color_bias, 3)
            images = [np.clip(im * gain + bias, 0, 1) for im in images]
        if self.hed_sigma:
            scale = 1 + rng.uniform(-self.hed_sigma, self.hed_sigma, 3)
            shift = rng.uniform(-self.hed_sigma, self.hed_sigma, 3) / _HED_PER_OD
            images = [np.clip(hed2rgb(rgb2hed(im) * scale + shift), 0, 1) for im in images]
        spot, region = (np.ascontiguousarray(im, dtype=np.float32) for im in images)
        return spot, region


class SpotDataset(Dataset):
    """``{"spot", "region", "target", "index"}`` for each spot of a section on its slide.

    ``spot`` is ``(3, spot_px, spot_px)``, ``region`` ``(3, region_px, region_px)``, float32 in
    ``[0, 1]``, or uint8 with ``raw=True`` (a quarter of the memory while batches queue up for
    the model; :func:`as_unit_float` converts them); ``target`` is the ``(G,)`` normalised
    counts of ``genes`` (absent when ``genes`` is None, e.g. for prediction on a bare grid).
    Targets are computed once here; patches are read on demand, touching only the tiles under
    them.
    """

    def __init__(self, section: AnnData, slide: Slide, config: ModelConfig,
                 genes: list[str] | None = None, augment: Augment | None = None,
                 raw: bool = False) -> None:
        if raw and augment is not None:
            raise ConfigError("raw (uint8) patches cannot be augmented; augment float patches")
        self.centers = _spot_centers(section)
        self.slide, self.config, self.augment, self.raw = slide, config, augment, raw
        mpp = slide.require_mpp()
        self.spot_size_px = config.spot_um / mpp
        self.region_size_px = config.region_um / mpp
        self.genes = None if genes is None else list(genes)
        self.targets = None if genes is None else torch.from_numpy(
            section_targets(section, self.genes, config.normalization))
        self._rng: np.random.Generator | None = None
        self._rng_key: Any = None

    def __len__(self) -> int:
        return len(self.centers)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = range(len(self))[i]  # IndexError past the end, as iteration expects
        center = tuple(self.centers[i])
        spot = self.slide.read_region_px(center, self.spot_size_px, self.config.spot_px)
        region = self.slide.read_region_px(center, self.region_size_px, self.config.region_px)
        if self.raw:
            return self._sample(i, _chw(spot), _chw(region))
        spot_f, region_f = np.float32(1 / 255) * spot, np.float32(1 / 255) * region
        if self.augment is not None:
            spot_f, region_f = self.augment(spot_f, region_f, self.generator())
        return self._sample(i, _chw(spot_f), _chw(region_f))

    def _sample(self, i: int, spot: torch.Tensor, region: torch.Tensor) -> dict[str, Any]:
        sample: dict[str, Any] = {"spot": spot, "region": region, "index": i}
        if self.targets is not None:
            sample["target"] = self.targets[i]
        return sample

    def generator(self) -> np.random.Generator:
        """The augmentation stream of this process, created on first use.

        Seeded from ``augment.seed`` (or ``torch.initial_seed()`` when None) and, inside a
        DataLoader worker, that worker's torch seed: workers draw different augmentations, and
        ``torch.manual_seed`` (or the loader's ``generator``) makes whole runs reproducible.
        """
        info = get_worker_info()
        key = None if info is None else (info.id, info.seed)
        if self._rng is None or key != self._rng_key:
            base = self.augment.seed if self.augment and self.augment.seed is not None \
                else torch.initial_seed()
            self._rng = np.random.default_rng([base] if info is None else [base, info.seed])
            self._rng_key = key
        return self._rng


def spot_loader(dataset: Dataset, batch_size: int = 32, *, shuffle: bool = True,
                num_workers: int | None = None, device: str | torch.device | None = None,
                drop_last: bool = False, seed: int | None = None) -> DataLoader:
    """A DataLoader with sensible defaults for patch decoding.

    Workers default to ``min(4, cpus - 1)`` and persist across epochs (slides stay open);
    memory is pinned only for CUDA; ``seed`` fixes the shuffling and the workers' seeds.
    """
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    cuda = device is not None and torch.device(device).type == "cuda"
    extra: dict[str, Any] = {}
    if num_workers:
        extra = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, pin_memory=cuda,
        drop_last=drop_last,
        generator=None if seed is None else torch.Generator().manual_seed(seed), **extra)


def as_unit_float(patches: torch.Tensor) -> torch.Tensor:
    """uint8 patches (``raw=True``) as float32 in ``[0, 1]``; float patches unchanged."""
    return patches.float().mul_(1 / 255) if patches.dtype == torch.uint8 else patches


def _spot_centers(section: AnnData) -> np.ndarray:
    name = section.uns.get("hifusion", {}).get("name", "section")
    if "spatial" not in section.obsm:
        raise SectionError(f"section {name!r} has no spot centres (obsm['spatial']); re-import it")
    xy = np.asarray(section.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise SectionError(f"section {name!r}: obsm['spatial'] must be finite (n_spots, 2) pixel "
                           f"centres (x, y), got shape {xy.shape}; re-import it")
    return xy


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


__all__ = ["Augment", "SpotDataset", "spot_loader", "as_unit_float"]
