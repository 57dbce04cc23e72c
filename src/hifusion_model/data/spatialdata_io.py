"""SpatialData stores in and out: a section read from one, predictions written as one.

A scverse user keeps a section as a SpatialData ``.zarr`` store: the H&E as a multiscale image,
the spots as circles (a ``ShapesModel`` GeoDataFrame with a ``radius``), the counts as a table
annotating the circles (``region`` / ``region_key`` / ``instance_key``).

SpatialData records no unit (its axes say ``"unit"``), so µm/px comes from, in order: ``mpp=``;
a coordinate system named for micrometres (``um``, ``micrometer``, ``physical``, … or one this
project's stores list in ``attrs['hifusion']['units']``); the 100 µm Visium hex lattice of the
table's ``array_row``/``array_col``. Nothing else: a wrong scale ruins every patch.

The section's slide is the image element itself (``STORE.zarr/images/<name>``), read lazily
by :class:`~hifusion_model.data.slide.Slide` like any pyramid, so nothing is copied.
``spatialdata`` is needed only to read or write stores (``pip install
'napari-hifusion[spatialdata]'``); reading a section's image needs only zarr.

This module is the public face; the work is in :mod:`.spatialdata_stores` (recognising stores
and images), :mod:`.spatialdata_read` and :mod:`.spatialdata_write`.

>>> section = read_spatialdata("visium.zarr")                # doctest: +SKIP
>>> pred = predict(section)                                  # doctest: +SKIP
>>> write_spatialdata(pred, "visium_pred.zarr")              # doctest: +SKIP
>>> again = read_spatialdata_prediction("visium_pred.zarr")  # doctest: +SKIP
"""

from __future__ import annotations

from .spatialdata_read import read_spatialdata, read_spatialdata_prediction
from .spatialdata_stores import (
    is_prediction_store,
    is_spatialdata_store,
    is_zarr_image,
    looks_like_spatialdata_store,
    zarr_image_levels,
)
from .spatialdata_write import write_spatialdata

__all__ = ["is_prediction_store", "is_spatialdata_store", "is_zarr_image",
           "looks_like_spatialdata_store", "read_spatialdata", "read_spatialdata_prediction",
           "write_spatialdata", "zarr_image_levels"]
