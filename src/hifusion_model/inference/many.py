"""Many inputs in one run: which files a batch holds, what each writes, and who predicts what.

``hifusion predict A.h5ad B.svs slides/ --out-dir preds/`` loads its model once and writes one
prediction per input, named after it. The same rules serve a single process, a job array (one
input per task) and ``torchrun``, whose processes share the work in one of two ways:

- **inputs**: with at least as many inputs as processes, input ``i`` goes to rank
  ``i % world`` (:func:`input_share`), and each process writes its own outputs;
- **spots**: with fewer inputs than processes, every process predicts one contiguous run of
  whole batches of each input's spots (:func:`spot_share`) and rank 0 joins the parts
  (:func:`merge_shares`) into the one output. The batches are the ones a single process reads,
  so the values are those of a single-process run, in the same order.

Torch-free: the CLI wires these to the processes; the tests check each rule on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad

from ..errors import ConfigError, OutputError, SectionError

#: Files a folder contributes when no pattern is given: section files.
DEFAULT_PATTERN = "*.h5ad"
#: What each input's prediction is called in the output folder: ``NAME.pred.h5ad``.
PREDICTION_SUFFIX = ".pred.h5ad"


#: Files that make a folder a zarr store or array (zarr v2, v3).
ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")


def is_store(path: Path) -> bool:
    """A zarr store (a SpatialData ``.zarr``, or an image array inside one) is a folder that is
    one input, not a folder of inputs."""
    return path.suffix == ".zarr" or any((path / m).is_file() for m in ZARR_MARKERS)


def expand_inputs(paths: Sequence[str | os.PathLike], pattern: str | None = None) -> list[Path]:
    """The inputs named on a command line: files as given, folders as the sorted matches of
    ``pattern`` inside them (default :data:`DEFAULT_PATTERN`; ``**/`` reaches subfolders).

    A path that does not exist, or a folder with no match, is a typo to fix before any work
    starts, so it raises :class:`SectionError`; a file reached twice is predicted once.
    """
    found: list[Path] = []
    folders = [Path(p) for p in paths if Path(p).is_dir() and not is_store(Path(p))]
    if pattern is not None and not folders:
        raise ConfigError(f"--pattern {pattern!r} picks files inside folders, but no folder is "
                          "among the inputs; name a folder or drop --pattern")
    for given in map(Path, paths):
        if not given.exists():
            raise SectionError(f"{given} does not exist; give section files, slides or folders "
                               "of them")
        if given in folders:
            matches = sorted(p for p in given.glob(pattern or DEFAULT_PATTERN)
                             if p.is_file() or is_store(p))
            if not matches:
                raise SectionError(
                    f"{given}: no file matches {pattern or DEFAULT_PATTERN!r}; give --pattern "
                    "(e.g. '*.svs' for slides) or another folder"
                )
            found.extend(matches)
        else:
            found.append(given)
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def input_stem(path: str | os.PathLike) -> str:
    """An input's name without its file type (an OME-TIFF's ``.ome`` too), for its output.

    >>> input_stem("slides/S1.ome.tif"), input_stem("C4.h5ad"), input_stem("store.zarr/")
    ('S1', 'C4', 'store')
    """
    stem = Path(path).stem
    return stem.removesuffix(".ome") or stem


def output_paths(inputs: Sequence[Path], out_dir: str | os.PathLike) -> list[Path]:
    """``OUT_DIR/NAME.pred.h5ad`` for each input; two inputs of one name are refused, since the
    second would silently replace the first.

    >>> [str(p) for p in output_paths([Path("a/C4.h5ad"), Path("S1.svs")], "preds")]
    ['preds/C4.pred.h5ad', 'preds/S1.pred.h5ad']
    """
    out_dir = Path(out_dir).expanduser()
    owners: dict[Path, Path] = {}
    outputs = []
    for path in inputs:
        out = out_dir / f"{input_stem(path)}{PREDICTION_SUFFIX}"
        if out in owners:
            raise OutputError(
                f"{owners[out]} and {path} would both be written to {out}; rename one, or "
                "predict them into separate --out-dir folders"
            )
        owners[out] = path
        outputs.append(out)
    return outputs


def input_share(n_inputs: int, rank: int, world: int) -> list[int]:
    """The inputs (indices) process ``rank`` of ``world`` predicts: every ``world``-th one.

    >>> input_share(5, 0, 2), input_share(5, 1, 2)
    ([0, 2, 4], [1, 3])
    """
    return list(range(rank, n_inputs, world))


def spot_share(n_spots: int, batch_size: int, rank: int, world: int) -> slice:
    """The spots process ``rank`` of ``world`` predicts when they share one input: a
    contiguous run of whole batches, so each batch holds the spots it holds in one process (a
    batch's composition can change the last bits of a value) and the parts join in order.

    >>> [spot_share(100, 32, r, 2) for r in range(2)]
    [slice(0, 64, None), slice(64, 100, None)]
    >>> spot_share(10, 32, 1, 2)  # one batch: the second process has nothing to do
    slice(10, 10, None)
    """
    n_batches = -(-n_spots // batch_size)
    first, last = (min(-(-n_batches * r // world) * batch_size, n_spots) for r in (rank, rank + 1))
    return slice(first, last)


def merge_shares(parts: Sequence[ad.AnnData | None], source: str | os.PathLike) -> ad.AnnData:
    """The predictions of one input from its parts in rank order (``None``: a process had no
    spots), as one AnnData equal to a single process's: spots in order, ``uns`` of the first.
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise SectionError(f"{source}: no spots to predict")
    if len(present) == 1:
        return present[0]
    return ad.concat(present, axis=0, join="inner", merge="same", uns_merge="first")


__all__ = [
    "DEFAULT_PATTERN",
    "PREDICTION_SUFFIX",
    "expand_inputs",
    "input_share",
    "input_stem",
    "is_store",
    "merge_shares",
    "output_paths",
    "spot_share",
]
