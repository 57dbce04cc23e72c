"""What a stopped run leaves to be resumed: the companion files, the resume state, the seeds.

``OUT.resume.pt`` (model, optimiser, scheduler, loss scaler, RNG states, curves, best so far;
plain tensors and values, loadable with ``weights_only=True``) is rewritten atomically after
every epoch and when a run is stopped. Every epoch reseeds the generators from ``(seed, epoch,
rank)`` and a mid-epoch stop stores their states, so a resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sections import section_fingerprint
from ..errors import CheckpointError, ConfigError
from ..io_utils import atomic_path
from ..models.checkpoint import safe_load
from .sources import Source

RESUME_FORMAT = "napari-hifusion-resume/1"


def companion_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files written beside ``MODEL.pt``: resume state, curves, and the selection run of a refit.

    >>> sorted(p.name for p in companion_paths("runs/m.pt").values())
    ['m.curves.csv', 'm.curves.json', 'm.resume.pt', 'm.selection.pt']
    """
    out = Path(out)
    return {
        "resume": out.with_suffix(".resume.pt"),
        "curves_json": out.with_suffix(".curves.json"),
        "curves_csv": out.with_suffix(".curves.csv"),
        "selection": out.with_suffix(".selection.pt"),
    }


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
    """Put back what :func:`rng_state` stored."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_resume(path: Path, state: dict[str, Any]) -> None:
    """Replace the resume state at ``path`` atomically: a crash leaves the previous one."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def read_resume(path: Path) -> dict[str, Any]:
    """A resume state written by :func:`write_resume`, loaded without running stored code."""
    state = safe_load(path, "resume state", "start without --resume")
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{path} is not a napari-hifusion resume state; start without --resume"
        )
    return state


def check_same_sections(path: Path, stored: list[str], sources: list[Source],
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


__all__ = [
    "RESUME_FORMAT",
    "check_same_sections",
    "companion_paths",
    "read_resume",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "write_resume",
]
