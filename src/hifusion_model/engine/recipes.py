"""Training recipes: every optimisation choice in one dataclass that travels in the checkpoint card.

Two named recipes ship:

* ``released`` reproduces the HiFusion paper's settings exactly: Adam (lr 1e-3, betas 0.9/0.999,
  weight decay 1e-5), cosine annealing to 1e-6 stepped once per epoch over 50 epochs, batch 32,
  the same random flips and 90° rotations on the spot and its region, no colour jitter, no
  dropout before the head, and the released genes (250) and normalisation.
* ``hifusion`` (the default) is ours for small ST cohorts, where the released recipe overfits in a
  few epochs: AdamW (lr 3e-4, decoupled weight decay 1e-2), dropout 0.2 before the head, mild
  colour jitter (stain variation between sections is the main domain shift), a one-epoch linear
  warm-up then a per-step cosine to 1e-6, and 20 epochs of batch 16 (one HER2ST section has
  ~180 spots: 10 epochs of 32 are ~40 optimiser steps, and the network stops while still
  learning). Three changes to the model's training follow from what we measured
  (``docs/experiments.md``):

  - separate BatchNorm statistics per HISM level: the shared encoder sees 224, 112 and 32 px
    tiles, and with shared running statistics eval-mode predictions drift far from training;
  - no level-alignment term: with the released weight 0.5, the L1 between level maps is
    cheapest to satisfy by making every map nearly constant; the level heads then predicted the
    training mean (gene PCC 0.01-0.04), and dropping the term raised the validation gene PCC of
    3d-C from 0.224 to 0.254 (0.230 with a weight of 0.05);
  - an exponential moving average of the weights (decay 0.98) is validated and saved;
  - a refit: once the validation blocks have chosen the epoch, the model is trained again on
    every spot up to that epoch. On one small section the 15 % held out cost more than the
    choice gains: on 3d-C (both encoders pretrained, three seeds) the refits scored +0.006 to
    +0.027 gene PCC over their own selection runs, with a lower MSE every time. It doubles the
    training time; ``--set refit=false`` keeps the validated run.

  Stain (HED) jitter and a lower learning rate for pretrained encoders are available
  (``hed_jitter``, ``pretrained_lr``) but off: neither helped on HER2ST. A spot shift and
  spatially smoothed training labels were measured, gave nothing, and were removed (their
  fields in an old recipe are read only when off; ``docs/experiments.md``).

  Note on the colour jitter: the model standardises each image per channel (``input_norm``
  ``"image"``), which undoes a per-channel gain and bias exactly except where pixels clip, so
  this jitter only perturbs the brightest pixels (on C2's spot patches it moves the
  standardised values by 0.009 SD on average). Stain jitter is not affine in RGB and survives
  the standardisation.

A recipe is plain data: ``TrainConfig.from_dict(cfg.to_dict())`` round-trips, so the exact recipe
of any checkpoint can be read back from its card and rerun.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..models.config import LEVEL_NORMS
from ..serialization import JsonDataclass

OPTIMIZERS = ("adam", "adamw")
#: ``auto``: bf16 (or fp16 + loss scaling) autocast on CUDA, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``epoch`` steps the cosine once per epoch (as released); ``step`` once per batch.
LR_STEPS = ("epoch", "step")
#: How genes count in the regression loss: all alike (as released), or by the inverse of their
#: variance over the training spots (each gene's standardised error counts the same, as in the
#: mean per-gene PCC).
GENE_WEIGHTS = ("uniform", "inverse_variance")
#: What picks the epoch that is kept: the lowest validation MSE, or the highest mean per-gene
#: PCC (the field's metric). Both are noisy on a few dozen held-out spots (docs/experiments.md).
SELECT_ON = ("mse", "gene_pcc")


class Limit(NamedTuple):
    """The allowed interval of a numeric recipe field; ``None``: unbounded on that side."""

    low: float | None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: object) -> bool:
        v = float(value)  # type: ignore[arg-type]
        return math.isfinite(v) and not (
            (self.low is not None and (v < self.low or (self.low_open and v == self.low)))
            or (self.high is not None and (v > self.high or (self.high_open and v == self.high)))
        )

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


def bounded(default: Any, low: float | None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False, note: str = "",
            at_most: str | None = None) -> Any:
    """A numeric field and its declared range (every item's, for a tuple): ``--set`` values
    and recipe files are checked against it, and the error names it. ``at_most`` names a field
    this one may not exceed."""
    return field(default=default, metadata={
        "limit": Limit(low, high, low_open, high_open, note), "at_most": at_most})


def one_of(default: str | None, choices: tuple[str, ...]) -> Any:
    """A field that names one of ``choices`` (or is ``None`` where its type allows)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class TrainConfig(JsonDataclass):
    """How to train: optimiser, schedule, augmentation, validation split, precision, seed.

    Each numeric field declares its range (:func:`bounded`) and each named choice its options
    (:func:`one_of`); other fields take any value of their type.
    """

    _what = "training recipe"
    _retired = {"shift_um": 0.0, "target_smoothing": 0.0}

    name: str = "custom"
    epochs: int = bounded(10, 1)
    batch_size: int = bounded(32, 2, note="batch norm needs it")
    optimizer: str = one_of("adamw", OPTIMIZERS)
    lr: float = bounded(3e-4, 0, low_open=True)
    betas: tuple[float, float] = bounded((0.9, 0.999), 0, 1, high_open=True)
    weight_decay: float = bounded(1e-2, 0)
    min_lr: float = bounded(1e-6, 0, at_most="lr")
    warmup_epochs: float = bounded(1.0, 0)
    lr_step: str = one_of("step", LR_STEPS)
    # None keeps the model configuration's value
    head_dropout: float | None = bounded(0.2, 0, 1, high_open=True)
    # HISM BatchNorm statistics; None keeps the model's value
    level_norm: str | None = one_of(None, LEVEL_NORMS)
    # weight of the level-alignment L1; None keeps the model's
    align_weight: float | None = bounded(None, 0)
    flips: bool = True
    rotations: bool = True
    # per-channel gain 1 ± j and bias ± j/2 (RGB); 0 = off
    color_jitter: float = bounded(0.05, 0, 0.5)
    # stain jitter: H, E, DAB scaled by 1 ± s and shifted by ± s; 0 = off
    hed_jitter: float = bounded(0.0, 0, 0.5)
    n_genes: int = bounded(250, 1)
    # share of training spots held out in spatial blocks (no --val); 0: none held out, every
    # spot trains for the whole schedule and the last epoch is kept
    val_fraction: float = bounded(0.15, 0, 1, high_open=True)
    val_grid: int = bounded(4, 2)  # each section is cut into val_grid × val_grid spatial blocks
    seed: int = 0  # initial weights and the validation split (and, by default, the data order)
    data_seed: int | None = None  # data order, augmentation and dropout; None: seed
    precision: str = one_of("auto", PRECISIONS)
    grad_clip: float | None = bounded(None, 0, low_open=True)
    gene_weights: str = one_of("uniform", GENE_WEIGHTS)
    # validate and save an exponential moving average of the weights; 0 = off
    ema_decay: float = bounded(0.0, 0, 1, high_open=True)
    refit: bool = False  # after choosing the epoch on validation, retrain on every spot to it
    # the validation metric that chooses the epoch: mse or gene_pcc
    select_on: str = one_of("mse", SELECT_ON)
    # lr multiplier of encoders that start from trained weights
    pretrained_lr: float = bounded(1.0, 0, 1, low_open=True)

    def __post_init__(self) -> None:
        check_types(self)  # before anything compares or converts a value
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    @property
    def order_seed(self) -> int:
        """The seed of what changes from step to step. Runs that share ``seed`` but not
        ``data_seed`` start from the same weights and hold out the same spots: the spread between
        them is the data order's alone."""
        return self.seed if self.data_seed is None else self.data_seed

    def validate(self) -> None:
        """Refuse any value outside its field's declared type, range or choices."""
        check_types(self)
        fields = dataclasses.fields(self)
        problems = [p for f in fields if (p := _declared_problem(f, getattr(self, f.name)))]
        if not problems:  # bounds by another field, once every value is in its own range
            problems = [f"need {f.name} <= {other}, got {other}={getattr(self, other)}, "
                        f"{f.name}={getattr(self, f.name)}"
                        for f in fields if (other := f.metadata.get("at_most"))
                        and not getattr(self, f.name) <= getattr(self, other)]
        if problems:
            raise ConfigError("invalid training recipe: " + "; ".join(problems))


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _fits(kind: str, value: object) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, not to a recipe
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple["):  # tuple[float, float]: a list of numbers from JSON
        items = [k.strip() for k in kind[6:-1].split(",")]
        return isinstance(value, (list, tuple)) and len(value) == len(items) and all(
            _fits(k, v) for k, v in zip(items, value))
    return True


def expected(f: dataclasses.Field) -> str:
    """What a field takes, in words: its type and its declared range or choices."""
    kinds = [k.strip() for k in str(f.type).split("|")]
    limit = f.metadata.get("limit")
    if "choices" in f.metadata:
        what = f"one of {f.metadata['choices']}"
    elif kinds[0].startswith("tuple["):
        what = f"a list of {len(kinds[0].split(','))} numbers"
    else:
        what = _KINDS.get(kinds[0], kinds[0])
    if limit is not None:
        what += f" {limit}" + (f" ({limit.note})" if limit.note else "")
    return what + (" or null" if "None" in kinds else "")


def check_types(config: Any) -> None:
    """Refuse a field whose value has the wrong type (``--set lr=abc``), naming what it takes."""
    problems = [
        f"{f.name} must be {expected(f)}, got {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if not any(_fits(k.strip(), getattr(config, f.name)) for k in str(f.type).split("|"))
    ]
    if problems:
        raise ConfigError(f"invalid {config._what}: " + "; ".join(problems))


def _declared_problem(f: dataclasses.Field, value: Any) -> str | None:
    """The range or choice a value breaks, in words; None when it is allowed."""
    if value is None:
        return None
    limit, choices = f.metadata.get("limit"), f.metadata.get("choices")
    items = value if isinstance(value, tuple) else (value,)
    if (choices is not None and value not in choices) or (
            limit is not None and not all(v in limit for v in items)):
        return f"{f.name} must be {expected(f)}, got {value!r}"
    return None


RECIPES: dict[str, TrainConfig] = {
    "released": TrainConfig(
        name="released",
        epochs=50,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        betas=(0.9, 0.999),
        weight_decay=1e-5,
        min_lr=1e-6,
        warmup_epochs=0.0,
        lr_step="epoch",
        head_dropout=0.0,
        level_norm="shared",
        flips=True,
        rotations=True,
        color_jitter=0.0,
    ),
    "hifusion": TrainConfig(
        name="hifusion",
        epochs=20,
        batch_size=16,
        optimizer="adamw",
        lr=3e-4,
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        min_lr=1e-6,
        warmup_epochs=1.0,
        lr_step="step",
        head_dropout=0.2,
        level_norm="per_level",
        align_weight=0.0,
        flips=True,
        rotations=True,
        color_jitter=0.05,
        ema_decay=0.98,
        select_on="gene_pcc",
        refit=True,
    ),
}
DEFAULT_RECIPE = "hifusion"
#: Where each named recipe comes from, for ``--help`` (its choices are read from its fields).
RECIPE_ORIGINS = {"released": "the paper's", "hifusion": "ours, for small ST cohorts"}


def describe_recipe(recipe: TrainConfig) -> str:
    """The recipe's choices in words, read from its fields, so ``--help`` cannot drift from it.

    >>> describe_recipe(RECIPES["released"])  # doctest: +NORMALIZE_WHITESPACE
    'Adam 0.001, weight decay 1e-05, cosine to 1e-06 per epoch, 50 epochs of batch 32, flips and
    rotations, shared BatchNorm, the epoch chosen on validation MSE'
    """
    r = recipe
    warmup = f"{r.warmup_epochs:g}-epoch warm-up + " if r.warmup_epochs else ""
    augment = [n for n, on in (("flips", r.flips), ("rotations", r.rotations)) if on]
    augment += [f"{kind} jitter {v:g}" for kind, v in (("colour", r.color_jitter),
                                                       ("stain", r.hed_jitter)) if v]
    parts = [f"{dict(adam='Adam', adamw='AdamW')[r.optimizer]} {r.lr:g}, "
             f"weight decay {r.weight_decay:g}",
             *([f"head dropout {r.head_dropout:g}"] if r.head_dropout else []),
             f"{warmup}cosine to {r.min_lr:g} per {r.lr_step}",
             f"{r.epochs} epochs of batch {r.batch_size}",
             " and ".join([", ".join(augment[:-1]), augment[-1]] if len(augment) > 1
                          else augment) or "no augmentation"]
    if r.level_norm:
        parts.append(f"{r.level_norm.replace('_', '-')} BatchNorm")
    if r.align_weight is not None:
        parts.append("no level-alignment loss" if r.align_weight == 0
                     else f"level alignment {r.align_weight:g}")
    if r.ema_decay:
        parts.append(f"a {r.ema_decay:g} moving average of the weights is saved")
    metric = "gene PCC" if r.select_on == "gene_pcc" else "MSE"
    parts.append(f"the epoch chosen on validation {metric}")
    if r.refit:
        parts.append("then retrained on every spot up to it (refit; twice the time)")
    return ", ".join(parts)


def get_recipe(name: str = DEFAULT_RECIPE, **overrides: Any) -> TrainConfig:
    """A copy of the named recipe with ``overrides`` applied (``None`` values are ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return RECIPES[name].replace(**changes)


__all__ = ["TrainConfig", "RECIPES", "DEFAULT_RECIPE", "RECIPE_ORIGINS", "describe_recipe",
           "get_recipe", "OPTIMIZERS", "PRECISIONS"]
