"""npe2 reader: slides become a multiscale image; sections become that image plus their spots.

A section (``.h5ad``, a Space Ranger output folder or a HEST-1k folder) opens as two layers that
line up in µm: the slide, and a points layer whose ``features`` hold the measured expression,
normalised like a model's targets. The section itself rides along in
``layer.metadata['hifusion']['section']`` for the dock widgets. A prediction file (written by
``hifusion predict`` or the plugin's writer) or prediction store (``--out PRED.zarr``) opens as
the slide, its measured spots (when it holds the truth) and its predicted spots. A
scanpy/squidpy Visium ``.h5ad`` is imported on the fly.

``get_reader`` decides from names and a few ``stat`` calls only, never by opening a file, so
napari asks other plugins at once about anything this one does not read.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hifusion_model.data.slide import SUPPORTED_SUFFIXES

from ._layers import (
    PREDICTION,
    SPOT_ID,
    SPOTS,
    TRUTH,
    LayerData,
    expression_features,
    points_layer_data,
    slide_layer_data,
)

#: Files this reader opens when asked: every slide the core opens (napari.yaml claims only the
#: unambiguous ones: OME-TIFF, the scanner formats and .h5ad; plain TIFF/JPEG/PNG stay napari's
#: own unless a caller picks this plugin).
SLIDE_SUFFIXES = SUPPORTED_SUFFIXES
SECTION_SUFFIXES = (".h5ad",)
#: Folders never read here, whatever they hold (OME-Zarr images and the like), except a
#: ``.zarr`` SpatialData store (its table's spots on its image).
FOREIGN_FOLDER_SUFFIXES = (".zarr", ".n5", ".zip")

PathLike = str | os.PathLike


def get_reader(path: PathLike | list[PathLike]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader when every path is a slide, a section or a section folder, else ``None``."""
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(_read_function(Path(p)) is not None for p in paths):
        return None
    return read_paths


def read_paths(path: PathLike | list[PathLike]) -> list[LayerData]:
    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for p in paths:
        read = _read_function(Path(p))
        if read is None:  # napari calls readers only for paths get_reader accepted
            raise ValueError(f"{p}: not a file napari-hifusion reads")
        layers.extend(_in_gui_terms(read, Path(p)))
    return layers


def _read_function(path: Path) -> Callable[[Path], list[LayerData]] | None:
    name = path.name.lower()
    if name.endswith(FOREIGN_FOLDER_SUFFIXES):
        from hifusion_model.data.spatialdata_io import looks_like_spatialdata_store

        if name.endswith(".zarr") and looks_like_spatialdata_store(path):
            return read_spatialdata_store
        return None
    if name.endswith(SECTION_SUFFIXES):
        return read_section_file
    if name.endswith(SLIDE_SUFFIXES):
        return read_slide
    if not path.is_dir():
        return None
    if _is_spaceranger(path):
        return read_spaceranger
    if _is_hest(path):
        return read_hest
    return None


def _is_spaceranger(folder: Path) -> bool:
    return any(
        spatial.is_dir() and any(spatial.glob("tissue_positions*"))
        for spatial in (folder / "spatial", folder / "outs" / "spatial")
    )


def _is_hest(folder: Path) -> bool:
    return (folder / "st").is_dir() and any((folder / "st").glob("*.h5ad"))


# -- errors in the GUI's words ---------------------------------------------------------------
#: CLI hints in the core's messages, and what a napari user does instead.
GUI_HINTS = (
    (r"pass --mpp, or a spot table with new_x/new_y columns to derive it",
     "open the slide by itself and set its µm/px in the HiFusion Spots panel"),
    (r"pass --metadata with the sample's HEST JSON, or --mpp",
     "put the sample's HEST metadata JSON beside it or in ../metadata/"),
    (r"\(--metadata\)", "(beside it or in ../metadata/)"),
    (r"pass the full-resolution H&E image \(--image\)",
     "put the full-resolution H&E image back where the files say"),
    (r"pass --image", "leave exactly one full-resolution image (.tif) beside the files"),
    (r"give it with --mpp", "set it in the HiFusion Spots panel"),
    (r"\(pass --mpp to choose\)", "(set µm/px in the HiFusion Spots panel to choose)"),
    (r"pass --mpp", "open the slide by itself and set its µm/px in the HiFusion Spots panel"),
    (r"choose one with --(table|image|shapes) \((\w+)= in Python\)",
     r"napari opens a store with one \1 only; choose in Python: read_spatialdata(path, \2=NAME)"),
    (r"give its µm per pixel with --mpp \(mpp= in Python\)",
     "give it in Python: read_spatialdata(path, mpp=…)"),
)


def gui_message(message: str) -> str:
    """``message`` with its command-line hints (``pass --image``) put as napari actions."""
    for pattern, gui in GUI_HINTS:
        message = re.sub(pattern, gui, message)
    return message


def _in_gui_terms(read: Callable[[Path], list[LayerData]], path: Path) -> list[LayerData]:
    """``read(path)``, its errors and warnings (napari shows both) with GUI hints."""
    from hifusion_model.errors import HiFusionError

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return read(path)
    except HiFusionError as e:
        text = gui_message(str(e))
        if text == str(e):
            raise
        raise type(e)(text) from e
    finally:  # outside the recording: napari sees them
        for w in caught:
            warnings.warn_explicit(gui_message(str(w.message)), w.category, w.filename,
                                   w.lineno, source=w.source)


# -- readers ---------------------------------------------------------------------------------------
def read_slide(path: Path) -> list[LayerData]:
    from hifusion_model.data.slide import Slide
    from hifusion_model.inference.maps import is_map_file

    if path.name.lower().endswith((".tif", ".tiff")) and is_map_file(path):
        from ._maps import map_file_layers  # an expression map (hifusion map, Save map…)

        return map_file_layers(path)
    return [slide_layer_data(Slide.open(path))]


def read_section_file(path: Path) -> list[LayerData]:
    """A HiFusion section or prediction file, a HEST-1k sample or a scanpy/squidpy Visium
    ``.h5ad`` (the last two imported on the fly)."""
    from hifusion_model.data.importers import import_hest, import_scanpy_visium
    from hifusion_model.data.sections import read_section

    kind = h5ad_kind(path)
    if kind == "prediction":
        return prediction_layers(path)
    if kind == "section":
        return section_layers(read_section(path))
    if kind == "scanpy":
        return section_layers(import_scanpy_visium(path))
    return section_layers(import_hest(path))


def h5ad_kind(path: Path) -> str:
    """``prediction``, ``section``, ``hest`` or ``scanpy``, from the file's ``uns`` keys alone.

    A HEST-1k sample also carries ``uns['spatial']``; it is told apart by its metadata JSON or
    whole-slide image beside it (``<id>.json``, ``../metadata/<id>.json``, ``../wsis/<id>.*``).
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = set(f["uns"].keys()) if "uns" in f else set()
    except OSError:  # not HDF5: let read_section name the problem
        return "section"
    if "hifusion" in keys:
        return "prediction" if "hifusion_model" in keys else "section"
    if "spatial" in keys and not _beside_hest_files(path):
        return "scanpy"
    return "hest"


def _beside_hest_files(path: Path) -> bool:
    wsis = path.parent.parent / "wsis"
    return (
        path.with_suffix(".json").is_file()
        or (path.parent.parent / "metadata" / f"{path.stem}.json").is_file()
        or (wsis.is_dir() and any(wsis.glob(f"{path.stem}.*")))
    )


def read_spatialdata_store(path: Path) -> list[LayerData]:
    """A SpatialData store: its table's spots (and their counts) over its H&E image, or, for
    a prediction store (``hifusion predict --out PRED.zarr``), the layers of a prediction file."""
    from hifusion_model.data.spatialdata_io import is_prediction_store, read_spatialdata

    if is_prediction_store(path):
        return prediction_layers(path)
    return section_layers(read_spatialdata(path))


def read_spaceranger(path: Path) -> list[LayerData]:
    from hifusion_model.data.importers import import_visium

    return section_layers(import_visium(path))


def read_hest(path: Path) -> list[LayerData]:
    """The sample of a HEST-1k folder (``st/<id>.h5ad`` with ``wsis/`` and ``metadata/``).

    A folder of many samples is not opened whole (each is a whole-slide image): the error
    lists them, so the user opens the one wanted.
    """
    from hifusion_model.data.importers import import_hest
    from hifusion_model.errors import SectionError

    samples = sorted((path / "st").glob("*.h5ad"))
    if len(samples) > 1:
        names = ", ".join(p.stem for p in samples[:12]) + (" …" if len(samples) > 12 else "")
        raise SectionError(
            f"{path}: a HEST folder of {len(samples)} samples ({names}); open one sample's "
            f"st/<id>.h5ad (e.g. {samples[0].relative_to(path)}) rather than the whole folder"
        )
    return section_layers(import_hest(samples[0]))


def section_layers(section: Any, slide: Any = None) -> list[LayerData]:
    """The slide layer and the measured-spots layer of ``section`` (opening its slide if needed)."""
    from hifusion_model.data.sections import section_name, section_slide

    slide = slide if slide is not None else section_slide(section)
    name = section_name(section)
    image = slide_layer_data(slide, name=f"{name} H&E")
    kind = TRUTH if section.n_vars else SPOTS
    points = points_layer_data(
        section, name=f"{name} {'measured' if section.n_vars else 'spots'}", layer_kind=kind,
        features=expression_features(section),
    )
    return [image, points]


def read_predictions(path: Path) -> tuple[Any, Any]:
    """A prediction file or store and the (count-free) section of its spots, its slide path
    resolved."""
    from hifusion_model.data.sections import read_h5ad
    from hifusion_model.data.spatialdata_io import read_spatialdata_prediction
    from hifusion_model.inference.predict import prediction_spots

    adata = (read_spatialdata_prediction(path) if path.is_dir()
             else read_h5ad(path, "prediction file not found"))
    return adata, prediction_spots(adata, path)


def prediction_layers(path: Path) -> list[LayerData]:
    """The slide, the measured spots (when the file holds the truth) and the predicted spots.

    Both spot layers carry the values as saved (normalised like the model's targets), so the
    Genes panel colours and compares them as after a prediction in the panel; the predicted
    layer keeps the file's AnnData, so saving it writes a complete prediction file again.
    """
    import numpy as np
    import pandas as pd

    from hifusion_model.data.sections import section_name, section_slide

    adata, section = read_predictions(path)
    name = section_name(section)
    ids = pd.DataFrame({SPOT_ID: np.asarray(section.obs_names, dtype=object)})
    genes = [str(g) for g in adata.var_names]

    def table(values: Any) -> pd.DataFrame:
        dense = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
        return pd.concat([ids, pd.DataFrame(dense.astype(np.float32), columns=genes)], axis=1)

    identity = dict(adata.uns.get("hifusion_model", {}))
    layers = [slide_layer_data(section_slide(section), name=f"{name} H&E")]
    measured = f"{name} measured"
    if "truth" in adata.layers:
        layers.append(points_layer_data(section, name=measured, layer_kind=TRUTH,
                                        features=table(adata.layers["truth"])))
    uncertainty = (pd.DataFrame(np.asarray(adata.layers["uncertainty"]),
                                index=pd.Index(section.obs_names), columns=genes)
                   if "uncertainty" in adata.layers else None)
    layers.append(points_layer_data(
        section, name=f"{name} predicted", layer_kind=PREDICTION, features=table(adata.X),
        extra_meta={"model": identity.get("source"), "predictions": adata,
                    "spots_layer": measured, "normalization": identity.get("normalization"),
                    "test_time_views": int(identity.get("test_time_views", 1)),
                    "uncertainty": uncertainty, "prediction_file": str(path)},
    ))
    return layers
