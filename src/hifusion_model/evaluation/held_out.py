"""A trained model's own validation spots, drawn again from its card.

The card names the training sections and the recipe, so the spatial blocks the trainer held
out can be drawn again exactly (:func:`~hifusion_model.data.splits.validation_masks`). Anything
decided after training (test-time views, a weight average) is then judged on the spots the
model never trained on, and never on a test section.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import torch
from torch import nn

from ..data.sections import read_section, section_slide
from ..data.splits import validation_masks
from ..devices import autocast_dtype, resolve_device
from ..engine.card import ModelCard
from ..engine.recipes import TrainConfig
from ..errors import HiFusionError
from ..inference.predict import predict_section
from ..models.checkpoint import Checkpoint
from .baselines import section_targets
from .metrics import evaluate_predictions


def held_out_sections(card: dict[str, Any],
                      sections: Sequence[str | os.PathLike | ad.AnnData] | None = None,
                      ) -> list[ad.AnnData]:
    """The validation spots of every training section of ``card``, as AnnData subsets.

    ``sections`` stand in for the files the card names (in the card's order), e.g. when the
    model was trained on sections held in memory and the card has no paths.
    """
    if card.get("refit"):
        raise HiFusionError("a refit model has trained on its validation spots; give "
                            f"its selection run, {card['refit'].get('selection')}")
    typed = ModelCard.from_dict(card)
    if typed.split.kind != "spatial_blocks":
        raise HiFusionError("the card holds no spatial validation split (validated on "
                            f"{typed.split.describe()!r}); nothing to draw again")
    named = typed.sections
    if sections is None:
        missing = [s.get("name") for s in named if not s.get("path")]
        if missing:
            raise HiFusionError(f"the card records no file for the training section(s) "
                                f"{', '.join(map(str, missing))}; give the sections")
        sections = [s["path"] for s in named]
    read = [s if isinstance(s, ad.AnnData) else read_section(s) for s in sections]
    if [s.n_obs for s in read] != [s.get("n_spots") for s in named]:
        raise HiFusionError("the sections given are not the ones the model trained on (their "
                            "spot counts differ from the card's)")
    masks = validation_masks(read, typed.recipe)
    return [s[m].copy() for s, m in zip(read, masks, strict=True)]


def trainer_precision(card: dict[str, Any], device: str | torch.device) -> str:
    """The precision the trainer validated in on ``device``. Not inference's ``auto`` (bf16
    where the CPU has it): training's ``auto`` stays fp32 on the CPU."""
    recipe = TrainConfig.from_dict(card["recipe"])
    dtype = autocast_dtype(resolve_device(device), recipe.precision, training=True)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def validate(model: nn.Module, ckpt: Checkpoint, held: Sequence[ad.AnnData], *,
             device: str = "auto", precision: str | None = None, tta: int = 1) -> dict[str, Any]:
    """``model``'s metrics on the held-out spots ``held``, as the trainer reports them (in its
    precision unless ``precision`` is given)."""
    precision = precision or trainer_precision(ckpt.card, device)
    genes = ckpt.genes
    truth = np.concatenate([section_targets(s, genes, ckpt.config.normalization) for s in held])
    labels = np.concatenate([[f"section{i}"] * s.n_obs for i, s in enumerate(held)])
    pred = np.concatenate([
        predict_section(model, ckpt, s, section_slide(s), device=device, precision=precision,
                        tta=tta)
        for s in held
    ])
    return evaluate_predictions(pred, truth, sections=labels, genes=genes,
                                train_mean=ckpt.train_mean.numpy())


__all__ = ["held_out_sections", "trainer_precision", "validate"]
