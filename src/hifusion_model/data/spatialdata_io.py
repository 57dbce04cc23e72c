"""SpatialData stores in and out: a section read from one, predictions written as one.

A scverse user keeps a section as a SpatialData ``.zarr`` store: the H&E as a multiscale image,
the spots as circles (a ``ShapesModel`` GeoDataFrame with a ``radius``), the counts as a table
annotating the circles (``region`` / ``region_key`` / ``instance_key``). Each element has its own
pixels and reaches shared coordinate systems through transformations, so the spots are mapped
onto the chosen image's full-resolution pixels through a coordinate system both reach.

SpatialData records no unit (its axes say ``"unit"``), so µm/px comes from, in order: ``mpp=``;
a coordinate system named for micrometres (``um``, ``micrometer``, ``physical``, … or one this
project's stores list in ``attrs['hifusion']['units']``); the 100 µm Visium hex lattice of the
table's ``array_row``/``array_col``. Nothing else: a wrong scale ruins every patch.

The section's slide is the image element itself (``STORE.zarr/images/<name>``), read lazily
by :class:`~hifusion_model.data.slide.Slide` like any pyramid, so nothing is copied.
``spatialdata`` is needed only to read or write stores (``pip install
'napari-hifusion[spatialdata]'``); reading a section's image needs only zarr.

>>> section = read_spatialdata("visium.zarr")                # doctest: +SKIP
>>> pred = predict(section)                                  # doctest: +SKIP
>>> write_spatialdata(pred, "visium_pred.zarr")              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Cancelled, ConfigError, SectionError
from ..progress import Progress, ShouldStop

if TYPE_CHECKING:  # Slide.open imports this module: opening a slide must not load pandas
    import anndata as ad
    import pandas as pd

EXTRA = "napari-hifusion[spatialdata]"
#: Coordinate-system names read as micrometres (lower-cased). ``physical`` is what SpatialData's
#: maintainers suggest for a µm system beside the pixel ``global`` one.
UM_SYSTEMS = frozenset({"um", "µm", "μm", "micron", "microns", "micrometer", "micrometers",
                        "micrometre", "micrometres", "physical"})
UM_UNITS = frozenset({"um", "µm", "μm", "micrometer", "micrometre", "micron"})
#: Longest side (px) below which ``write_spatialdata`` stops adding pyramid levels.
MIN_LEVEL_PX = 1024


def _spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as e:
        raise ConfigError(
            f"SpatialData stores need the spatialdata package ({e}); install it with "
            f"pip install '{EXTRA}'"
        ) from None
    return spatialdata


# -- recognising stores and images (zarr only: cheap, and no spatialdata needed) -----------
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
    return (((path / "zarr.json").is_file() or (path / ".zgroup").is_file())
            and any((path / k).is_dir() for k in STORE_FOLDERS))


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


# -- reading ---------------------------------------------------------------------------------
def _affine(sd: Any, element: Any, system: str) -> np.ndarray:
    """The 3 × 3 (x, y) affine from an element's pixels to ``system``."""
    t = sd.transformations.get_transformation(element, to_coordinate_system=system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=float)


def _systems(sd: Any, element: Any) -> set[str]:
    return set(sd.transformations.get_transformation(element, get_all=True) or {})


def _choose(kind: str, names: list[str], wanted: str | None, path: Path, argument: str,
            why: str = "") -> str:
    if wanted is not None:
        if wanted not in names:
            raise SectionError(f"{path}: no {kind} {wanted!r}; it holds "
                               f"{', '.join(map(repr, names)) or 'none'}{why}")
        return wanted
    if not names:
        raise SectionError(f"{path}: the store holds no {kind}{why}; a section needs an H&E "
                           "image, spot shapes and a table annotating them")
    if len(names) > 1:
        raise SectionError(f"{path}: {len(names)} {kind}s ({', '.join(map(repr, names))}); "
                           f"choose one with {argument}=")
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

    from .importers.visium_scale import visium_lattice
    from .sections import check_mpp_plausible, check_spots_inside, new_section

    path = Path(path).expanduser()
    if not path.exists():
        raise SectionError(f"{path} does not exist; give a SpatialData .zarr store")
    if not is_spatialdata_store(path):
        raise SectionError(f"{path} is not a SpatialData store (no spatialdata_attrs, images/ "
                           "or tables/ in it); write it with SpatialData.write")
    sd = _spatialdata()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = sd.read_zarr(path)
    except Exception as e:
        raise SectionError(f"cannot read {path} as a SpatialData store ({type(e).__name__}: "
                           f"{e}); check that it is complete") from e

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
    counts = _counts(rows)
    if counts is None and require_counts:
        raise SectionError(f"{path}: the table {table_name!r} holds no raw counts (X, "
                           "layers['counts'] or raw.X); training needs them")
    obs = rows.obs
    grid = {c: obs[c].to_numpy() for c in ("array_row", "array_col")
            if c in obs and pd.api.types.is_integer_dtype(obs[c])}
    return new_section(
        spatial, slide=slide, mpp=float(mpp), spot_diameter_um=diameter_px * float(mpp),
        name=name or path.name.removesuffix(".zarr"), source="spatialdata", label=path,
        obs_names=list(rows.obs_names),
        counts=None if counts is None else counts[0],
        genes=None if counts is None else list(counts[1]),
        array_row=grid.get("array_row"), array_col=grid.get("array_col"),
        extra={"mpp_source": origin, "counts_source": counts[2] if counts else "none",
               "spatialdata": {"table": table_name, "image": image_name,
                               "shapes": shapes_name, "coordinate_system": system}},
    )


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


# -- writing ---------------------------------------------------------------------------------
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

    The store holds the slide as a multiscale image (level 0 read lazily from the slide, the
    coarser levels computed by SpatialData), the spots as circles of the section's diameter in
    the image's pixels, and the AnnData as the table annotating them (``layers['truth']`` and
    ``layers['uncertainty']`` kept). Both reach the ``global`` coordinate system in µm through a
    ``Scale``, so spatialdata-plot and napari-spatialdata draw them in micrometres.
    """
    from .. import open_slide
    from ..io_utils import anndata_nbytes, check_space
    from .sections import UNS_KEY, section_slide_path

    sd = _spatialdata()
    import dask.array as da
    import pandas as pd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    path = Path(path).expanduser()
    meta = dict(data.uns.get(UNS_KEY) or {})
    if "mpp" not in meta or "spatial" not in data.obsm:
        raise SectionError(f"{path}: the AnnData is neither a section nor a prediction (no "
                           f"uns['{UNS_KEY}'] or obsm['spatial']); predict or import it first")
    if path.exists() and not overwrite:
        raise SectionError(f"{path} already exists; remove it or pass overwrite=True")
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
    """Write into a hidden folder beside ``path``, then rename it there: a crash or Ctrl-C
    leaves any earlier store untouched and no half-written one under the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp.zarr", dir=path.parent))
    old = None
    try:
        tmp.rmdir()  # SpatialData.write wants to create the folder itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zarr's sharding notices
            sdata.write(tmp)
        if should_stop is not None and should_stop():
            raise Cancelled(f"{path}: writing cancelled; nothing was written")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["is_spatialdata_store", "is_zarr_image", "looks_like_spatialdata_store",
           "read_spatialdata", "write_spatialdata", "zarr_image_levels"]
