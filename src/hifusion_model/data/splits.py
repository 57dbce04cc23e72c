"""The validation split: which training spots are held out, and how a card records the choice.

Neighbouring spots share tissue, so a random split would leak and flatter the model: whole
spatial blocks are held out instead (:func:`spatial_block_split`). The engine draws them while
training and the baselines draw the very same ones (:func:`validation_masks`), so every model is
chosen on the same spots and trained on the same others.

>>> xy = np.array([[x, y] for x in range(8) for y in range(8)], float)
>>> held = spatial_block_split(xy, fraction=0.25, grid=2, seed=0)
>>> int(held.sum()), int(held.reshape(8, 8)[:4, :4].sum()) in (0, 16)  # one whole block of 16
(16, True)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anndata as ad
import numpy as np

from ..errors import ConfigError, SectionError

#: How a run chose its validation spots: spatial blocks of its training sections, whole
#: validation sections, or none at all (every spot trains).
SplitKind = Literal["spatial_blocks", "sections", "none"]
SPLIT_KINDS: tuple[str, ...] = ("spatial_blocks", "sections", "none")


def mixed_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from several integers (seed, epoch, rank).

    >>> mixed_seed(0, 1) == mixed_seed(0, 1) != mixed_seed(1, 0)
    True
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def spatial_block_split(
    xy: np.ndarray, *, fraction: float = 0.15, grid: int = 4, seed: int = 0
) -> np.ndarray:
    """Boolean mask of held-out spots: whole spatial blocks of a ``grid × grid`` tiling.

    Blocks are drawn at random (seeded) until at least ``fraction`` of the spots are held out,
    so neighbouring spots, which share tissue, land on the same side of the split. At least one
    block is held out and at least one is kept.
    """
    xy = np.asarray(xy, dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    cell = np.floor((xy - lo) / np.maximum(hi - lo, 1e-9) * grid).clip(0, grid - 1).astype(int)
    block = cell[:, 1] * grid + cell[:, 0]
    blocks, counts = np.unique(block, return_counts=True)
    if len(blocks) < 2:
        raise SectionError(
            f"cannot hold out spatial blocks from {len(xy)} spots in one block; give --val"
        )
    order = np.random.default_rng(seed).permutation(len(blocks))
    target = fraction * len(xy)
    held, n_held = [], 0
    for i in order[:-1]:  # never hold out every block
        held.append(blocks[i])
        n_held += counts[i]
        if n_held >= target:
            break
    return np.isin(block, held)


class HoldOut(Protocol):
    """What draws the held-out blocks; a training recipe (``TrainConfig``) has these fields."""

    val_fraction: float  #: share of each section's spots held out (0: none)
    val_grid: int  #: each section is cut into ``val_grid × val_grid`` blocks
    seed: int  #: with the section's position, seeds the blocks drawn


def held_out_spots(xy: np.ndarray, hold_out: HoldOut, index: int) -> np.ndarray:
    """The held-out blocks of the ``index``-th training section (0-based) of a run."""
    return spatial_block_split(xy, fraction=hold_out.val_fraction, grid=hold_out.val_grid,
                               seed=mixed_seed(hold_out.seed, index))


def validation_masks(sections: Sequence[ad.AnnData], hold_out: HoldOut) -> list[np.ndarray]:
    """Held-out spots of each training section, exactly as training draws them (none when
    ``val_fraction`` is 0)."""
    if hold_out.val_fraction == 0:
        return [np.zeros(s.n_obs, bool) for s in sections]
    return [held_out_spots(s.obsm["spatial"], hold_out, i) for i, s in enumerate(sections)]


_BLOCKS = re.compile(r"spatial blocks: (\d+)x\d+ per section, >= (\d+)% of spots held out")


@dataclass(frozen=True)
class ValidationSplit:
    """How a run chose its validation spots, as its model card records it.

    >>> split = ValidationSplit("spatial_blocks", fraction=0.15, grid=4)
    >>> split.describe()
    'spatial blocks: 4x4 per section, >= 15% of spots held out'
    >>> ValidationSplit.from_dict(split.to_dict()) == split
    True
    """

    kind: SplitKind
    fraction: float | None = None  #: spatial blocks: at least this share of spots held out
    grid: int | None = None  #: spatial blocks: each section cut into ``grid × grid`` blocks
    sections: tuple[str, ...] = ()  #: sections: the labels of the validation sections
    refit: bool = False  #: none: a refit trains every spot, to the epoch a selection run chose

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ConfigError(f"unknown validation split {self.kind!r}; expected one of "
                              f"{', '.join(SPLIT_KINDS)}")
        object.__setattr__(self, "sections", tuple(self.sections))

    def describe(self) -> str:
        """The split in one sentence, as ``hifusion info`` shows it."""
        if self.kind == "sections":
            return "sections " + ", ".join(self.sections)
        if self.kind == "spatial_blocks":
            return (f"spatial blocks: {self.grid}x{self.grid} per section, "
                    f">= {self.fraction:.0%} of spots held out")
        if self.refit:
            return "none: every spot trains (refit to the epoch a selection run chose)"
        return "none: every spot trains for the whole schedule (val_fraction 0)"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the card: the kind and what it needs."""
        if self.kind == "sections":
            return {"kind": self.kind, "sections": list(self.sections)}
        if self.kind == "spatial_blocks":
            return {"kind": self.kind, "fraction": self.fraction, "grid": self.grid}
        return {"kind": self.kind, "refit": self.refit}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationSplit:
        return cls(**d)

    @classmethod
    def from_sentence(cls, text: str) -> ValidationSplit:
        """The split a card written before this record described in words (``describe``'s)."""
        if text.startswith("sections "):
            return cls("sections", sections=tuple(text.removeprefix("sections ").split(", ")))
        if match := _BLOCKS.fullmatch(text):
            return cls("spatial_blocks", fraction=int(match[2]) / 100, grid=int(match[1]))
        if text.startswith("none:"):
            return cls("none", refit="refit" in text)
        raise ConfigError(f"the card's validation split {text!r} is not one napari-hifusion "
                          "wrote")


__all__ = [
    "SPLIT_KINDS",
    "HoldOut",
    "SplitKind",
    "ValidationSplit",
    "held_out_spots",
    "mixed_seed",
    "spatial_block_split",
    "validation_masks",
]
