"""How the weights move: optimiser and its parameter groups, learning-rate schedule, weight
average, per-gene loss weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..models.config import ENCODERS
from .recipes import TrainConfig


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


def pretrained_encoders(model: nn.Module, *, init: str | None,
                        encoder_init: Collection[str] = ()) -> list[str]:
    """Module prefixes of the encoders a run started from trained weights: those given as
    encoder weights (``encoder_init``'s names), or every encoder of a fine-tuned checkpoint
    (``init``). Read from the card, so a resumed run rebuilds the same optimiser groups."""
    names = ENCODERS if init else tuple(e for e in ENCODERS if e in encoder_init)
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


__all__ = ["build_optimizer", "gene_weights", "lr_factor", "pretrained_encoders",
           "weight_average"]
