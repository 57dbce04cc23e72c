"""Training: a recipe applied to sections, validated without leakage, resumable, multi-GPU.

* **Validation never sees test data.** Either given sections (``val_sections``) or a spatially
  blocked split of the training spots: neighbouring spots share tissue, so a random split would
  leak and flatter the model. The kept checkpoint is the epoch with the best validation (the
  recipe's ``select_on``: highest mean per-gene PCC, or lowest MSE). With ``val_fraction`` 0
  (and no validation sections) nothing is held out and the last epoch is kept.
* **Refit** (``recipe.refit``): on a small section the held-out spots are data the model never
  learns from, so the validated run becomes ``OUT.selection.pt`` and ``OUT`` is retrained on
  every spot, on the same schedule, up to the epoch that run chose (twice the time).
* **Resumable.** ``OUT.resume.pt`` (model, optimiser, scheduler, loss scaler, RNG states, curves,
  best so far; plain tensors and values, loadable with ``weights_only=True``) is rewritten
  atomically after every epoch and when a run is stopped. Augmentations are drawn from
  ``(seed, epoch, spot)`` and every epoch reseeds the other generators (dropout) from
  ``(seed, epoch, rank)``, so a resumed run ends with the same weights as an uninterrupted one,
  whatever the number of loader workers.
* **Distributed.** Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  DistributedDataParallel, each rank trains on its share (``DistributedSampler``), validation is
  predicted in shards and gathered on rank 0, and only rank 0 writes files.
* **Fresh heads start at the training mean** (their biases), so the first step already predicts
  the constant baseline and training learns the deviations from it.
* **Pretrained encoders.** ``spot_encoder_init`` / ``region_encoder_init`` start the spot
  encoder (ResNet-18) / region encoder (ResNet-10) from a trunk state dict (``hifusion
  pretrain``'s self-supervised weights) instead of random weights; the card records the files
  and a refit starts from them again.
* **Fine-tuning.** ``init`` starts from a checkpoint's weights and architecture. When a different
  gene list is asked for, every gene-dependent weight (the output heads) is re-initialised and
  the rest is kept.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .. import __version__
from ..data.dataset import Augment, SpotDataset
from ..data.expression import select_top_genes, smooth_targets
from ..data.sections import read_section, section_fingerprint, section_name, section_slide
from ..data.splits import held_out_spots, mixed_seed
from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import Cancelled, CheckpointError, ConfigError, HiFusionError, SectionError
from ..evaluation.metrics import evaluate_predictions
from ..future.pseudo_labels import PseudoLabels, read_pseudo_labels
from ..inference.uncertainty import fit_on_sections
from ..io_utils import atomic_path
from ..models.backbones import load_torchvision_resnet18
from ..models.checkpoint import (
    Checkpoint,
    load_checkpoint,
    resolve_checkpoint_path,
    safe_load,
    save_checkpoint,
)
from ..models.config import ENCODERS, ModelConfig
from ..models.hifusion import HiFusion
from ..models.losses import hifusion_loss
from ..models.registry import build_model
from .recipes import DEFAULT_RECIPE, TrainConfig, get_recipe

Progress = Callable[[int, int, str], None]
RESUME_FORMAT = "napari-hifusion-resume/1"


@dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoint: Path  #: the best model on validation
    curves_path: Path  #: per-epoch curves (JSON; a CSV lies beside it)
    best_epoch: int  #: 1-based
    validation: dict[str, Any]  #: ``evaluate_predictions`` of the best epoch
    curves: list[dict[str, Any]] = field(default_factory=list)


def companion_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files written beside ``MODEL.pt``: resume state, curves, and the selection run of a refit."""
    out = Path(out)
    return {
        "resume": out.with_suffix(".resume.pt"),
        "curves_json": out.with_suffix(".curves.json"),
        "curves_csv": out.with_suffix(".curves.csv"),
        "selection": out.with_suffix(".selection.pt"),
    }


# -- distributed context ----------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


@contextlib.contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the process group torchrun describes (if any); leave it only if we joined it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    joined = not dist.is_initialized()
    if joined:
        use_nccl = torch.cuda.is_available() and str(device) not in ("cpu", "mps")
        if use_nccl:  # NCCL collectives run on the current device: make it this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        if joined:  # leave together: tearing gloo down while a peer still talks aborts it
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


# -- seeding ----------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) in one go."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every generator a training step draws from, as plain tensors and values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- data -------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A section with its slide, its label for metrics and where it came from; pseudo-labelled
    spots carry their targets (they only ever train)."""

    adata: ad.AnnData
    slide: Any
    label: str
    path: str | None
    pseudo: PseudoLabels | None = None


def _unique_label(name: str, sources: list[_Source]) -> str:
    taken = {s.label for s in sources}
    label, suffix = name, 2
    while label in taken:
        label, suffix = f"{name}#{suffix}", suffix + 1
    return label


def _open_sources(items: Sequence[str | os.PathLike | ad.AnnData], role: str) -> list[_Source]:
    sources: list[_Source] = []
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
        sources.append(_Source(adata, section_slide(adata), label, path))
    if not sources:
        raise SectionError(f"no {role} sections given")
    return sources


def _pseudo_sources(items: Sequence[str | os.PathLike | PseudoLabels],
                    taken: list[_Source]) -> list[_Source]:
    """Pseudo-label files (``hifusion pseudolabel``) as training sources after ``taken``."""
    sources: list[_Source] = []
    for item in items:
        pseudo = item if isinstance(item, PseudoLabels) else read_pseudo_labels(item)
        label = _unique_label(section_name(pseudo.section), [*taken, *sources])
        sources.append(_Source(pseudo.section, section_slide(pseudo.section), label,
                               pseudo.path, pseudo))
    return sources


def _check_pseudo_validation(sources: list[_Source], val_sources: list[_Source] | None,
                             recipe: TrainConfig) -> None:
    """Held-out blocks of a section measure nothing once pseudo-labels are in: their teachers
    were trained on that section, held-out spots included."""
    if any(s.pseudo for s in sources) and not val_sources and recipe.val_fraction > 0:
        raise ConfigError(
            "pseudo-labels come from teachers trained on these sections, so spots held out of "
            "them would validate nothing; add --set val_fraction=0 (train every spot, keep the "
            "last epoch) or give --val sections the teachers never saw"
        )


def _check_disjoint(train: list[_Source], val: list[_Source]) -> None:
    """Validating on a training section would select the epoch that memorised it best."""
    for v in val:
        for t in train:
            if v.adata is t.adata or (v.path is not None and v.path == t.path):
                raise ConfigError(
                    f"section {v.label!r} is given for both training and validation; "
                    "validate on other sections, or leave out --val for a spatial split"
                )


@dataclass
class _Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None  #: None when every spot trains (a refit, val_fraction 0)
    val_labels: np.ndarray  #: section label of every validation spot, in dataset order
    train_mean: np.ndarray  #: (G,) mean normalised target over the training spots
    train_var: np.ndarray  #: (G,) its variance
    sections: list[dict[str, Any]]  #: provenance for the card
    validation: str  #: how validation spots were chosen


def shift_px(recipe: TrainConfig, config: ModelConfig) -> int:
    """The recipe's spot shift in the model's spot pixels."""
    return round(recipe.shift_um * config.spot_px / config.spot_um)


def _augment(recipe: TrainConfig, config: ModelConfig) -> Augment | None:
    shift = shift_px(recipe, config)
    if not (recipe.flips or recipe.rotations or recipe.color_jitter or recipe.hed_jitter
            or shift):
        return None
    return Augment(
        flips=recipe.flips,
        rotations=recipe.rotations,
        color_gain=recipe.color_jitter,
        color_bias=recipe.color_jitter / 2,
        hed_sigma=recipe.hed_jitter,
        shift_px=shift,
    )


class Relabelled(Dataset):
    """``base``'s samples with ``targets[i]`` as their target (e.g. spatially smoothed labels)."""

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


def _prepare_data(
    train_sources: list[_Source],
    val_sources: list[_Source] | None,
    config: ModelConfig,
    recipe: TrainConfig,
    *,
    refit: bool = False,
) -> _Data:
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
        margin = shift_px(recipe, config)
        spots = SpotDataset(s.adata, s.slide, config, None if s.pseudo else config.genes,
                            margin_px=margin)  # augmented later, per epoch
        every = (s.pseudo.targets_for(config.genes, config.normalization) if s.pseudo
                 else spots.targets.numpy())
        labels = smooth_targets(s.adata.obsm["spatial"][keep], every[keep],
                                recipe.target_smoothing)  # held-out labels never leak in
        train_parts.append(Relabelled(Subset(spots, keep), labels))
        targets.append(labels)
        if held.any():  # validation reads the plain spot window
            val_spots = SpotDataset(s.adata, s.slide, config, config.genes) if margin else spots
            val_parts.append(Subset(val_spots, np.flatnonzero(held)))
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
    if val_sources:
        validation = "sections " + ", ".join(s.label for s in val_sources)
    elif hold_out:
        validation = (f"spatial blocks: {recipe.val_grid}x{recipe.val_grid} per section, "
                      f">= {recipe.val_fraction:.0%} of spots held out")
    elif refit:
        validation = "none: every spot trains (refit to the epoch a selection run chose)"
    else:
        validation = "none: every spot trains for the whole schedule (val_fraction 0)"
    augment = _augment(recipe, config)
    train: Dataset = ConcatDataset(train_parts)
    train_targets = np.concatenate(targets)
    return _Data(
        train=EpochAugmented(train, augment, recipe.order_seed) if augment else train,
        val=ConcatDataset(val_parts) if val_parts else None,
        val_labels=np.concatenate(val_labels) if val_labels else np.array([], str),
        train_mean=train_targets.mean(axis=0),
        train_var=train_targets.var(axis=0),
        sections=info,
        validation=validation,
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


def _resolve_genes(
    genes: int | Sequence[str] | None,
    sources: list[_Source],
    recipe: TrainConfig,
    init: Checkpoint | None,
) -> list[str]:
    if genes is None and init is not None:
        return list(init.genes)
    if genes is None or isinstance(genes, int):
        return select_top_genes(
            [s.adata for s in sources], recipe.n_genes if genes is None else genes
        )
    return [str(g) for g in genes]


# -- model ------------------------------------------------------------------------------------
def _load_init(init: str | os.PathLike | None) -> Checkpoint | None:
    if init is None:
        return None
    return load_checkpoint(resolve_checkpoint_path(init))


def gene_dependent_keys(config: ModelConfig) -> set[str]:
    """Weights whose shape depends on the number of genes (the heads), found by a meta build."""
    with torch.device("meta"):
        ref = build_model(config).state_dict()
        probe = build_model(config.replace(genes=[*config.genes, "__probe__"])).state_dict()
    return {k for k in ref if ref[k].shape != probe[k].shape}


def _apply_init(model: HiFusion, ckpt: Checkpoint) -> list[str]:
    """Copy ``ckpt``'s weights into ``model``; heads stay fresh if the genes differ (returned)."""
    fresh = set() if ckpt.genes == model.config.genes else gene_dependent_keys(model.config)
    own = model.state_dict()
    state = {k: v for k, v in ckpt.state_dict.items() if k not in fresh}
    bad = [k for k in own if k not in fresh and (k not in state or state[k].shape != own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{ckpt.path}: its weights do not fit the model to fine-tune (e.g. {bad[0]}); "
            "fine-tuning keeps the checkpoint's architecture, so drop --model-config"
        )
    model.load_state_dict(state, strict=False)
    return sorted(fresh)


def start_heads_at_mean(model: nn.Module, keys: Iterable[str], train_mean: np.ndarray) -> None:
    """Set the biases of fresh heads to the training mean: training starts at the constant baseline.

    Targets are log-relative (around -5), far from a fresh head's ~0 output; starting at the
    mean spares the first epochs of learning the offset and lets the loss measure what matters,
    the deviations from the mean.
    """
    state = model.state_dict()
    mean = torch.as_tensor(train_mean, dtype=torch.float32)
    with torch.no_grad():
        for k in keys:
            if state[k].ndim == 1:
                state[k].copy_(mean)


def build_optimizer(model: nn.Module, recipe: TrainConfig,
                    pretrained: Iterable[str] = ()) -> torch.optim.Optimizer:
    """Adam on everything (as released), or AdamW sparing biases, norms and fusion logits.

    Parameters under the ``pretrained`` module prefixes (e.g. ``"spot_encoder."``) learn at
    ``recipe.pretrained_lr`` times the rate: a few hundred steps on one small section at the
    full rate can wash out what those weights learned before. At the full rate the groups stay
    as they were, so resume states written before this option still load.
    """
    prefixes = tuple(pretrained) if recipe.pretrained_lr != 1 else ()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fresh = [p for n, p in named if not n.startswith(prefixes)]
    kept = [p for n, p in named if n.startswith(prefixes)]
    groups = [*_param_groups(fresh, recipe.lr, recipe),
              *_param_groups(kept, recipe.lr * recipe.pretrained_lr, recipe)]
    optimizer = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return optimizer([g for g in groups if g["params"]], lr=recipe.lr, betas=recipe.betas)


def _param_groups(params: list[nn.Parameter], lr: float, recipe: TrainConfig) -> list[dict]:
    if recipe.optimizer == "adam":  # as released: decay on everything
        return [{"params": params, "lr": lr, "weight_decay": recipe.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "lr": lr,
             "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]


def pretrained_encoders(card: dict[str, Any], model: nn.Module) -> list[str]:
    """Module prefixes of the encoders a run started from trained weights: those given as
    encoder weights, or every encoder of a fine-tuned checkpoint. Read from the card, so a
    resumed run rebuilds the same optimiser groups."""
    names = ENCODERS if card.get("init") else _stored_encoder_init(card)
    return [f"{name}_encoder." for name in names if hasattr(model, f"{name}_encoder")]


def lr_factor(recipe: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of ``recipe.lr`` after ``t`` scheduler steps: linear warm-up, then cosine.

    With ``lr_step == "epoch"`` one scheduler step is one epoch (``CosineAnnealingLR`` as released),
    otherwise one batch.
    """
    per_epoch = 1 if recipe.lr_step == "epoch" else steps_per_epoch
    total = recipe.epochs * per_epoch
    warmup = min(round(recipe.warmup_epochs * per_epoch), total - 1)
    floor = recipe.min_lr / recipe.lr

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        progress = min(1.0, (t - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def gene_weights(recipe: TrainConfig, train_var: np.ndarray,
                 device: torch.device) -> Tensor | None:
    """Per-gene loss weights of mean 1 (``None`` for uniform): see ``recipes.GENE_WEIGHTS``.

    Variances are floored at 1 % of the median so a gene that never varies in training does
    not swamp the loss.
    """
    if recipe.gene_weights == "uniform":
        return None
    var = np.maximum(train_var, 0.01 * np.median(train_var))
    weights = 1.0 / var
    return torch.as_tensor(weights / weights.mean(), dtype=torch.float32, device=device)


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (or None).

    With ~200 optimiser steps per run (one small section), single steps move the weights a lot
    and the last one is a noisy draw; the average is a calmer model to validate and ship. The
    decay ramps up as ``(1 + n) / (10 + n)`` so the random initial weights fade quickly.
    """
    if not decay:
        return None

    def ema(averages: list[Tensor], currents: list[Tensor], n: Tensor) -> None:
        # called once per device and dtype: one host sync per update, not one per tensor
        if not averages[0].is_floating_point():  # BatchNorm's step counters
            for average, current in zip(averages, currents):
                average.copy_(current)
            return
        steps = float(n.item())
        weight = 1.0 - min(decay, (1 + steps) / (10 + steps))
        for average, current in zip(averages, currents):
            average.lerp_(current, weight)

    return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


class _SkipSampler(Sampler[int]):
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


# -- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refit:
    """A refit stage: the selection run chose ``epoch`` on held-out spots; retrain on every spot.

    The retrained model follows the same schedule and stops at that epoch. It has no held-out
    spots left, so its card carries the selection run's ``validation``: an estimate from a model
    that saw fewer spots, so if anything a pessimistic one.
    """

    epoch: int  #: 1-based epoch the selection run chose
    validation: dict[str, Any]  #: the selection run's metrics at that epoch
    selection: str  #: path of the selection run's checkpoint
    validation_split: str  #: how the selection run held spots out
    selection_command: str | None = None  #: the command that trained the selection run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validation_fields(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """The curve columns of one validation (``None`` in a refit, which holds no spot out)."""
    if metrics is None:
        return dict.fromkeys(("val_mse", "val_gene_pcc", "val_spot_pcc", "val_baseline_mse"))
    return {
        "val_mse": metrics["mse"],
        "val_gene_pcc": metrics["gene_pcc"],
        "val_spot_pcc": metrics["spot_pcc"],
        "val_baseline_mse": metrics["baseline"]["mse"],
    }


def format_epoch(record: dict[str, Any]) -> str:
    """One log line for an ``on_epoch`` record (a refit epoch has no validation to show)."""
    if record.get("refit"):
        scores = "refit on every spot, no validation"
    elif record.get("val_mse") is None:
        scores = "every spot trains, no validation"
    else:
        scores = (f"val MSE {record['val_mse']:.4f} (mean {record['val_baseline_mse']:.4f})  "
                  f"gene PCC {record['val_gene_pcc']:.3f}  spot PCC {record['val_spot_pcc']:.3f}")
    return (f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  {scores}  "
            f"lr {record['lr']:.2e}  {record['seconds']:.0f} s"
            + ("  *best" if record["best"] else ""))


class _Trainer:
    """One training run: owns the model, optimiser, loaders, curves and the files it writes."""

    def __init__(
        self,
        *,
        data: _Data,
        config: ModelConfig,
        recipe: TrainConfig,
        out: Path,
        device: torch.device,
        info: DistInfo,
        workers: int,
        card: dict[str, Any],
        init: Checkpoint | None,
        progress: Progress | None,
        should_stop: Callable[[], bool] | None,
        on_epoch: Callable[[dict], None] | None,
        refit: Refit | None = None,
        encoder_init: Mapping[str, Path] | None = None,
    ) -> None:
        self.data, self.config, self.recipe, self.out = data, config, recipe, out
        self.refit = refit
        self.last_epoch = refit.epoch if refit else recipe.epochs
        #: whether epochs are validated (not in a refit, nor when no spot is held out)
        self.validates = refit is None and data.val is not None
        self.device, self.info, self.workers, self.card = device, info, workers, card
        self.progress, self.should_stop, self.on_epoch = progress, should_stop, on_epoch
        self.paths = companion_paths(out)
        self.dtype = autocast_dtype(device, recipe.precision, training=True)

        seed_everything(recipe.seed)  # identical initial weights on every rank
        model = build_model(config)
        for encoder, path in (encoder_init or {}).items():
            load_torchvision_resnet18(_encoder_trunk(model, encoder), path)
        self.reinitialised = _apply_init(model, init) if init is not None else []
        fresh = self.reinitialised if init is not None else gene_dependent_keys(config)
        start_heads_at_mean(model, fresh, data.train_mean)
        self.model = model.to(device, memory_format=torch.channels_last)
        self.ema = weight_average(self.model, recipe.ema_decay)
        self.gene_weights = gene_weights(recipe, data.train_var, device)
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
            if info.active
            else self.model
        )

        self.loader_generator = torch.Generator()
        self.sampler = _SkipSampler(
            DistributedSampler(data.train, num_replicas=info.world, rank=info.rank, shuffle=True,
                               seed=recipe.order_seed)
        )
        per_rank = len(self.sampler.base)
        if per_rank < recipe.batch_size:
            raise SectionError(
                f"only {per_rank} training spots per process, fewer than one batch of "
                f"{recipe.batch_size}; lower --batch-size or add sections"
            )
        self.steps_per_epoch = (
            per_rank // recipe.batch_size
        )  # drop_last: batch norm hates 1-spot batches
        self.optimizer = build_optimizer(self.model, recipe, pretrained_encoders(card, model))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(recipe, self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

        self.epoch, self.step = 0, 0
        self.curves: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "val_mse": math.inf, "val_gene_pcc": -math.inf}
        self.best_written = refit is not None  # a refit starts from a copy of the selection model
        self._loss_sum = 0.0
        self._loss_parts = np.zeros(3)

    # -- resume state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": RESUME_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.loader_generator),
            "curves": self.curves,
            "best": self.best,
            "loss_sum": self._loss_sum,
            "loss_parts": self._loss_parts.tolist(),
            "recipe": self.recipe.to_dict(),
            "config": self.config.to_dict(),
            "sections": [s["name"] for s in self.data.sections],
            "fingerprints": [s.get("fingerprint") for s in self.data.sections],
            "card": self.card,
            "refit": self.refit.to_dict() if self.refit else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.curves, self.best = list(state["curves"]), dict(state["best"])
        self._loss_sum, self._loss_parts = float(state["loss_sum"]), np.asarray(state["loss_parts"])
        self.best_written = self.out.is_file()
        if self.step:  # mid-epoch: continue the generators exactly where they stopped
            set_rng_state(state["rng"], self.loader_generator)

    def save_state(self) -> None:
        if self.info.is_main:
            with atomic_path(self.paths["resume"]) as tmp:
                torch.save(self.state(), tmp)

    # -- loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            while self.epoch < self.last_epoch:
                self._run_epoch()
        except KeyboardInterrupt:
            self._stop_here()
            raise
        if self.info.is_main:
            self.paths["resume"].unlink(missing_ok=True)  # finished: nothing left to resume
        return TrainResult(
            self.out,
            self.paths["curves_json"],
            int(self.best["epoch"]),
            self.best.get("validation") or {},
            [dict(r) for r in self.curves],
        )

    def _run_epoch(self) -> None:
        start = time.perf_counter()
        if self.step == 0:
            seed_everything(mixed_seed(self.recipe.order_seed, self.epoch, self.info.rank))
            self.loader_generator.manual_seed(mixed_seed(self.recipe.order_seed, self.epoch,
                                                         1_000_003))
            self._loss_sum, self._loss_parts = 0.0, np.zeros(3)
        self.sampler.base.set_epoch(self.epoch)
        if isinstance(self.data.train, EpochAugmented):
            self.data.train.epoch = self.epoch
        self.sampler.skip = self.step * self.recipe.batch_size
        loader = DataLoader(
            self.data.train,
            batch_size=self.recipe.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.workers,
            generator=self.loader_generator,
            pin_memory=self.device.type == "cuda",
        )
        self.ddp.train()
        batches = iter(loader)
        while self.step < self.steps_per_epoch:
            if self._stop_requested():
                self._stop_here()
                raise Cancelled(
                    f"training stopped at epoch {self.epoch + 1}, step {self.step}; the best "
                    f"model so far is in {self.out}; continue with --resume"
                )
            self._train_step(next(batches))
        del batches
        self._end_epoch(time.perf_counter() - start)

    def _stop_requested(self) -> bool:
        stop = bool(self.should_stop and self.should_stop())
        if self.info.active and self.should_stop is not None:
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x

    def _train_step(self, batch: dict[str, Tensor]) -> None:
        spot, region, target = (self._to_device(batch[k]) for k in ("spot", "region", "target"))
        with autocast(self.device, self.dtype):
            output = self.ddp(spot, region)
        terms = hifusion_loss(output, target, self.config, self.gene_weights)
        if not torch.isfinite(terms.total) and not self.scaler.is_enabled():
            raise HiFusionError(
                f"training diverged at epoch {self.epoch + 1}, step {self.step + 1} (loss is "
                f"{terms.total.item()}); lower the learning rate (--lr) or use --precision fp32"
            )
        self.scaler.scale(terms.total).backward()
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.recipe.lr_step == "step":
            self.scheduler.step()
        self.step += 1
        parts = terms.item()
        self._loss_sum += parts["total"]
        self._loss_parts += (parts["main"], parts["aux"], parts["align"])
        if self.progress and self.info.is_main:
            done = self.epoch * self.steps_per_epoch + self.step
            stage = "refit epoch" if self.refit else "epoch"
            self.progress(
                done,
                self.last_epoch * self.steps_per_epoch,
                f"{stage} {self.epoch + 1}/{self.last_epoch} loss {parts['total']:.4f}",
            )

    def _end_epoch(self, seconds: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        if self.recipe.lr_step == "epoch":
            self.scheduler.step()
        metrics = self.validate() if self.validates else None
        n = max(self.step, 1)
        record = None
        if self.info.is_main:
            record = {
                "epoch": self.epoch + 1,
                "train_loss": self._loss_sum / n,
                "train_main": float(self._loss_parts[0] / n),
                "train_aux": float(self._loss_parts[1] / n),
                "train_align": float(self._loss_parts[2] / n),
                **_validation_fields(metrics),
                "lr": lr,
                "seconds": seconds,
                "refit": self.refit is not None,
            }
            record["best"] = self._is_best(record)
            self.curves.append(record)
            if record["best"]:
                self.best = {
                    "epoch": self.epoch + 1,
                    "val_mse": record["val_mse"],
                    "val_gene_pcc": record["val_gene_pcc"],
                    "validation": self.refit.validation if self.refit else metrics,
                }
                self._save_model()
            self._write_curves()
        self.epoch, self.step = self.epoch + 1, 0
        if self.epoch < self.last_epoch:
            self.save_state()
        if record is not None and self.on_epoch:
            self.on_epoch(dict(record))

    def _is_best(self, record: dict[str, Any]) -> bool:
        """The best validation so far (the recipe's ``select_on``: lowest MSE or highest gene
        PCC); in a refit, the epoch the selection run chose; without validation, the last."""
        if not self.validates:
            return record["epoch"] == self.last_epoch
        if self.recipe.select_on == "gene_pcc":
            return record["val_gene_pcc"] > self.best.get("val_gene_pcc", -math.inf)
        return record["val_mse"] < self.best["val_mse"]

    def _stop_here(self) -> None:
        """Leave a loadable model (the current one if none is saved yet) and a resume state."""
        if not self.info.is_main:
            return
        if not self.best_written:
            self._save_model(stopped=True)
        self.save_state()

    # -- validation --------------------------------------------------------------------------
    @property
    def shipped_model(self) -> nn.Module:
        """What is validated and saved: the weight average when the recipe keeps one."""
        return self.model if self.ema is None else self.ema.module

    @torch.inference_mode()
    def _predict_val(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Predict this rank's contiguous shard; rank 0 gathers all shards in order."""
        shard = np.array_split(np.arange(len(self.data.val)), self.info.world)[self.info.rank]
        loader = DataLoader(
            Subset(self.data.val, shard),
            batch_size=2 * self.recipe.batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        model = self.shipped_model.eval()
        preds, truths = [], []
        for batch in loader:
            with autocast(self.device, self.dtype):
                out = model(self._to_device(batch["spot"]), self._to_device(batch["region"]))
            preds.append(out.prediction.float().cpu().numpy())
            truths.append(batch["target"].numpy())
        self.ddp.train()
        g = self.config.n_genes
        part = (
            np.concatenate(preds) if preds else np.zeros((0, g), np.float32),
            np.concatenate(truths) if truths else np.zeros((0, g), np.float32),
        )
        if not self.info.active:
            return part
        parts: list[Any] = [None] * self.info.world if self.info.is_main else None
        dist.gather_object(part, parts, dst=0)
        if not self.info.is_main:
            return None
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def validate(self) -> dict[str, Any] | None:
        gathered = self._predict_val()
        if gathered is None:
            return None
        pred, truth = gathered
        metrics = evaluate_predictions(
            pred,
            truth,
            sections=self.data.val_labels,
            genes=self.config.genes,
            train_mean=self.data.train_mean,
        )
        # plain str/float only (no numpy scalars): the resume state loads with weights_only
        return json.loads(json.dumps(metrics))

    # -- files -------------------------------------------------------------------------------
    def _save_model(self, stopped: bool = False) -> None:
        card = {
            **self.card,
            "epoch": self.best["epoch"],
            "epochs_run": self.epoch + (0 if stopped else 1),
            "validation": self.best.get("validation"),
            "reinitialised": self.reinitialised,
        }
        if self.refit:
            card["refit"] = {"epoch": self.refit.epoch, "selection": self.refit.selection,
                             "selection_validation_split": self.refit.validation_split,
                             "selection_command": self.refit.selection_command}
        if stopped:
            card["notes"] = (
                f"stopped during epoch {self.epoch + 1}"
                + (" before any validation" if self.validates else "")
                + "; these are the weights at that moment"
            )
        save_checkpoint(self.out, self.shipped_model, train_mean=self.data.train_mean, card=card)
        self.best_written = True

    def _write_curves(self) -> None:
        with atomic_path(self.paths["curves_json"]) as tmp:
            tmp.write_text(json.dumps(self.curves, indent=1))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.curves[0]))
        writer.writeheader()
        writer.writerows(self.curves)
        with atomic_path(self.paths["curves_csv"]) as tmp:
            tmp.write_text(buffer.getvalue())


# -- entry point ------------------------------------------------------------------------------
def _base_card(
    recipe: TrainConfig,
    config: ModelConfig,
    data: _Data,
    init: Checkpoint | None,
    command: Sequence[str] | None,
    info: DistInfo,
    device: torch.device,
    encoder_init: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    encoder_init = encoder_init or {}
    return {
        "data": [s["name"] for s in data.sections],
        "sections": data.sections,  # name, path, spot counts (total, training, validation)
        "validation_split": data.validation,
        "recipe": recipe.to_dict(),
        "command": shlex.join(command) if command is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "napari-hifusion": __version__,
            "torch": str(torch.__version__),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "normalization": config.normalization,
        "spot_um": config.spot_um,
        "region_um": config.region_um,
        "spot_px": config.spot_px,
        "region_px": config.region_px,
        "mpp": config.mpp,
        "init": str(init.path) if init is not None else None,
        **{f"{encoder}_encoder_init": str(encoder_init[encoder]) if encoder in encoder_init
           else None for encoder in ENCODERS},
        "device": str(device),
        "world_size": info.world,
    }


def _stored_encoder_init(card: dict[str, Any]) -> dict[str, Path]:
    """The encoder weights a stored run started from (a refit starts from them again)."""
    return {encoder: Path(value) for encoder in ENCODERS
            if (value := card.get(f"{encoder}_encoder_init"))}


def _encoder_trunk(model: nn.Module, encoder: str) -> nn.Module:
    """The network's ``spot`` or ``region`` encoder, for pretrained weights to go into."""
    trunk = getattr(model, f"{encoder}_encoder", None)
    if trunk is None:
        raise ConfigError(f"the {type(model).__name__} network has no {encoder} encoder to "
                          "start from pretrained weights")
    return trunk


def _read_resume(path: Path) -> dict[str, Any]:
    state = safe_load(path, "resume state", "start without --resume")
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{path} is not a napari-hifusion resume state; start without --resume"
        )
    return state


def _check_same_sections(path: Path, stored: list[str], sources: list[_Source],
                         fingerprints: Sequence[str | None] | None = None) -> None:
    """The same sections by name and, where the state recorded it, by content."""
    names = [s.label for s in sources]
    if stored != names:
        raise ConfigError(
            f"{path} was written for sections {stored}, not {names}; resume with the "
            "same sections (training, then --val) in the same order"
        )
    for name, stored_print, source in zip(names, fingerprints or [], sources):
        if stored_print is not None and stored_print != section_fingerprint(source.adata):
            raise ConfigError(
                f"{path} was written for another section {name!r} (its counts or spots "
                f"differ from {source.path or name}); resume with the same files, or start "
                "a new run without --resume"
            )


def _model_config(
    recipe: TrainConfig,
    genes: int | Sequence[str] | None,
    template: ModelConfig | None,
    sources: list[_Source],
    init: Checkpoint | None,
) -> ModelConfig:
    """The architecture to train: the init's or the template's, with genes and recipe overrides."""
    chosen = _resolve_genes(genes, sources, recipe, init)
    base = init.config if init else (template or ModelConfig(genes=chosen))
    changes: dict[str, Any] = {"genes": chosen}
    for key in ("head_dropout", "align_weight"):
        if getattr(recipe, key) is not None:
            changes[key] = getattr(recipe, key)
    if recipe.level_norm is not None and init is None:  # init keeps its buffers
        changes["level_norm"] = recipe.level_norm
    return base.replace(**changes)


def _stored_setup(state: dict[str, Any]) -> tuple[TrainConfig, ModelConfig]:
    """The recipe and architecture a resume state was written with."""
    return TrainConfig.from_dict(state["recipe"]), ModelConfig.from_dict(state["config"])


def _is_refit(path: Path) -> bool:
    """Whether ``path`` holds a finished refit (not the selection model it starts as)."""
    return path.is_file() and "refit" in load_checkpoint(path).card


@dataclass
class _Session:
    """Everything one call of :func:`train` shares between its stages (selection, refit)."""

    out: Path
    train_sources: list[_Source]
    val_sources: list[_Source] | None
    device: torch.device
    info: DistInfo
    workers: int
    command: Sequence[str] | None
    progress: Progress | None
    should_stop: Callable[[], bool] | None
    on_epoch: Callable[[dict[str, Any]], None] | None
    #: starting weights of the encoders, by ``ENCODERS`` name (a fresh run)
    encoder_init: dict[str, Path] = field(default_factory=dict)
    #: (genes and spot scale, the fitted noise model's card entry), once fitted
    _noise: tuple[Any, dict[str, Any]] | None = field(default=None, init=False, repr=False)

    @property
    def every_source(self) -> list[_Source]:
        return [*self.train_sources, *(self.val_sources or [])]

    def start(self, config: ModelConfig, recipe: TrainConfig, init: Checkpoint | None,
              state: dict[str, Any] | None = None) -> TrainResult:
        """Train with validation (a refit recipe writes it to ``OUT.selection.pt``), then refit.

        Without validation (``val_fraction`` 0, no ``--val``) there is no epoch to choose and
        nothing held out to refit on: one run trains every spot to the end of the schedule."""
        _check_pseudo_validation(self.train_sources, self.val_sources, recipe)
        refit = recipe.refit and (bool(self.val_sources) or recipe.val_fraction > 0)
        target = companion_paths(self.out)["selection"] if refit else self.out
        data = _prepare_data(self.train_sources, self.val_sources, config, recipe)
        card = state["card"] if state else self._card(recipe, config, data, init)
        result = self._fit(data, config, recipe, target, card, init, state)
        if not refit:
            return result
        if init is None and card.get("init"):  # a resumed selection run: reload the init weights
            init = _load_init(card["init"])
        chosen = [result.best_epoch, result.validation]
        if self.info.active:  # only rank 0 validated: every rank must stop at its epoch
            dist.broadcast_object_list(chosen, src=0)
        stage = Refit(*chosen, str(target), data.validation, card.get("command"))
        return self.refit(config, recipe, init, stage)

    def refit(self, config: ModelConfig, recipe: TrainConfig, init: Checkpoint | None,
              refit: Refit, state: dict[str, Any] | None = None) -> TrainResult:
        """Retrain on every spot up to the chosen epoch; ``OUT`` holds the selection model till then."""
        if state is None and self.info.is_main:
            with atomic_path(self.out) as tmp:
                shutil.copyfile(refit.selection, tmp)
        data = _prepare_data(self.every_source, None, config, recipe, refit=True)
        card = state["card"] if state else self._card(recipe, config, data, init)
        return self._fit(data, config, recipe, self.out, card, init, state, refit)

    def resume(self) -> TrainResult:
        """Continue where a stopped run left off: a plain run, the selection run, or the refit."""
        paths = companion_paths(self.out)
        selection = paths["selection"]
        if paths["resume"].is_file():  # a plain run, or the refit stage
            state = _read_resume(paths["resume"])
            refit = state.get("refit")
            sources = self.every_source if refit else self.train_sources
            _check_same_sections(paths["resume"], list(state["sections"]), sources,
                                 state.get("fingerprints"))
            recipe, config = _stored_setup(state)
            self.encoder_init = _stored_encoder_init(state["card"])
            if refit:
                return self.refit(config, recipe, None, Refit(**refit), state)
            return self.start(config, recipe, None, state)
        if companion_paths(selection)["resume"].is_file():  # the selection run of a refit
            state = _read_resume(companion_paths(selection)["resume"])
            _check_same_sections(selection, list(state["sections"]), self.train_sources,
                                 state.get("fingerprints"))
            recipe, config = _stored_setup(state)
            self.encoder_init = _stored_encoder_init(state["card"])
            return self.start(config, recipe, None, state)
        if selection.is_file() and not _is_refit(self.out):  # selected; the refit never began
            ckpt = load_checkpoint(selection)
            _check_same_sections(selection, list(ckpt.card["data"]), self.train_sources,
                                 [s.get("fingerprint") if isinstance(s, dict) else None
                                  for s in ckpt.card.get("sections", [])])
            card = ckpt.card
            self.encoder_init = _stored_encoder_init(card)
            refit = Refit(card["epoch"], card["validation"], str(selection),
                          card["validation_split"], card.get("command"))
            recipe = TrainConfig.from_dict(card["recipe"]).replace(refit=True)
            return self.refit(ckpt.config, recipe, _load_init(card.get("init")), refit)
        raise CheckpointError(
            f"nothing to resume: {paths['resume']} does not exist (the run finished, or never "
            "completed a step); start without --resume"
        )

    def _card(self, recipe: TrainConfig, config: ModelConfig, data: _Data,
              init: Checkpoint | None) -> dict[str, Any]:
        card = _base_card(recipe, config, data, init, self.command, self.info, self.device,
                          self.encoder_init)
        return {**card, "noise_model": self._noise_model(config)}

    def _noise_model(self, config: ModelConfig) -> dict[str, Any]:
        """The per-spot uncertainty's library fit (:mod:`~.uncertainty`) on every measured
        spot; fitted once for both stages of a refit."""
        key = (tuple(config.genes), config.spot_um, config.spot_px)
        if self._noise is None or self._noise[0] != key:
            measured = [(s.adata, s.slide) for s in self.every_source if s.pseudo is None]
            self._noise = (key, fit_on_sections(measured, config).to_dict())
        return self._noise[1]

    def _fit(self, data: _Data, config: ModelConfig, recipe: TrainConfig, out: Path,
             card: dict[str, Any], init: Checkpoint | None, state: dict[str, Any] | None,
             refit: Refit | None = None) -> TrainResult:
        trainer = _Trainer(
            data=data, config=config, recipe=recipe, out=out, device=self.device, info=self.info,
            workers=self.workers, card=card, init=init, progress=self.progress,
            should_stop=self.should_stop, on_epoch=self.on_epoch, refit=refit,
            encoder_init=None if state else self.encoder_init,
        )
        if state:
            trainer.load_state(state)
        return trainer.fit()


def train(
    sections: Sequence[str | os.PathLike | ad.AnnData],
    out: str | os.PathLike,
    *,
    recipe: TrainConfig | str = DEFAULT_RECIPE,
    model_config: ModelConfig | None = None,
    genes: int | Sequence[str] | None = None,
    val_sections: Sequence[str | os.PathLike | ad.AnnData] | None = None,
    pseudo_labels: Sequence[str | os.PathLike | PseudoLabels] | None = None,
    init: str | os.PathLike | None = None,
    spot_encoder_init: str | os.PathLike | None = None,
    region_encoder_init: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    workers: int = 0,
    command: Sequence[str] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train HiFusion on ``sections`` (``.h5ad`` paths or AnnData); the best model goes to ``out``.

    ``model_config`` is an architecture template (its genes are replaced by the chosen ones);
    ``genes`` is a count of top genes, a list, or ``None`` (the recipe's ``n_genes``, or the
    ``init`` model's genes). ``spot_encoder_init`` starts the spot encoder from a ResNet-18
    state dict (self-supervised weights from ``hifusion pretrain``, or torchvision's) instead of
    random weights; ``region_encoder_init`` the region encoder from a ResNet-10 state dict
    (``hifusion pretrain --encoder region``). With ``recipe.refit`` the validated run goes to
    ``OUT.selection.pt`` and ``out`` is then retrained on every spot (``val_sections``
    included) up to the epoch that run chose. ``pseudo_labels`` (files from ``hifusion
    pseudolabel``) add spots between the measured ones, trained on their teachers' predictions;
    they never validate and do not choose the genes, and need ``val_fraction`` 0 or
    ``val_sections``. ``resume`` continues from the resume state of
    whichever stage was stopped, with the recipe and model configuration stored there. Raises
    :class:`Cancelled` when ``should_stop()`` turns true, after writing a loadable model and the
    resume state.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if init is not None and model_config is not None:
        raise ConfigError(
            "give either an init checkpoint or a model configuration: fine-tuning keeps the "
            "checkpoint's architecture"
        )
    encoder_init = {encoder: Path(path) for encoder, path in
                    (("spot", spot_encoder_init), ("region", region_encoder_init))
                    if path is not None}
    if encoder_init and (init is not None or resume):
        raise ConfigError(
            "encoder weights start a new run: with an init checkpoint the checkpoint's "
            "encoder is used, and a resumed run continues with the weights it started from"
        )
    with distributed(str(device)) as info:
        measured = _open_sources(sections, "training")
        train_sources = [*measured, *_pseudo_sources(pseudo_labels or [], measured)]
        val_sources = _open_sources(val_sections, "validation") if val_sections else None
        _check_disjoint(train_sources, val_sources or [])
        session = _Session(
            out=Path(out), train_sources=train_sources, val_sources=val_sources,
            device=resolve_device(device, local_rank=info.local_rank), info=info,
            workers=workers, command=command, progress=progress, should_stop=should_stop,
            on_epoch=on_epoch,
            encoder_init=encoder_init,
        )
        if resume:
            return session.resume()
        init_ckpt = _load_init(init)
        if isinstance(genes, int):
            recipe = recipe.replace(n_genes=genes)
        config = _model_config(recipe, genes, model_config, measured, init_ckpt)
        return session.start(config, recipe, init_ckpt)


__all__ = [
    "Refit",
    "TrainResult",
    "build_optimizer",
    "companion_paths",
    "format_epoch",
    "gene_dependent_keys",
    "lr_factor",
    "read_gene_list",
    "seed_everything",
    "train",
]
