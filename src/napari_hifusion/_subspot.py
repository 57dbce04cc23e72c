"""The Genes panel's sub-spot view: a model's per-tile estimate of the gene, as an image in µm.

The core computes it (:mod:`hifusion_model.inference.subspot`: HiFusion's level head read on
each of a spot's 7 × 7 HISM tiles) and places it (:func:`~hifusion_model.inference.subspot.
subspot_map`); this module runs that off the GUI thread for each prediction layer, with the
model that made the layer (``metadata['hifusion']['model']``), and shows the result as an image
layer on the slide (µm ``scale`` and ``translate``), right above its spots, in the panel's
colours and contrast limits. Its name says what it is: a model estimate with no ground truth at
that scale.

Reading the tiles runs the model over every spot again (seconds for the 184-spot sample, long
for a whole-slide grid; napari's progress bar has Cancel), so each layer's tiles are kept: for
every gene of the model when they fit in :data:`CACHE_BYTES`, else for the gene shown. A gene
whose tiles are kept is shown at once; the others are computed when asked, the last request
winning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hifusion_model.errors import CheckpointError

from ._jobs import JobContext, JobRunner, notify_error
from ._layers import PREDICTION, gene_columns, kind, meta, put_image
from ._maps import map_layer_data

#: Kind of a sub-spot layer in ``layer.metadata['hifusion']``.
SUBSPOT = "subspot"
#: What the layer shows, in its name.
LABEL = "intra-spot estimate (model, no ground truth at this scale)"
#: Kept tiles per layer at most (all genes of 184 spots × 49 tiles × 250 genes: 9 MB).
CACHE_BYTES = 256 * 2**20
#: Tiles per spot assumed when sizing the cache before the model is loaded (the released 7 × 7).
TILES_PER_SPOT = 49


def model_source(points: Any) -> str:
    """The model that made a prediction layer (``bundled`` or a checkpoint path that exists)."""
    source = meta(points).get("model")
    if not source:
        raise CheckpointError(f"layer {points.name!r} does not say which model made it; "
                              "predict its spots again in the Predict panel")
    if str(source) != "bundled" and not Path(str(source)).is_file():
        raise CheckpointError(f"the model that made {points.name!r} is not found ({source}); "
                              "predict its spots again in the Predict panel")
    return str(source)


def layer_key(points: Any, source: str) -> tuple:
    """What a layer's tiles depend on, cheaply: the model and the spots' positions."""
    data = np.asarray(points.data, dtype=np.float64)
    return source, len(data), float(data.sum()), float((data**2).sum())


def genes_to_read(points: Any, gene: str) -> list[str] | None:
    """Every gene (``None``) when their tiles fit in :data:`CACHE_BYTES`, else only ``gene``."""
    n_genes = max(len(gene_columns(points)), 1)
    fits = len(points.data) * TILES_PER_SPOT * n_genes * 4 <= CACHE_BYTES
    return None if fits else [gene]


def read_layer_tiles(section: Any, source: str, genes: list[str] | None,
                     ctx: JobContext) -> Any:
    """Off the GUI thread: load the model, read its tiles at every spot of ``section``."""
    from hifusion_model.data.sections import section_slide
    from hifusion_model.inference.subspot import subspot_predictions, tile_level
    from hifusion_model.models.checkpoint import load_model

    ctx.progress(0, section.n_obs, "loading model")
    model, _ = load_model(source)
    tile_level(model)  # a spot-only model: a one-line error before the slide is read
    slide = section_slide(section)
    try:
        return subspot_predictions(model, section, slide, genes=genes, progress=ctx.progress,
                                   should_stop=ctx.should_stop)
    finally:
        slide.close()


class SubspotView:
    """The sub-spot layers of the Genes panel, one per prediction layer (see the module)."""

    def __init__(self, viewer: Any, on_dismissed: Callable[[], None] | None = None) -> None:
        self.viewer = viewer
        self.on_dismissed = on_dismissed
        self.jobs = JobRunner("Sub-spot estimate")
        self.tiles: dict[int, tuple[tuple, Any]] = {}  # id(points) -> (key, SubspotPrediction)
        self.wanted: tuple[list[Any], str, tuple[float, float], str] | None = None
        self.placed: set[int] = set()  # id(points) whose layer this view put in the viewer
        viewer.layers.events.removed.connect(self._removed)

    def layers(self) -> list[Any]:
        return [l for l in self.viewer.layers if kind(l) == SUBSPOT]

    def layer_of(self, points: Any) -> Any | None:
        return next((l for l in self.layers() if meta(l).get("source") is points), None)

    @property
    def busy(self) -> bool:
        return self.jobs.running

    def show(self, layers: list[Any], gene: str, limits: tuple[float, float],
             colormap: str) -> None:
        """Show ``gene``'s tiles for each prediction layer among ``layers`` (others: ignored).

        Errors become a notification; the viewer carries on.
        """
        predictions = [l for l in layers if kind(l) == PREDICTION]
        if any(id(p) in self.placed and self.layer_of(p) is None for p in predictions):
            self._dismiss()  # the user deleted a sub-spot layer (or the viewer is closing)
            return
        self.wanted = (predictions, gene, tuple(limits), colormap)
        try:
            self._remove([l for l in self.layers() if meta(l)["source"] not in predictions])
            self._update()
        except Exception as e:  # noqa: BLE001 (a notification, never a crash of the viewer)
            notify_error(e, "Sub-spot estimate")

    def _dismiss(self) -> None:
        """A sub-spot layer removed by hand turns the view off; it is not drawn again."""
        self.clear()
        if self.on_dismissed is not None:
            self.on_dismissed()

    def _update(self) -> None:
        """Place every layer whose tiles are kept; start reading the first one that is not."""
        if self.wanted is None or self.jobs.running:
            return  # a running job calls again when it ends
        layers, gene, limits, colormap = self.wanted
        for points in layers:
            if points not in self.viewer.layers:
                continue
            source = model_source(points)
            key = layer_key(points, source)
            kept = self.tiles.get(id(points))
            if kept is not None and kept[0] == key and gene in kept[1].genes:
                self._put(points, kept[1], gene, limits, colormap)
                continue
            self._start(points, source, key, gene)
            return

    def _start(self, points: Any, source: str, key: tuple, gene: str) -> None:
        from ._layers import section_from_points

        section = section_from_points(points)  # the spots as they are now, read here
        genes = genes_to_read(points, gene)

        def done(result: Any) -> None:
            self.tiles[id(points)] = (key, result)

        def finished() -> None:
            if id(points) in self.tiles and self.tiles[id(points)][0] == key:
                self._after_job()
            else:  # failed or cancelled: do not try again until the user asks
                self.wanted = None

        self.jobs.start(lambda ctx: read_layer_tiles(section, source, genes, ctx), done,
                        on_finished=finished)

    def _after_job(self) -> None:
        try:
            self._update()
        except Exception as e:  # noqa: BLE001 (a notification, never a crash of the viewer)
            notify_error(e, "Sub-spot estimate")

    def _put(self, points: Any, result: Any, gene: str, limits: tuple[float, float],
             colormap: str) -> None:
        from hifusion_model.inference.subspot import subspot_map

        emap = subspot_map(result, gene)
        data, kwargs, _ = map_layer_data(
            emap, name=f"{points.name} {gene} {LABEL}", colormap=colormap, limits=limits,
            offset=tuple(points.translate),
            extra_meta={"kind": SUBSPOT, "source": points, "gene": gene})
        layer = put_image(self.viewer, self.layer_of(points), data, kwargs)
        if layer is None:
            return
        self.placed.add(id(points))
        self.viewer.layers.move(self.viewer.layers.index(layer),
                                self.viewer.layers.index(points) + 1)

    def clear(self) -> None:
        """Remove the sub-spot layers and stop a reading in progress (tiles already read are
        kept for the next time the view is shown)."""
        self.wanted = None
        self.jobs.cancel()
        self._remove(self.layers())
        self.placed.clear()

    def _remove(self, layers: list[Any]) -> None:
        for layer in layers:
            self.placed.discard(id(meta(layer).get("source")))
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def _removed(self, event: Any) -> None:
        gone = event.value
        if kind(gone) == PREDICTION:
            self.tiles.pop(id(gone), None)
            self.placed.discard(id(gone))
            self._remove([l for l in self.layers() if meta(l).get("source") is gone])
