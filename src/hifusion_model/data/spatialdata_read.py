"""A section from a SpatialData store: the table's spots on one image, in its pixels.

Each element of a store has its own pixels and reaches shared coordinate systems through
transformations, so the spots are mapped onto the chosen image's full-resolution pixels through
a coordinate system both reach. µm/px comes from, in order: ``mpp=``; a coordinate system named
for micrometres; the 100 µm Visium hex lattice of the table's ``array_row``/``array_col``
(see :mod:`.spatialdata_io`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SectionError
from .spatialdata_stores import (
    MODEL_KEY,
    import_spatialdata,
    is_spatialdata_store,
    zarr_image_levels,
)

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

#: Coordinate-system names read as micrometres (lower-cased). ``physical`` is what SpatialData's
#: maintainers suggest for a µm system beside the pixel ``global`` one.
UM_SYSTEMS = frozenset({"um", "µm", "μm", "micron", "microns", "micrometer", "micrometers",
                        "micrometre", "micrometres", "physical"})
UM_UNITS = frozenset({"um", "µm", "μm", "micrometer", "micrometre", "micron"})


def _affine(sd: Any, element: Any, system: str) -> np.ndarray:
    """The 3 × 3 (x, y) affine from an element's pixels to ``system``."""
    t = sd.transformations.get_transformation(element, to_coordinate_system=system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=float)


def _systems(sd: Any, element: Any) -> set[str]:
    return set(sd.transformations.get_transformation(element, get_all=True) or {})


def _choose(kind: str, names: list[str], wanted: str | None, path: Path, argument: str,
            why: str = "") -> str:
    """``wanted`` if the store holds it, else the only one of ``names``; the errors list the
    names and say how to choose (``--image`` on the command line, ``image=`` in Python)."""
    if wanted is not None:
        if wanted not in names:
            raise SectionError(f"{path}: no {kind} {wanted!r}; it holds "
                               f"{', '.join(map(repr, names)) or 'none'}{why}")
        return wanted
    if not names:
        raise SectionError(f"{path}: the store holds no {kind}{why}; a section needs an H&E "
                           "image, spot shapes and a table annotating them")
    if len(names) > 1:
        raise SectionError(f"{path}: {len(names)} {kind}s ({', '.join(map(repr, names))})"
                           f"{why}; choose one with --{argument} ({argument}= in Python)")
    return names[0]


def _table_regions(table: ad.AnnData) -> tuple[list[str], str | None, str | None]:
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else [str(r) for r in (region or [])]
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def _spot_geometry(shapes: Any, ids: pd.Index, path: Path, name: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x, y) and diameters of the spots ``ids``, in the shapes' own pixels."""
    missing = ids.difference(shapes.index)
    if len(missing):
        raise SectionError(f"{path}: {len(missing)} table rows name shapes missing from "
                           f"{name!r} (e.g. {missing[0]!r}); the table annotates other shapes")
    rows = shapes.loc[ids]
    geometry = rows.geometry
    if (geometry.geom_type == "Point").all():
        if "radius" not in rows:
            raise SectionError(f"{path}: the points {name!r} have no radius column, so they "
                               "are not circles; give circles (ShapesModel with radius=)")
        return (np.column_stack([geometry.x.to_numpy(float), geometry.y.to_numpy(float)]),
                2 * rows["radius"].to_numpy(float))
    centre = geometry.centroid  # polygons (e.g. square bins): their equal-area circle
    return (np.column_stack([centre.x.to_numpy(float), centre.y.to_numpy(float)]),
            2 * np.sqrt(geometry.area.to_numpy(float) / np.pi))


def _um_systems(sdata: Any) -> set[str]:
    units = ((getattr(sdata, "attrs", None) or {}).get("hifusion") or {}).get("units") or {}
    listed = {str(k) for k, v in units.items() if str(v).lower() in UM_UNITS}
    return listed | set(UM_SYSTEMS)


def _scale_of(matrix: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def _physical_mpp(sd: Any, sdata: Any, image: Any) -> tuple[float, str] | None:
    um = _um_systems(sdata)
    for system in sorted(_systems(sd, image)):
        if system.lower() in um or system in um:
            return _scale_of(_affine(sd, image, system)), f"coordinate system {system!r}"
    return None


def _counts(table: ad.AnnData) -> tuple[Any, pd.Index, str] | None:
    from .importers.scanpy_visium import is_raw_counts

    if table.n_vars and is_raw_counts(table.X):
        return table.X, table.var_names, "X"
    if "counts" in table.layers and is_raw_counts(table.layers["counts"]):
        return table.layers["counts"], table.var_names, "layers['counts']"
    if table.raw is not None and is_raw_counts(table.raw.X):
        return table.raw.X, table.raw.var_names, "raw.X"
    return None


@dataclass
class StoreSpots:
    """The chosen table's rows for the chosen spots, placed on the chosen image."""

    rows: ad.AnnData  # the table's rows annotating the spots, in the table's order
    spatial: np.ndarray  # (n, 2) spot centres (x, y) in the image's full-resolution pixels
    spot_diameter_um: float
    mpp: float
    mpp_source: str
    slide: Path  # the image element's folder, read as the slide
    elements: dict[str, str]  # table, image, shapes and the coordinate system they share
    keys: tuple[str, str]  # the table's region_key and instance_key columns


def read_spatialdata(
    path: str | os.PathLike,
    *,
    table: str | None = None,
    image: str | None = None,
    shapes: str | None = None,
    mpp: float | None = None,
    name: str | None = None,
    require_counts: bool = False,
) -> ad.AnnData:
    """A section from a SpatialData store: its table's spots on one image, in that image's
    full-resolution pixels.

    ``table``, ``image``, ``shapes`` pick elements where the store holds several (the table's
    annotated shapes and the finest image sharing a coordinate system with them are chosen
    otherwise). ``mpp`` gives µm per pixel of the image when the store cannot (see the module
    docstring). Raw counts (``X``, ``layers['counts']`` or ``raw.X``) become the section's
    counts; without them the section can be predicted on but not trained on
    (``require_counts=True`` refuses it).
    """
    import pandas as pd

    from .sections import new_section

    path = Path(path).expanduser()
    spots = store_spots(path, table=table, image=image, shapes=shapes, mpp=mpp)
    rows = spots.rows
    counts = _counts(rows)
    if counts is None and require_counts:
        raise SectionError(f"{path}: the table {spots.elements['table']!r} holds no raw counts "
                           "(X, layers['counts'] or raw.X); training needs them")
    obs = rows.obs
    grid = {c: obs[c].to_numpy() for c in ("array_row", "array_col")
            if c in obs and pd.api.types.is_integer_dtype(obs[c])}
    return new_section(
        spots.spatial, slide=spots.slide, mpp=spots.mpp,
        spot_diameter_um=spots.spot_diameter_um,
        name=name or path.name.removesuffix(".zarr"), source="spatialdata", label=path,
        obs_names=list(rows.obs_names),
        counts=None if counts is None else counts[0],
        genes=None if counts is None else list(counts[1]),
        array_row=grid.get("array_row"), array_col=grid.get("array_col"),
        extra={"mpp_source": spots.mpp_source,
               "counts_source": counts[2] if counts else "none",
               "spatialdata": spots.elements},
    )


def store_spots(path: Path, *, table: str | None = None, image: str | None = None,
                shapes: str | None = None, mpp: float | None = None) -> StoreSpots:
    """Open the store, choose its elements and map the spots onto the image (see
    :func:`read_spatialdata`); what a section and a prediction read from a store share."""
    import pandas as pd

    from .importers.visium_scale import visium_lattice
    from .sections import check_mpp_plausible, check_spots_inside

    sd, sdata = _open_store(path)
    table_name = _choose("table", list(sdata.tables), table, path, "table")
    adata = sdata.tables[table_name]
    regions, region_key, instance_key = _table_regions(adata)
    circles = [r for r in regions if r in sdata.shapes]
    if not circles:
        raise SectionError(
            f"{path}: the table {table_name!r} annotates no shapes "
            f"(its regions: {', '.join(map(repr, regions)) or 'none'}); the spots must be "
            "shapes (circles) the table annotates via region/region_key/instance_key")
    shapes_name = _choose("shapes element", circles, shapes, path, "shapes",
                          f" annotated by the table {table_name!r}")
    if region_key not in adata.obs or instance_key not in adata.obs:
        raise SectionError(f"{path}: the table {table_name!r} lacks its region_key/instance_key "
                           f"columns ({region_key!r}, {instance_key!r}); parse it with "
                           "TableModel.parse(..., region_key=, instance_key=)")
    rows = adata[(adata.obs[region_key].astype(str) == shapes_name).to_numpy()]
    if rows.n_obs == 0:
        raise SectionError(f"{path}: the table {table_name!r} has no rows for {shapes_name!r}")
    gdf = sdata.shapes[shapes_name]
    xy, diameters = _spot_geometry(gdf, pd.Index(rows.obs[instance_key]), path, shapes_name)

    image_name, image_el, system = _pick_image(sd, sdata, gdf, image, path, shapes_name)
    to_image = np.linalg.inv(_affine(sd, image_el, system)) @ _affine(sd, gdf, system)
    spatial = (np.column_stack([xy, np.ones(len(xy))]) @ to_image.T)[:, :2]
    diameter_px = float(np.median(diameters)) * _scale_of(to_image)

    origin = "mpp="
    if mpp is None:
        found = _physical_mpp(sd, sdata, image_el)
        if found is None:
            fit, why = visium_lattice(rows.obs, spatial, {})
            found = (fit.mpp, why) if fit is not None else None
        if found is None:
            raise SectionError(
                f"{path}: the store gives no physical scale (no micrometre coordinate system "
                f"for the image {image_name!r}, no Visium array_row/array_col in the table); "
                "give its µm per pixel with --mpp (mpp= in Python)")
        mpp, origin = found
    check_mpp_plausible(mpp, path, origin)
    slide = path / "images" / image_name
    levels = zarr_image_levels(slide)
    check_spots_inside(spatial, levels[0].shape[:2], path, slide)
    return StoreSpots(
        rows=rows.copy(), spatial=spatial, spot_diameter_um=diameter_px * float(mpp),
        mpp=float(mpp), mpp_source=origin, slide=slide,
        elements={"table": table_name, "image": image_name, "shapes": shapes_name,
                  "coordinate_system": system},
        keys=(region_key, instance_key))


def read_spatialdata_prediction(path: str | os.PathLike, *, table: str | None = None,
                                image: str | None = None,
                                shapes: str | None = None) -> ad.AnnData:
    """A prediction written by :func:`~hifusion_model.data.spatialdata_io.write_spatialdata`,
    as :func:`~hifusion_model.api.predict` returned it: ``X`` the predictions, the truth and
    uncertainty layers, the model's identity; its slide is now the store's own image, so the
    store reopens wherever it is moved.
    """
    from .sections import UNS_KEY

    path = Path(path).expanduser()
    spots = store_spots(path, table=table, image=image, shapes=shapes)
    pred = spots.rows
    if MODEL_KEY not in pred.uns:
        raise SectionError(f"{path}: the table {spots.elements['table']!r} holds no "
                           f"predictions (no uns['{MODEL_KEY}']); predict into a store with "
                           "hifusion predict --out PRED.zarr")
    pred.obs = pred.obs.drop(columns=[k for k in spots.keys if k in pred.obs])
    pred.uns.pop("spatialdata_attrs", None)
    pred.obsm["spatial"] = spots.spatial
    meta = dict(pred.uns.get(UNS_KEY) or {})
    meta.pop("slide_abs", None)
    pred.uns[UNS_KEY] = {**meta, "slide": str(spots.slide.resolve()), "mpp": spots.mpp,
                         "spot_diameter_um": spots.spot_diameter_um,
                         "name": str(meta.get("name") or path.name.removesuffix(".zarr")),
                         "source": str(meta.get("source") or "spatialdata")}
    return pred


def _open_store(path: Path) -> tuple[Any, Any]:
    """``spatialdata`` and the store read lazily, or a :class:`SectionError` saying why not."""
    if not path.exists():
        raise SectionError(f"{path} does not exist; give a SpatialData .zarr store")
    if not is_spatialdata_store(path):
        raise SectionError(f"{path} is not a SpatialData store (no spatialdata_attrs, images/ "
                           "or tables/ in it); write it with SpatialData.write")
    sd = import_spatialdata()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sd, sd.read_zarr(path)
    except Exception as e:
        raise SectionError(f"cannot read {path} as a SpatialData store ({type(e).__name__}: "
                           f"{e}); check that it is complete") from e


def _pick_image(sd: Any, sdata: Any, gdf: Any, wanted: str | None, path: Path,
                shapes_name: str) -> tuple[str, Any, str]:
    """The image (and a coordinate system it shares with the spots): ``wanted``, else the
    finest image the spots reach (a Visium store's full image before its hires and lowres)."""
    spot_systems = _systems(sd, gdf)
    reachable: dict[str, tuple[Any, str, float]] = {}
    for name, element in sdata.images.items():
        shared = sorted(spot_systems & _systems(sd, element), key=lambda s: s != "global")
        if shared:
            to_image = np.linalg.inv(_affine(sd, element, shared[0])) @ _affine(sd, gdf,
                                                                                 shared[0])
            reachable[name] = (element, shared[0], _scale_of(to_image))
    if wanted is not None:
        if wanted not in sdata.images:
            raise SectionError(f"{path}: no image {wanted!r}; it holds "
                               f"{', '.join(map(repr, sdata.images)) or 'none'}")
        if wanted not in reachable:
            raise SectionError(f"{path}: the image {wanted!r} shares no coordinate system with "
                               f"the spots {shapes_name!r}; add a transformation to one")
        element, system, _ = reachable[wanted]
        return wanted, element, system
    if not reachable:
        raise SectionError(
            f"{path}: no image shares a coordinate system with the spots {shapes_name!r} "
            f"(images: {', '.join(map(repr, sdata.images)) or 'none'}); a section needs the "
            "H&E image its spots lie on")
    finest = max(v[2] for v in reachable.values())
    best = [n for n, v in reachable.items() if v[2] > finest / 1.01]
    name = _choose("image", sorted(best), None, path, "image",
                   " at the finest resolution")
    element, system, _ = reachable[name]
    return name, element, system


__all__ = ["read_spatialdata", "read_spatialdata_prediction", "store_spots"]
