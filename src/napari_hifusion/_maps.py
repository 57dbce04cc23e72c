"""Expression maps as napari image layers that lie exactly on the slide (µm scale and origin).

The core builds the map (:mod:`hifusion_model.inference.maps`); this module only places it:
``scale = (µm/px,) * 2`` and ``translate = origin`` in µm, as the slide layer is scaled by its
µm/px, plus the spot layer's own ``translate`` (the Genes panel's side-by-side view moves the
measured spots; their map moves with them). A map layer sits just below its spots, so the spots
stay visible and clickable on top; NaN (off the tissue) is transparent.

:class:`GeneMaps` is what the Genes panel holds: ``show(...)`` makes or updates one map per
expression layer for the shown gene, with the panel's colormap and contrast limits. Building
runs in a napari thread worker (a fraction of a second for a 46,000-spot grid); a result
that arrives after the user picked another gene is dropped. Changing only the colormap or the
limits restyles the existing layer without rebuilding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hifusion_model.errors import SectionError

from ._jobs import notify_error
from ._layers import META, LayerData, meta, put_image, robust_limits

#: Kind of a map layer in ``layer.metadata['hifusion']``.
MAP = "map"
#: A map whose longer side exceeds this (px) is shown as a multiscale pyramid.
MULTISCALE_PX = 2048
#: Opacity of a map over the H&E: the tissue's structure shows through a little.
OPACITY = 0.8


def spot_inputs(points: Any) -> dict[str, Any]:
    """What a map of ``points`` needs, read on the GUI thread: centres in µm, name, slide."""
    info = meta(points)
    mpp = info.get("mpp")
    if not mpp:
        raise SectionError(f"layer {points.name!r} has no µm/px, so its map cannot be placed; "
                           "open the section or prediction file again")
    yx = np.array(points.data, dtype=np.float64)
    if len(yx) == 0:
        raise SectionError(f"layer {points.name!r} has no spots to map")
    return {"xy_um": yx[:, ::-1] * float(mpp), "name": points.name,
            "slide": info.get("slide_path")}


def spot_map(inputs: dict[str, Any], values: np.ndarray, label: str, *,
             um_per_px: float | None = None) -> Any:
    """The core map of ``values`` (one per spot of :func:`spot_inputs`), safe off the GUI thread."""
    from hifusion_model.inference.maps import interpolate_spots

    return interpolate_spots(inputs["xy_um"], np.asarray(values, dtype=np.float64)[:, None],
                             [label], um_per_px=um_per_px, **{k: inputs[k] for k in
                                                               ("name", "slide")})


def map_layer_data(emap: Any, *, name: str, colormap: str, limits: tuple[float, float],
                   offset: tuple[float, float] = (0.0, 0.0), extra_meta: dict | None = None
                   ) -> LayerData:
    """An image layer of ``emap``'s first channel in µm (multiscale when large)."""
    big = max(emap.shape) > MULTISCALE_PX
    data = [level[0] for level in emap.pyramid(MULTISCALE_PX // 4)] if big else emap.data[0]
    kwargs = {
        "name": name,
        "multiscale": big,
        "scale": emap.scale,
        "translate": tuple(o + d for o, d in zip(emap.translate, offset, strict=True)),
        "units": "um",
        "colormap": colormap,
        "contrast_limits": tuple(limits),
        "opacity": OPACITY,
        "metadata": {META: {"kind": MAP, "map": emap, **(extra_meta or {})}},
    }
    return data, kwargs, "image"


def map_file_layers(path: str | Path) -> list[LayerData]:
    """The layers of a map file: one per gene (the first shown), on the µm frame of its slide."""
    from hifusion_model.inference.maps import read_map

    emap = read_map(path)
    levels = emap.pyramid()
    multiscale = len(levels) > 1
    data = levels if multiscale else levels[0]
    genes = emap.genes
    smallest = levels[-1]
    what = "" if emap.layer == "predicted" else f" {emap.layer}"
    return [(data, {
        "channel_axis": 0,
        "name": [f"{emap.name or Path(path).name} {g}{what} map" for g in genes],
        "multiscale": multiscale,
        "scale": emap.scale,
        "translate": emap.translate,
        "units": "um",
        "colormap": ["inferno"] * len(genes),
        "contrast_limits": [robust_limits([smallest[i]]) for i in range(len(genes))],
        "blending": "translucent",
        "opacity": OPACITY,
        "visible": [i == 0 for i in range(len(genes))],
        "metadata": {META: {"kind": MAP, "path": str(path), "genes": genes}},
    }, "image")]


def _fingerprint(points: Any, values: np.ndarray) -> tuple:
    """What a map depends on, cheaply: spot count, positions and values (sums)."""
    data = np.asarray(points.data, dtype=np.float64)
    return (len(data), float(data.sum()), float(np.nansum(values)),
            int(np.isfinite(values).sum()))


class GeneMaps:
    """The map layers shown by the Genes panel, one per expression layer (see the module)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.generation = 0
        self.worker: Any = None
        # adding or removing a map layer makes the panel recolour (the layer list changed);
        # while this object changes the list itself, that call is ignored
        self._changing = False
        viewer.layers.events.removed.connect(self._removed)
        viewer.layers.events.inserted.connect(self._restack)
        viewer.layers.events.moved.connect(self._restack)

    def layers(self) -> list[Any]:
        return [l for l in self.viewer.layers if meta(l).get("kind") == MAP
                and meta(l).get("source") is not None]

    def map_of(self, points: Any) -> Any | None:
        """The map layer made for ``points``, if any."""
        return next((l for l in self.layers() if meta(l)["source"] is points), None)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def show(self, layers: list[Any], gene: str, limits: tuple[float, float], colormap: str,
             uncertainty: dict[str, np.ndarray] | None = None) -> None:
        """Map ``gene`` (or, with ``uncertainty``, those layers' uncertainty) of every layer.

        Maps of other layers are removed; those already showing the same values are restyled.
        Errors become a notification; the viewer and the other maps carry on.
        """
        if self._changing:
            return
        try:
            self._show(layers, gene, limits, colormap, uncertainty)
        except Exception as e:  # noqa: BLE001 (a notification, never a crash of the viewer)
            notify_error(e, "Expression map")

    def _show(self, layers: list[Any], gene: str, limits: tuple[float, float], colormap: str,
              uncertainty: dict[str, np.ndarray] | None) -> None:
        wanted = [l for l in layers if uncertainty is None or l.name in uncertainty]
        label = gene if uncertainty is None else f"{gene} uncertainty"
        self._remove([l for l in self.layers() if meta(l)["source"] not in wanted])
        self.generation += 1  # a map still being built for the previous gene is dropped
        jobs = []
        for points in wanted:
            values = (uncertainty[points.name] if uncertainty is not None
                      else points.features[gene].to_numpy(dtype=np.float64))
            key = (label, _fingerprint(points, values))
            existing = self.map_of(points)
            if existing is not None and meta(existing).get("key") == key:
                existing.colormap = colormap
                existing.contrast_limits = limits
                continue
            jobs.append((points, spot_inputs(points), np.array(values, dtype=np.float64), key))
        if jobs:
            self._build(jobs, label, limits, colormap, self.generation)

    def _build(self, jobs: list, label: str, limits: tuple[float, float], colormap: str,
               generation: int) -> None:
        from napari.qt.threading import create_worker

        def work() -> list:
            return [(points, spot_map(inputs, values, label), key)
                    for points, inputs, values, key in jobs]

        worker = create_worker(work, _start_thread=False)
        worker.returned.connect(
            lambda maps: self._place(maps, label, limits, colormap, generation))
        worker.errored.connect(lambda e: notify_error(e, "Expression map"))
        worker.finished.connect(lambda: self._finished(worker))
        self.worker = worker
        worker.start()

    def _finished(self, worker: Any) -> None:
        if self.worker is worker:
            self.worker = None

    def _place(self, maps: list, label: str, limits: tuple[float, float], colormap: str,
               generation: int) -> None:
        if generation != self.generation:  # the user has moved on to another gene
            return
        self._changing = True
        try:
            for points, emap, key in maps:
                if points in self.viewer.layers:
                    self._put(points, emap, key, label, limits, colormap)
        except Exception as e:  # noqa: BLE001 (a notification, never a crash of the viewer)
            notify_error(e, "Expression map")
        finally:
            self._changing = False

    def _put(self, points: Any, emap: Any, key: tuple, label: str,
             limits: tuple[float, float], colormap: str) -> None:
        data, kwargs, _ = map_layer_data(
            emap, name=f"{points.name} map", colormap=colormap, limits=limits,
            offset=tuple(points.translate),
            extra_meta={"source": points, "gene": label, "key": key})
        layer = put_image(self.viewer, self.map_of(points), data, kwargs)
        if layer is None:
            return
        self.viewer.layers.move(self.viewer.layers.index(layer), self.viewer.layers.index(points))
        points.events.translate.disconnect(self._follow)
        points.events.translate.connect(self._follow)

    def _follow(self, event: Any) -> None:
        """A spots layer moved (side by side): its map moves with it."""
        points = event.source
        layer = self.map_of(points)
        if layer is not None:
            emap = meta(layer)["map"]
            layer.translate = tuple(o + d for o, d in
                                    zip(emap.translate, points.translate, strict=True))

    def clear(self) -> None:
        """Remove every map layer the panel made (and drop a map still being built)."""
        self.generation += 1
        self._remove(self.layers())

    def _remove(self, layers: list[Any]) -> None:
        self._changing = True
        try:
            for layer in layers:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        finally:
            self._changing = False

    def _restack(self, event: Any = None) -> None:
        """Keep each map right below its spots when other layers come between them (the side by
        side slide copy) or the spots are moved; a map the user moves stays where put."""
        if self._changing or meta(getattr(event, "value", None)).get("kind") == MAP:
            return
        self._changing = True
        try:
            for layer in self.layers():
                points = meta(layer)["source"]
                if points in self.viewer.layers:
                    i, j = self.viewer.layers.index(layer), self.viewer.layers.index(points)
                    if i != j - 1:
                        self.viewer.layers.move(i, j)
        finally:
            self._changing = False

    def _removed(self, event: Any) -> None:
        gone = event.value
        if meta(gone).get("kind") != MAP:
            self._remove([l for l in self.layers() if meta(l)["source"] is gone])


def save_layer_map(points: Any, gene: str, path: str | Path) -> Path:
    """Write the map of ``gene`` on ``points`` (its spots as they are now) as an OME-TIFF."""
    from hifusion_model.inference.maps import write_map

    if gene not in points.features:
        raise SectionError(f"layer {points.name!r} holds no {gene!r}; pick another gene")
    emap = spot_map(spot_inputs(points), points.features[gene].to_numpy(dtype=np.float64), gene)
    return write_map(emap, path)
