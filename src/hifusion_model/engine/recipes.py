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

  Stain (HED) jitter, a spot shift, spatially smoothed training labels and a lower learning
  rate for pretrained encoders are available (``hed_jitter``, ``shift_um``,
  ``target_smoothing``, ``pretrained_lr``) but off: none helped on HER2ST.

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
from dataclasses import dataclass
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


@dataclass
class TrainConfig(JsonDataclass):
    """How to train: optimiser, schedule, augmentation, validation split, precision, seed."""

    _what = "training recipe"

    name: str = "custom"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    lr_step: str = "step"
    head_dropout: float | None = 0.2  # None keeps the model configuration's value
    level_norm: str | None = None  # HISM BatchNorm statistics; None keeps the model's value
    align_weight: float | None = None  # weight of the level-alignment L1; None keeps the model's
    flips: bool = True
    rotations: bool = True
    color_jitter: float = 0.05  # per-channel gain 1 ± j and bias ± j/2 (RGB); 0 = off
    hed_jitter: float = 0.0  # stain jitter: H, E, DAB scaled by 1 ± s and shifted by ± s; 0 = off
    shift_um: float = 0.0  # the spot window moves by up to ± shift_um µm (region stays); 0 = off
    n_genes: int = 250
    val_fraction: float = 0.15  # share of training spots held out in spatial blocks (no --val);
    # 0: none held out, every spot trains for the whole schedule and the last epoch is kept
    val_grid: int = 4  # each section is cut into val_grid × val_grid spatial blocks
    seed: int = 0  # initial weights and the validation split (and, by default, the data order)
    data_seed: int | None = None  # data order, augmentation and dropout; None: seed
    precision: str = "auto"
    grad_clip: float | None = None
    gene_weights: str = "uniform"
    ema_decay: float = 0.0  # validate and save an exponential moving average of the weights; 0 = off
    target_smoothing: float = 0.0  # train on labels averaged over neighbours, σ in spot pitches
    refit: bool = False  # after choosing the epoch on validation, retrain on every spot to it
    select_on: str = "mse"  # the validation metric that chooses the epoch: mse or gene_pcc
    pretrained_lr: float = 1.0  # lr multiplier of encoders that start from trained weights

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
        check_types(self)
        problems = [p for f in dataclasses.fields(self)
                    if (p := _limit_problem(f.name, str(f.type), getattr(self, f.name)))]
        if not problems and not self.min_lr <= self.lr:
            problems.append(f"need min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if problems:
            raise ConfigError("invalid training recipe: " + "; ".join(problems))


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


#: The declared range of every numeric field: ``--set`` values and recipe files are checked
#: against it, and the error names it. Fields not listed take any finite value of their type.
LIMITS: dict[str, Limit] = {
    "epochs": Limit(1),
    "batch_size": Limit(2, note="batch norm needs it"),
    "lr": Limit(0, low_open=True),
    "weight_decay": Limit(0),
    "min_lr": Limit(0),
    "warmup_epochs": Limit(0),
    "head_dropout": Limit(0, 1, high_open=True),
    "align_weight": Limit(0),
    "color_jitter": Limit(0, 0.5),
    "hed_jitter": Limit(0, 0.5),
    "shift_um": Limit(0, 50, note="µm"),
    "n_genes": Limit(1),
    "val_fraction": Limit(0, 1, high_open=True),
    "val_grid": Limit(2),
    "grad_clip": Limit(0, low_open=True),
    "ema_decay": Limit(0, 1, high_open=True),
    "target_smoothing": Limit(0, 2, note="spot pitches"),
    "pretrained_lr": Limit(0, 1, low_open=True),
}
#: The allowed values of the fields that name a choice.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "lr_step": LR_STEPS,
    "level_norm": LEVEL_NORMS,
    "precision": PRECISIONS,
    "gene_weights": GENE_WEIGHTS,
    "select_on": SELECT_ON,
}
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


def expected(name: str, annotation: str) -> str:
    """What a field takes, in words: its type and its declared range or choices."""
    kinds = [k.strip() for k in annotation.split("|")]
    if name in CHOICES:
        what = f"one of {CHOICES[name]}"
    elif kinds[0].startswith("tuple["):
        what = f"a list of {len(kinds[0].split(','))} numbers"
    else:
        what = _KINDS.get(kinds[0], kinds[0])
        limit = LIMITS.get(name)
        if limit is not None:
            what += f" {limit}" + (f" ({limit.note})" if limit.note else "")
    return what + (" or null" if "None" in kinds else "")


def check_types(config: Any) -> None:
    """Refuse a field whose value has the wrong type (``--set lr=abc``), naming what it takes."""
    problems = [
        f"{f.name} must be {expected(f.name, str(f.type))}, got {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if not any(_fits(k.strip(), getattr(config, f.name)) for k in str(f.type).split("|"))
    ]
    if problems:
        raise ConfigError(f"invalid {config._what}: " + "; ".join(problems))


def _limit_problem(name: str, annotation: str, value: Any) -> str | None:
    """The range or choice a value breaks, in words; None when it is allowed."""
    if value is None:
        return None
    if (name in CHOICES and value not in CHOICES[name]) or (
            name in LIMITS and value not in LIMITS[name]):
        return f"{name} must be {expected(name, annotation)}, got {value!r}"
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


def get_recipe(name: str = DEFAULT_RECIPE, **overrides: Any) -> TrainConfig:
    """A copy of the named recipe with ``overrides`` applied (``None`` values are ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return RECIPES[name].replace(**changes)


__all__ = ["TrainConfig", "RECIPES", "DEFAULT_RECIPE", "get_recipe", "OPTIMIZERS", "PRECISIONS"]
