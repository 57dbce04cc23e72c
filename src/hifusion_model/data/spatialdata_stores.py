"""What a SpatialData store and an OME-Zarr image are, judged from zarr alone.

Recognising a store (for napari's reader choice and the CLI) and reading an image element's
levels (the section's slide) need only zarr and a few small JSON files, so opening a slide never
loads spatialdata or pandas. ``spatialdata`` itself is imported here, once, for the modules that
read and write whole stores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io_utils import is_zarr_store

EXTRA = "napari-hifusion[spatialdata]"
#: The ``uns`` key of a prediction's model identity (``predictions_to_anndata`` writes it).
MODEL_KEY = "hifusion_model"


def import_spatialdata() -> Any:
    """The ``spatialdata`` package, or a :class:`ConfigError` naming the extra to install."""
    try:
        import spatialdata
    except ImportError as e:
        raise ConfigError(
            f"SpatialData stores need the spatialdata package ({e}); install it with "
            f"pip install '{EXTRA}'"
        ) from None
    return spatialdata


def _zarr_attrs(folder: Path) -> dict | None:
    """The attributes of a zarr group folder (v3 ``zarr.json`` or v2 ``.zattrs``), else None."""
    try:
        if (folder / "zarr.json").is_file():
            meta = json.loads((folder / "zarr.json").read_text())
            return meta.get("attributes", {}) if meta.get("node_type") == "group" else None
        if (folder / ".zgroup").is_file():
            zattrs = folder / ".zattrs"
            return json.loads(zattrs.read_text()) if zattrs.is_file() else {}
    except (OSError, ValueError):
        return None
    return None


#: Element folders of a SpatialData store; an OME-Zarr image may hold ``labels/``, never these.
STORE_FOLDERS = ("images", "shapes", "tables", "table", "points")


def looks_like_spatialdata_store(path: str | os.PathLike) -> bool:
    """A zarr group folder with SpatialData's element folders, from ``stat`` calls alone (for
    napari's reader choice, which must not open files)."""
    path = Path(path)
    return is_zarr_store(path) and any((path / k).is_dir() for k in STORE_FOLDERS)


def is_spatialdata_store(path: str | os.PathLike) -> bool:
    """A zarr group with SpatialData's root metadata or element folders (a plain OME-Zarr
    image has neither), judged from a few small files."""
    path = Path(path)
    attrs = _zarr_attrs(path) if path.is_dir() else None
    if attrs is None:
        return False
    if _multiscales(attrs) is not None:  # an image (SpatialData's elements carry its attrs too)
        return False
    if "spatialdata_attrs" in attrs:
        return True
    return any((path / k).is_dir() for k in STORE_FOLDERS)


def is_prediction_store(path: str | os.PathLike) -> bool:
    """A store one of whose tables holds predictions (``uns/hifusion_model``), from ``stat``
    calls alone."""
    return any(Path(path).glob(f"tables/*/uns/{MODEL_KEY}"))


def _multiscales(attrs: dict) -> list | None:
    ms = attrs.get("ome", attrs).get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def is_zarr_image(path: str | os.PathLike) -> bool:
    """An OME-Zarr multiscale image folder, e.g. ``STORE.zarr/images/<name>``."""
    path = Path(path)
    attrs = _zarr_attrs(path) if path.is_dir() else None
    return attrs is not None and _multiscales(attrs) is not None


class _ChannelsLast:
    """A ``(c, y, x)`` zarr array seen as ``(y, x, c)``, with ``chunks`` so that the slide's
    tile cache reads whole chunks."""

    def __init__(self, array: Any, axes: list[str]) -> None:
        self.array, self.axes = array, axes
        self.y, self.x = axes.index("y"), axes.index("x")
        self.c = axes.index("c") if "c" in axes else None
        yx = (array.shape[self.y], array.shape[self.x])
        self.shape = yx if self.c is None else (*yx, array.shape[self.c])
        self.ndim = len(self.shape)
        self.dtype = array.dtype
        self.chunks = (array.chunks[self.y], array.chunks[self.x])

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        index: list[Any] = [0] * len(self.axes)
        index[self.y], index[self.x] = key[0], key[1]
        if self.c is not None:
            index[self.c] = key[2]
        out = np.asarray(self.array[tuple(index)])
        kept = sorted(a for a in (self.y, self.x, self.c) if a is not None)
        order = [kept.index(a) for a in (self.y, self.x, self.c) if a is not None]
        return out.transpose(order)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def zarr_image_levels(path: str | os.PathLike) -> list[_ChannelsLast]:
    """The levels of an OME-Zarr multiscale image as lazy ``(H, W, C)`` arrays, finest first.

    Raises :class:`SectionError` for an image that is not one 2-D plane (z, t or a channel
    count a H&E cannot have), naming the folder.
    """
    import zarr

    from ..errors import SlideError

    path = Path(path)
    attrs = _zarr_attrs(path) or {}
    ms = _multiscales(attrs)
    if ms is None:
        raise SlideError(f"{path} is not an OME-Zarr image (no multiscales metadata)")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])]
    if not axes:
        axes = ["c", "y", "x"]  # NGFF 0.1 / 0.2 had no axes; images were (t, c, z, y, x)
    try:
        group = zarr.open_group(str(path), mode="r")
        arrays = [group[d["path"]] for d in ms[0]["datasets"]]
    except Exception as e:
        raise SlideError(f"cannot read the image {path} ({e}); the store may be incomplete") \
            from e
    extra = [a for a in axes if a not in ("y", "x", "c")]
    if any(arrays[0].shape[axes.index(a)] > 1 for a in extra) or len(axes) != arrays[0].ndim:
        raise SlideError(f"{path} has axes {axes} with shape {tuple(arrays[0].shape)}, not one "
                         "2-D RGB image; choose the H&E image element")
    return [_ChannelsLast(a, axes) for a in arrays]



__all__ = ["MODEL_KEY", "import_spatialdata", "is_prediction_store", "is_spatialdata_store",
           "is_zarr_image", "looks_like_spatialdata_store", "zarr_image_levels"]
