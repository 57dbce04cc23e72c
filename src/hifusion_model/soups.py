"""Averaging the weights of models trained from one start: a "model soup" (Wortsman et al.,
ICML 2022).

Runs that share the recipe's ``seed`` start from the same weights and hold out the same
validation spots; a different ``data_seed`` only changes the order, augmentation and dropout
they see. Fine-tuned from one start, such runs stay in one basin of the loss, so the mean of
their weights is a working model of one model's size and speed, where an ensemble costs the
sum. Models from different starts have no such relation (their units are permuted against each
other) and are refused. How much it gains depends on how much the runs differ: on HER2ST's
3-D protocol three data orders differed little and their average scored like one of them
(BENCHMARKS.md, session 9).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import torch
from torch import Tensor

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .held_out import held_out_sections, validate

#: Card entries that must agree for two runs to have started from the same weights.
SAME_START = ("spot_encoder_init", "region_encoder_init", "init")


def _start(ckpt: Checkpoint) -> dict[str, Any]:
    recipe = ckpt.card.get("recipe") or {}
    return {"seed": recipe.get("seed"), **{k: ckpt.card.get(k) for k in SAME_START}}


def check_soup(ckpts: Sequence[Checkpoint]) -> None:
    """Refuse models whose average means nothing: other networks, genes, training data
    (their training means differ) or starting weights."""
    if len(ckpts) < 2:
        raise CheckpointError("a weight average needs at least two models")
    first = ckpts[0]
    for c in ckpts[1:]:
        if c.config.to_dict() != first.config.to_dict():
            raise CheckpointError(f"{c.path} is another network or predicts other genes than "
                                  f"{first.path}; only runs of one configuration can be averaged")
        if not torch.allclose(c.train_mean, first.train_mean, atol=1e-5):
            raise CheckpointError(f"{c.path} was trained on other spots than {first.path} "
                                  "(their training means differ)")
        if _start(c) != _start(first):
            differ = sorted(k for k, v in _start(c).items() if _start(first)[k] != v)
            raise CheckpointError(
                f"{c.path} started from other weights than {first.path} (they differ in "
                f"{', '.join(differ)}); average runs that share the recipe's seed and "
                "encoder weights and differ only in data_seed"
            )


def average_state(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The mean of every floating tensor (BatchNorm statistics included, as the averaged
    weights are close); counters and other integers are taken from the first model."""
    return {
        k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }


def soup_card(ckpts: Sequence[Checkpoint], validation: dict[str, Any] | None,
              command: Sequence[str] | None = None) -> dict[str, Any]:
    """The first model's card with the soup's own ``validation`` (None: not measured) and
    ``command``, and the ingredients, each with its training command, epoch and validation."""
    card = {k: v for k, v in ckpts[0].card.items() if k not in ("validation", "date", "epoch")}
    card["soup"] = [
        {"model": str(c.path), "data_seed": (c.card.get("recipe") or {}).get("data_seed"),
         "command": c.card.get("command"), "epoch": c.card.get("epoch"),
         "validation": c.card.get("validation")}
        for c in ckpts
    ]
    card["command"] = shlex.join(command) if command else None
    card["validation"] = validation
    return card


def save_soup(models: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              sections: Sequence[str | os.PathLike | ad.AnnData] | None = None,
              validate_on_held_out: bool = True, half: bool = False, device: str = "auto",
              command: Sequence[str] | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Average the checkpoints ``models`` into ``out`` (written atomically, never over one of
    them) and measure the average on the validation spots its ingredients held out, drawn
    again from their card (``sections`` stand in for files the card does not name). Returns
    the path and that validation (None when ``validate_on_held_out`` is false)."""
    from .model import build_model

    out = Path(out)
    if any(Path(m).resolve() == out.resolve() for m in models):
        raise CheckpointError(f"the soup would overwrite its ingredient {out}; choose another --out")
    ckpts = [load_checkpoint(m) for m in models]
    check_soup(ckpts)
    model = build_model(ckpts[0].config)
    model.load_state_dict(average_state([c.state_dict for c in ckpts]))
    validation = None
    if validate_on_held_out:
        held = held_out_sections(ckpts[0].card, sections)
        validation = validate(model, ckpts[0], held, device=device)
    path = save_checkpoint(out, model.cpu(), train_mean=ckpts[0].train_mean,
                           card=soup_card(ckpts, validation, command), half=half)
    return path, validation


__all__ = ["average_state", "check_soup", "save_soup", "soup_card"]
