"""What every importer shares: reading tables, checking spot ids and counts, and the µm/px rule.

The µm/px is never guessed: :func:`first_mpp` takes the first known value from an ordered list
of candidates, each naming its origin, or raises, because a wrong scale silently ruins every
patch the model sees.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ...errors import HiFusionError, SectionError, SlideError
from ..slide import Slide

#: Suffixes of a full-resolution image found beside a run's files.
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi")


class SpotMismatchWarning(UserWarning):
    """Counts and spot table share most, but clearly not all, of their spots."""


class CoarseImageWarning(UserWarning):
    """No full-resolution image: the spots are placed on a downsampled one (hires/lowres)."""


class SlideFacts(NamedTuple):
    """What an importer needs to know of the image, read once."""

    path: Path
    mpp: float | None
    shape: tuple[int, int]


def probe_slide(image: str | os.PathLike) -> SlideFacts:
    """Path, recorded µm/px and (H, W) of the full-resolution image, which is closed again."""
    path = Path(image).expanduser()
    if not path.is_file():
        raise SlideError(f"{path}: image not found; pass the full-resolution H&E image (--image)")
    try:
        with Slide.open(path) as slide:
            return SlideFacts(slide.path, slide.mpp, tuple(slide.shape[:2]))
    except HiFusionError:
        raise
    except Exception as e:  # a decoder's own error for a truncated or foreign file
        raise SlideError(
            f"{path}: cannot read the image ({type(e).__name__}: {e}); is it a valid image file?"
        ) from e


def first_mpp(
    candidates: Sequence[tuple[float | None, str]], source: str | os.PathLike, hint: str
) -> tuple[float, str]:
    """The first known µm/px among ``(value, origin)`` candidates, else a :class:`SlideError`."""
    for value, origin in candidates:
        if value is None:
            continue
        if not (np.isfinite(value) and value > 0):
            raise SlideError(f"{source}: µm/px from {origin} must be positive, got {value}")
        return float(value), origin
    raise SlideError(f"{source}: unknown µm/px (the image does not record it); {hint}")


def read_table(path: str | os.PathLike, what: str, **kwargs) -> pd.DataFrame:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SectionError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, OSError, UnicodeDecodeError, EOFError) as e:
        raise SectionError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from e


def require_columns(
    table: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike, what: str
) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SectionError(
            f"{path}: the {what} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, table.columns[:10]))})"
        )


def numeric_columns(
    table: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike, *, whole: bool = False
) -> np.ndarray:
    """The columns as an (n, k) float array; a :class:`SectionError` names the first column that
    holds a missing, non-numeric or infinite value (or, with ``whole``, a fraction)."""
    values = []
    for c in columns:
        v = pd.to_numeric(table[c], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SectionError(
                f"{path}: column {c} holds {int(bad.sum())} missing, non-numeric or infinite "
                f"value(s) (e.g. {table[c].iloc[i]!r} in data row {i + 1}); fix or remove "
                "those rows"
            )
        if whole and not np.array_equal(v, np.round(v)):
            i = int(np.flatnonzero(v != np.round(v))[0])
            raise SectionError(
                f"{path}: column {c} must hold whole numbers (array coordinates), got "
                f"{table[c].iloc[i]!r} in data row {i + 1}"
            )
        values.append(v)
    return np.column_stack(values) if values else np.zeros((len(table), 0))


def check_unique(ids: pd.Index | Sequence[str], path: str | os.PathLike, what: str) -> None:
    ids = pd.Index(ids)
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()
        raise SectionError(
            f"{path}: {len(dup)} duplicated spot ids in the {what} "
            f"(e.g. {', '.join(map(str, dup[:3]))}); "
            "each spot must appear once"
        )


def check_counts(values: np.ndarray, path: str | os.PathLike) -> None:
    if not np.isfinite(values).all():
        raise SectionError(f"{path}: the counts hold NaN or empty values; pass raw integer counts")
    if (values < 0).any():
        raise SectionError(f"{path}: the counts hold negative values; pass raw integer counts")


def match_spots(
    count_ids: pd.Index,
    spot_ids: pd.Index,
    counts_path: str | os.PathLike,
    spots_path: str | os.PathLike,
) -> tuple[pd.Index, dict[str, int]]:
    """Spot ids present in both tables, in count-matrix order, and how many each table lost.

    A few unmatched spots are normal (a spot table lists a spot that got no reads); an overlap
    below half of the smaller table means the files belong to different sections.
    """
    common = count_ids[count_ids.isin(spot_ids)]
    n_counts, n_spots, n_common = len(count_ids), len(spot_ids), len(common)
    if n_common < 0.5 * min(n_counts, n_spots):
        raise SectionError(
            f"{counts_path} ({n_counts} spots) and {spots_path} ({n_spots} spots) share only "
            f"{n_common} spot ids (e.g. {count_ids[0]!r} vs {spot_ids[0]!r}); "
            "pass the counts and spot table of the same section"
        )
    lost = {"counts_without_spot": n_counts - n_common, "spots_without_counts": n_spots - n_common}
    if max(lost["counts_without_spot"] / n_counts, lost["spots_without_counts"] / n_spots) > 0.1:
        warnings.warn(
            f"{counts_path} and {spots_path} share only {n_common} of {n_counts} and {n_spots} "
            "spots; "
            "check that both belong to the same section",
            SpotMismatchWarning,
            stacklevel=3,
        )
    return common, lost


def section_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".tsv", ".csv", ".h5ad", ".txt"):
        name = name.removesuffix(suffix)
    return name
