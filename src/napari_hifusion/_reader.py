"""npe2 reader: slides become a multiscale image; sections become that image plus their spots.

A section (``.h5ad``, a Space Ranger output folder or a HEST-1k folder) opens as two layers that
line up in µm: the slide, and a points layer whose ``features`` hold the measured expression,
normalised like a model's targets. The section itself rides along in
``layer.metadata['hifusion']['section']`` for the dock widgets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._layers import SPOTS, TRUTH, LayerData, expression_features, points_layer_data, slide_layer_data

SLIDE_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs", ".ndpi", ".jpg", ".jpeg", ".png")
SECTION_SUFFIXES = (".h5ad",)

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
        layers.extend(read(Path(p)))
    return layers


def _read_function(path: Path) -> Callable[[Path], list[LayerData]] | None:
    name = path.name.lower()
    if path.is_dir():
        if _is_spaceranger(path):
            return read_spaceranger
        if _is_hest(path):
            return read_hest
        return None
    if name.endswith(SECTION_SUFFIXES):
        return read_section_file
    if name.endswith(SLIDE_SUFFIXES):
        return read_slide
    return None


def _is_spaceranger(folder: Path) -> bool:
    spatial = folder / "spatial"
    return spatial.is_dir() and any(spatial.glob("tissue_positions*"))


def _is_hest(folder: Path) -> bool:
    return (folder / "st").is_dir() and any((folder / "st").glob("*.h5ad"))


# -- readers ---------------------------------------------------------------------------------------
def read_slide(path: Path) -> list[LayerData]:
    from hifusion_model.slide import Slide

    return [slide_layer_data(Slide.open(path))]


def read_section_file(path: Path) -> list[LayerData]:
    """A HiFusion section, or a HEST-1k sample's ``.h5ad`` (imported on the fly)."""
    from hifusion_model.importers import import_hest
    from hifusion_model.sections import read_section

    if _is_hifusion_h5ad(path):
        return section_layers(read_section(path))
    return section_layers(import_hest(path))


def _is_hifusion_h5ad(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "uns/hifusion" in f
    except OSError:  # not HDF5: let read_section name the problem
        return True


def read_spaceranger(path: Path) -> list[LayerData]:
    from hifusion_model.importers import import_visium

    return section_layers(import_visium(path))


def read_hest(path: Path) -> list[LayerData]:
    from hifusion_model.importers import import_hest

    """Every sample of a HEST-1k folder (``st/<id>.h5ad`` with ``wsis/`` and ``metadata/``)."""
    layers: list[LayerData] = []
    for h5ad in sorted((path / "st").glob("*.h5ad")):
        layers.extend(section_layers(import_hest(h5ad)))
    return layers


def section_layers(section: Any, slide: Any = None) -> list[LayerData]:
    """The slide layer and the measured-spots layer of ``section`` (opening its slide if needed)."""
    from hifusion_model.sections import section_name, section_slide

    slide = slide if slide is not None else section_slide(section)
    name = section_name(section)
    image = slide_layer_data(slide, name=f"{name} H&E")
    kind = TRUTH if section.n_vars else SPOTS
    points = points_layer_data(
        section, name=f"{name} {'measured' if section.n_vars else 'spots'}", layer_kind=kind,
        features=expression_features(section),
    )
    return [image, points]
