"""The model card of a trained model: what it was trained on, how, and how it scored.

A checkpoint stores the card as plain JSON-like values (``Checkpoint.card``, read by ``hifusion
info`` and the viewer); :class:`ModelCard` is its typed form, written by the trainer and read
back to resume, refit or draw the validation spots again. Cards written before the typed
validation split (:class:`~hifusion_model.data.splits.ValidationSplit`) described it only in
words (``validation_split``); :meth:`ModelCard.from_dict` reads those too. Keys the trainer does
not write (``software``, a packaged model's ``test``) travel along untouched in ``extra``.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.splits import ValidationSplit
from ..errors import CheckpointError
from ..models.config import ENCODERS, ModelConfig
from .recipes import TrainConfig


def _split_of(d: Mapping[str, Any], typed: str, sentence: str) -> ValidationSplit:
    """The typed split under ``typed``, or the one an older card described under ``sentence``."""
    if typed in d:
        return ValidationSplit.from_dict(d[typed])
    return ValidationSplit.from_sentence(str(d[sentence]))


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
    split: ValidationSplit  #: how the selection run held spots out
    selection_command: str | None = None  #: the command that trained the selection run

    def to_dict(self) -> dict[str, Any]:
        """Everything, for the resume state."""
        return {**dataclasses.asdict(self), "split": self.split.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Refit:
        """Read :meth:`to_dict`, or a resume state written when the split was a sentence."""
        return cls(d["epoch"], d["validation"], d["selection"],
                   _split_of(d, "split", "validation_split"), d.get("selection_command"))

    def card_entry(self) -> dict[str, Any]:
        """The card's ``refit`` (its validation is the card's own ``validation``)."""
        return {"epoch": self.epoch, "selection": self.selection,
                "selection_validation_split": self.split.describe(),
                "selection_split": self.split.to_dict(),
                "selection_command": self.selection_command}

    @classmethod
    def from_card(cls, entry: Mapping[str, Any], validation: dict[str, Any]) -> Refit:
        return cls(entry["epoch"], validation, entry["selection"],
                   _split_of(entry, "selection_split", "selection_validation_split"),
                   entry.get("selection_command"))


@dataclass(frozen=True)
class Outcome:
    """What a written checkpoint holds: the kept epoch and its validation."""

    epoch: int  #: 1-based epoch of these weights
    epochs_run: int  #: epochs trained when it was written
    validation: dict[str, Any] | None  #: metrics of that epoch (None: nothing held out)
    reinitialised: list[str]  #: weights a fine-tuning run started afresh (new genes)
    refit: Refit | None = None  #: set on the model a refit retrained on every spot
    notes: str | None = None  #: e.g. why a run stopped early


#: Card keys read as they are (``None`` when an older card lacks them).
_RECORDED = ("command", "date", "versions", "normalization", "spot_um", "region_um", "spot_px",
             "region_px", "mpp", "init", "device", "world_size", "noise_model")
#: Card keys :class:`ModelCard` reads into typed fields; any others go to ``extra``.
_RUN_KEYS = ("data", "sections", "validation_split", "split", "recipe", *_RECORDED,
             *(f"{e}_encoder_init" for e in ENCODERS))
_OUTCOME_KEYS = ("epoch", "epochs_run", "validation", "reinitialised", "refit", "notes")


@dataclass(frozen=True)
class ModelCard:
    """Provenance of a trained model (see the module docstring)."""

    data: list[str]  #: training section labels
    sections: list[dict[str, Any]]  #: per section: name, path, fingerprint, spot counts
    split: ValidationSplit
    recipe: TrainConfig
    command: str | None  #: the exact training command, when run from one
    # what the run recorded of its time, software, scales and machine (None: an old card
    # without it)
    date: str | None
    versions: dict[str, str] | None
    normalization: str | None
    spot_um: float | None
    region_um: float | None
    spot_px: int | None
    region_px: int | None
    mpp: float | None
    init: str | None  #: the checkpoint a fine-tuning run started from
    encoder_init: dict[str, Path]  #: pretrained encoder weights a fresh run started from
    device: str | None
    world_size: int | None
    noise_model: dict[str, Any] | None  #: the per-spot uncertainty's fit (``uncertainty``)
    outcome: Outcome | None = None  #: set once weights are written
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, *, recipe: TrainConfig, config: ModelConfig, sections: list[dict[str, Any]],
            split: ValidationSplit, init: str | None, command: Sequence[str] | None,
            device: torch.device, world_size: int, encoder_init: Mapping[str, Path],
            noise_model: dict[str, Any]) -> ModelCard:
        """The card of a run starting now, on this machine."""
        return cls(
            data=[s["name"] for s in sections], sections=sections, split=split, recipe=recipe,
            command=shlex.join(command) if command is not None else None,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions={"napari-hifusion": __version__, "torch": str(torch.__version__),
                      "numpy": np.__version__, "python": platform.python_version()},
            normalization=config.normalization, spot_um=config.spot_um,
            region_um=config.region_um, spot_px=config.spot_px, region_px=config.region_px,
            mpp=config.mpp, init=init, encoder_init=dict(encoder_init), device=str(device),
            world_size=world_size, noise_model=noise_model,
        )

    def with_outcome(self, outcome: Outcome) -> ModelCard:
        return dataclasses.replace(self, outcome=outcome)

    def to_dict(self) -> dict[str, Any]:
        """The card as a checkpoint stores it (``validation_split`` is the split in words)."""
        d: dict[str, Any] = {
            "data": self.data, "sections": self.sections,
            "validation_split": self.split.describe(), "split": self.split.to_dict(),
            "recipe": self.recipe.to_dict(), "command": self.command, "date": self.date,
            "versions": self.versions, "normalization": self.normalization,
            "spot_um": self.spot_um, "region_um": self.region_um, "spot_px": self.spot_px,
            "region_px": self.region_px, "mpp": self.mpp, "init": self.init,
            **{f"{e}_encoder_init": str(self.encoder_init[e]) if e in self.encoder_init
               else None for e in ENCODERS},
            "device": self.device, "world_size": self.world_size,
            "noise_model": self.noise_model,
        }
        if self.outcome is not None:
            o = self.outcome
            d |= {"epoch": o.epoch, "epochs_run": o.epochs_run, "validation": o.validation,
                  "reinitialised": o.reinitialised}
            if o.refit is not None:
                d["refit"] = o.refit.card_entry()
            if o.notes is not None:
                d["notes"] = o.notes
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        """The card of a checkpoint or resume state written by ``hifusion train``, old or new."""
        missing = [k for k in ("data", "sections", "recipe") if k not in d]
        if missing or ("split" not in d and "validation_split" not in d):
            raise CheckpointError(
                f"the model card has no {', '.join(missing) or 'validation split'}: it was not "
                "written by hifusion train"
            )
        outcome = None
        if "epoch" in d:
            refit = d.get("refit")
            outcome = Outcome(
                d["epoch"], d.get("epochs_run", d["epoch"]), d.get("validation"),
                list(d.get("reinitialised") or []),
                Refit.from_card(refit, d.get("validation") or {}) if refit else None,
                d.get("notes"),
            )
        known = _RUN_KEYS + (_OUTCOME_KEYS if outcome else ())
        return cls(
            data=list(d["data"]), sections=list(d["sections"]),
            split=_split_of(d, "split", "validation_split"),
            recipe=TrainConfig.from_dict(d["recipe"]),
            **{k: d.get(k) for k in _RECORDED},
            encoder_init={e: Path(v) for e in ENCODERS if (v := d.get(f"{e}_encoder_init"))},
            outcome=outcome, extra={k: v for k, v in d.items() if k not in known},
        )


__all__ = ["ModelCard", "Outcome", "Refit"]
