"""The data of a run: sections opened and checked, then cut into training and validation sets.

* **Validation never sees training spots.** Either given sections (``val_sections``, refused
  when they are also training sections) or spatial blocks of the training sections
  (:mod:`hifusion_model.data.splits`); held-out labels never leak into the smoothed targets.
* **Pseudo-labelled spots only ever train**, and never beside held-out blocks of the sections
  their teachers saw.
* **Augmentations are drawn from ``(seed, epoch, spot)``** (:class:`EpochAugmented`), so a
  resumed run sees what an uninterrupted one would, whatever the number of loader workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Sampler, Subset

from ..data.dataset import Augment, SpotDataset
from ..data.sections import read_section, section_fingerprint, section_name, section_slide
from ..data.splits import ValidationSplit, held_out_spots
from ..errors import ConfigError, SectionError
from ..future.pseudo_labels import PseudoLabels, read_pseudo_labels
from ..models.config import ModelConfig
from .recipes import TrainConfig


@dataclass
class Source:
    """A section with its slide, its label for metrics and where it came from; pseudo-labelled
    spots carry their targets (they only ever train)."""

    adata: ad.AnnData
    slide: Any
    label: str
    path: str | None
    pseudo: PseudoLabels | None = None


def _unique_label(name: str, sources: list[Source]) -> str:
    taken = {s.label for s in sources}
    label, suffix = name, 2
    while label in taken:
        label, suffix = f"{name}#{suffix}", suffix + 1
    return label


def open_sources(items: Sequence[str | os.PathLike | ad.AnnData], role: str) -> list[Source]:
    """Sections (paths or AnnData) as sources, each refused unless it has counts to learn from;
    ``role`` ("training", "validation") names them in errors."""
    sources: list[Source] = []
    for item in items:
        path = None if isinstance(item, ad.AnnData) else str(Path(item).resolve())
        adata = item if isinstance(item, ad.AnnData) else read_section(item)
        if adata.n_vars == 0:
            raise SectionError(
                f"{path or section_name(adata)}: this {role} section has no counts; training needs "
                "measured expression (import it with `hifusion import`)"
            )
        if adata.n_obs == 0 or not adata.X.sum() > 0:
            what = ("no spots" if adata.n_obs == 0
                    else f"only zero counts in its {adata.n_obs} spots")
            raise SectionError(
                f"{path or section_name(adata)}: this {role} section has {what}, so there is "
                "nothing to learn from; leave it out or import its counts again"
            )
        label = _unique_label(section_name(adata), sources)
        sources.append(Source(adata, section_slide(adata), label, path))
    if not sources:
        raise SectionError(f"no {role} sections given")
    return sources


def pseudo_sources(items: Sequence[str | os.PathLike | PseudoLabels],
                   taken: list[Source]) -> list[Source]:
    """Pseudo-label files (``hifusion pseudolabel``) as training sources after ``taken``."""
    sources: list[Source] = []
    for item in items:
        pseudo = item if isinstance(item, PseudoLabels) else read_pseudo_labels(item)
        label = _unique_label(section_name(pseudo.section), [*taken, *sources])
        sources.append(Source(pseudo.section, section_slide(pseudo.section), label,
                              pseudo.path, pseudo))
    return sources


def check_pseudo_validation(sources: list[Source], val_sources: list[Source] | None,
                            recipe: TrainConfig) -> None:
    """Held-out blocks of a section measure nothing once pseudo-labels are in: their teachers
    were trained on that section, held-out spots included."""
    if any(s.pseudo for s in sources) and not val_sources and recipe.val_fraction > 0:
        raise ConfigError(
            "pseudo-labels come from teachers trained on these sections, so spots held out of "
            "them would validate nothing; train every spot and keep the last epoch (--set "
            "val_fraction=0; the Train panel's validation 'none'), or validate on sections the "
            "teachers never saw (--val; a section picked as validation)"
        )


def check_disjoint(train: list[Source], val: list[Source]) -> None:
    """Validating on a training section would select the epoch that memorised it best."""
    for v in val:
        for t in train:
            if v.adata is t.adata or (v.path is not None and v.path == t.path):
                raise ConfigError(
                    f"section {v.label!r} is given for both training and validation; "
                    "validate on other sections, or leave out --val for a spatial split"
                )


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """Genes from a text file, one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"gene list {path} not found; give a number or a file with one gene per line"
        )
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    genes = [g for g in lines if g]
    if not genes:
        raise ConfigError(f"gene list {path} holds no gene names")
    return genes


# -- datasets ---------------------------------------------------------------------------------
def _augment(recipe: TrainConfig) -> Augment | None:
    if not (recipe.flips or recipe.rotations or recipe.color_jitter or recipe.hed_jitter):
        return None
    return Augment(
        flips=recipe.flips,
        rotations=recipe.rotations,
        color_gain=recipe.color_jitter,
        color_bias=recipe.color_jitter / 2,
        hed_sigma=recipe.hed_jitter,
    )


class Relabelled(Dataset):
    """``base``'s samples with ``targets[i]`` as their target (e.g. a pseudo-label)."""

    def __init__(self, base: Dataset, targets: np.ndarray) -> None:
        if len(base) != len(targets):  # type: ignore[arg-type]
            raise ValueError(f"{len(targets)} targets for {len(base)} samples")  # type: ignore[arg-type]
        self.base, self.targets = base, torch.from_numpy(np.asarray(targets, np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "target": self.targets[i]}


class EpochAugmented(Dataset):
    """Augments ``base`` with a draw keyed by ``(seed, epoch, index)``.

    The same sample gets the same augmentation in a given epoch whatever the number of loader
    workers, the rank, or where a resumed run picks up; ``epoch`` is set before each epoch (the
    loader's workers are forked per epoch, so they see it).
    """

    def __init__(self, base: Dataset, augment: Augment, seed: int) -> None:
        self.base, self.augment, self.seed, self.epoch = base, augment, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.base[i])
        rng = np.random.default_rng([self.seed, self.epoch, i])
        hwc = (sample[k].numpy().transpose(1, 2, 0) for k in ("spot", "region"))
        spot, region = self.augment(*hwc, rng)
        sample["spot"], sample["region"] = (
            torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in (spot, region)
        )
        return sample


class SkipSampler(Sampler[int]):
    """Wraps a sampler to drop its first ``skip`` indices: resuming in the middle of an epoch."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base = base
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.base) - self.skip


@dataclass
class Data:
    """The datasets of one run, and what its card says about them."""

    train: Dataset
    val: Dataset | None  #: None when every spot trains (a refit, val_fraction 0)
    val_labels: np.ndarray  #: section label of every validation spot, in dataset order
    train_mean: np.ndarray  #: (G,) mean normalised target over the training spots
    train_var: np.ndarray  #: (G,) its variance
    sections: list[dict[str, Any]]  #: provenance for the card
    split: ValidationSplit  #: how validation spots were chosen


def _split(val_sources: list[Source] | None, recipe: TrainConfig, hold_out: bool,
           refit: bool) -> ValidationSplit:
    if val_sources:
        return ValidationSplit("sections", sections=tuple(s.label for s in val_sources))
    if hold_out:
        return ValidationSplit("spatial_blocks", fraction=recipe.val_fraction,
                               grid=recipe.val_grid)
    return ValidationSplit("none", refit=refit)


def prepare_data(
    train_sources: list[Source],
    val_sources: list[Source] | None,
    config: ModelConfig,
    recipe: TrainConfig,
    *,
    refit: bool = False,
) -> Data:
    """Datasets of a run. A refit, or a recipe with ``val_fraction`` 0 and no validation
    sections, trains on every spot and validates on none."""
    hold_out = not refit and recipe.val_fraction > 0
    train_parts, val_parts, val_labels, targets, info = [], [], [], [], []
    for s in train_sources:
        n = s.adata.n_obs
        held = (
            np.zeros(n, bool)
            if val_sources or not hold_out or s.pseudo
            else held_out_spots(s.adata.obsm["spatial"], recipe, len(info))
        )
        keep = np.flatnonzero(~held)
        spots = SpotDataset(s.adata, s.slide, config, None if s.pseudo else config.genes)
        if s.pseudo:  # augmented later, per epoch
            labels = s.pseudo.targets_for(config.genes, config.normalization)[keep]
            train_parts.append(Relabelled(Subset(spots, keep), labels))
        else:
            labels = spots.targets.numpy()[keep]
            train_parts.append(Subset(spots, keep))
        targets.append(labels)
        if held.any():
            val_parts.append(Subset(spots, np.flatnonzero(held)))
            val_labels.append(np.full(int(held.sum()), s.label))
        info.append(
            {
                "name": s.label,
                "path": s.path,
                "fingerprint": section_fingerprint(s.adata),
                "n_spots": n,
                "n_train": len(keep),
                "n_val": int(held.sum()),
                **({"pseudo_labels_from": s.pseudo.teachers} if s.pseudo else {}),
            }
        )
    for s in val_sources or []:
        val_parts.append(SpotDataset(s.adata, s.slide, config, config.genes))
        val_labels.append(np.full(s.adata.n_obs, s.label))
    augment = _augment(recipe)
    train: Dataset = ConcatDataset(train_parts)
    train_targets = np.concatenate(targets)
    return Data(
        train=EpochAugmented(train, augment, recipe.order_seed) if augment else train,
        val=ConcatDataset(val_parts) if val_parts else None,
        val_labels=np.concatenate(val_labels) if val_labels else np.array([], str),
        train_mean=train_targets.mean(axis=0),
        train_var=train_targets.var(axis=0),
        sections=info,
        split=_split(val_sources, recipe, hold_out, refit),
    )


__all__ = [
    "Data",
    "EpochAugmented",
    "Relabelled",
    "SkipSampler",
    "Source",
    "check_disjoint",
    "check_pseudo_validation",
    "open_sources",
    "prepare_data",
    "pseudo_sources",
    "read_gene_list",
]
