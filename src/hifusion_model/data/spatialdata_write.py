"""A prediction (or a section) written as a SpatialData store: image, circles and table.

The slide becomes a multiscale image element, the spots circles of the section's diameter, and
the AnnData the table annotating them; all reach the ``global`` coordinate system in µm, so
spatialdata-plot and napari-spatialdata draw them in micrometres, and
:func:`~hifusion_model.data.spatialdata_io.read_spatialdata` reads the store back.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Cancelled, SectionError
from ..progress import Progress, ShouldStop
from .spatialdata_stores import import_spatialdata

if TYPE_CHECKING:
    import anndata as ad

#: Longest side (px) below which ``write_spatialdata`` stops adding pyramid levels.
MIN_LEVEL_PX = 1024


class _RGBLevel:
    """Level 0 of a slide as ``(H, W, 3)`` RGB uint8, read window by window (for dask)."""

    def __init__(self, slide: Any) -> None:
        self.slide, self.shape, self.dtype, self.ndim = slide, (*slide.shape, 3), np.uint8, 3

    def __getitem__(self, key: Any) -> np.ndarray:
        from .slide import to_rgb8

        rows, cols = key[0], key[1]
        return to_rgb8(np.asarray(self.slide.levels[0][rows, cols]))[:, :, key[2]]


def _element_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "section"


def write_spatialdata(
    data: ad.AnnData,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> Path:
    """Write a prediction (or a section) as a SpatialData store, atomically.

    The store holds the slide as a multiscale image, the spots as circles of the section's
    diameter in the image's pixels, and the AnnData as the table annotating them
    (``layers['truth']`` and ``layers['uncertainty']`` kept). Both reach the ``global``
    coordinate system in µm through a ``Scale``, so spatialdata-plot and napari-spatialdata draw
    them in micrometres. Level 0 is read from the slide window by window and the coarser levels
    are averaged from those windows in the same dask pass, so a whole-slide image is never
    decoded whole: each dask worker holds a few windows. An existing store is replaced only with
    ``overwrite=True``, and only once the new one is complete.
    """
    from .. import open_slide
    from ..io_utils import anndata_nbytes, check_output, check_space
    from .sections import UNS_KEY, section_slide_path

    sd = import_spatialdata()
    import dask.array as da
    import pandas as pd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    path = Path(path).expanduser()
    meta = dict(data.uns.get(UNS_KEY) or {})
    if "mpp" not in meta or "spatial" not in data.obsm:
        raise SectionError(f"{path}: the AnnData is neither a section nor a prediction (no "
                           f"uns['{UNS_KEY}'] or obsm['spatial']); predict or import it first")
    check_output(path, [section_slide_path(data)], overwrite=overwrite, flag="path",
                 overwrite_flag="overwrite=True")
    mpp = float(meta["mpp"])
    base = _element_name(str(meta.get("name", "section")))
    names = {"image": f"{base}_image", "shapes": f"{base}_spots", "table": "table"}
    to_um = {"global": Scale([mpp, mpp], axes=("y", "x"))}
    step = 0

    def tick(message: str) -> None:
        nonlocal step
        if should_stop is not None and should_stop():
            raise Cancelled(f"{path}: writing cancelled; nothing was written")
        if progress is not None:
            progress(step, 2, message)
        step += 1

    tick("reading the slide")
    slide = open_slide(section_slide_path(data), mpp=mpp)
    try:
        h, w = slide.shape
        check_space(path, int(h * w * 3 * 4 / 3) + anndata_nbytes(data))
        pixels = da.from_array(_RGBLevel(slide), chunks=(1024, 1024, 3), lock=False,
                               asarray=False).transpose(2, 0, 1)
        factors, longest = [], max(h, w)
        while longest > MIN_LEVEL_PX:
            factors.append(2)
            longest //= 2
        image = Image2DModel.parse(pixels, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                   scale_factors=factors or None, transformations=to_um,
                                   chunks=(3, 512, 512))
        xy = np.asarray(data.obsm["spatial"], dtype=float)[:, :2]
        radius = float(meta["spot_diameter_um"]) / mpp / 2
        circles = ShapesModel.parse(
            xy, geometry=0, radius=np.full(len(xy), radius), index=pd.RangeIndex(len(xy)),
            transformations={"global": Scale([mpp, mpp], axes=("x", "y"))})
        table = data.copy()
        meta.pop("slide_abs", None)
        meta["slide"] = str(section_slide_path(data))
        table.uns[UNS_KEY] = meta
        table.obs["region"] = pd.Categorical([names["shapes"]] * table.n_obs)
        table.obs["spot_id"] = np.arange(table.n_obs)
        table = TableModel.parse(table, region=names["shapes"], region_key="region",
                                 instance_key="spot_id")
        sdata = sd.SpatialData(
            images={names["image"]: image}, shapes={names["shapes"]: circles},
            tables={names["table"]: table},
            attrs={"hifusion": {"units": {"global": "micrometer"}, "mpp": mpp}})
        tick(f"writing {path.name}")
        _write_atomically(sdata, path, should_stop)
    finally:
        slide.close()
    if progress is not None:
        progress(2, 2, f"wrote {path.name}")
    return path


def _write_atomically(sdata: Any, path: Path, should_stop: ShouldStop | None) -> None:
    """Write into a hidden folder beside ``path``, then swap it in: a crash, Ctrl-C or
    cancel leaves any earlier store whole under its name and no half-written one there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, "tmp.zarr")
    old = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zarr's sharding notices
            sdata.write(tmp)
        if should_stop is not None and should_stop():
            raise Cancelled(f"{path}: writing cancelled; nothing was written")
        if path.exists() or path.is_symlink():
            old = _hidden_sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and (old.exists() or old.is_symlink()) and not path.exists():
            os.replace(old, path)  # put the earlier store back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            _remove(old)


def _hidden_sibling(path: Path, suffix: str) -> Path:
    """A fresh name beside ``path`` (same file system, so ``os.replace`` is atomic), free now."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".{suffix}", dir=path.parent))
    folder.rmdir()  # SpatialData.write and os.replace want to create it themselves
    return folder


def _remove(path: Path) -> None:
    """Delete a replaced store (or a file or link that stood at its name)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


__all__ = ["write_spatialdata"]
