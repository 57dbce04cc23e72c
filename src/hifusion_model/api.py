"""The few calls a notebook needs: predict a section or a slide, score the prediction.

Each is the one home of a sequence the CLI, the napari panels and the benchmarks all run:
open the slide, place or read the spots, load the model, predict in batches, wrap the numbers
with their provenance, and close the slide again whatever happens.

>>> from hifusion_model import predict, evaluate                  # doctest: +SKIP
>>> pred = predict("C4.h5ad", model="bundled")                    # doctest: +SKIP
>>> evaluate(pred)["gene_pcc"]                                    # doctest: +SKIP
0.358
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from .data.sections import read_section, section_slide
from .data.slide import Slide
from .errors import CheckpointError, ConfigError, SectionError
from .evaluation.metrics import MARKER_GENES, evaluate_predictions, gene_pcc
from .inference.uncertainty import STAIN_FEATURES, NoiseModel, stain_features
from .models.checkpoint import Checkpoint, load_model
from .progress import Progress, ShouldStop

ModelSource = str | os.PathLike | tuple[torch.nn.Module, Checkpoint]


def parse_grid(value: str) -> tuple[str, float | None]:
    """``"hex"``, ``"hex:100"``, ``"square:200"`` -> (kind, pitch in µm or None).

    >>> parse_grid("hex:100")
    ('hex', 100.0)
    """
    kind, _, pitch = value.partition(":")
    if kind not in ("hex", "square"):
        raise ConfigError(f"grid {value!r}: the kind must be hex or square, e.g. hex:100")
    try:
        return kind, float(pitch) if pitch else None
    except ValueError:
        raise ConfigError(f"grid {value!r}: the pitch must be a number of µm, e.g. hex:100") \
            from None


def open_input(
    data: str | os.PathLike | ad.AnnData,
    *,
    grid: str | None = None,
    spots: str | os.PathLike | None = None,
    mpp: float | None = None,
    whole_slide: bool = False,
) -> tuple[ad.AnnData, Slide]:
    """The section to predict and its opened slide (the caller closes it).

    ``data`` is a section (``.h5ad`` path or AnnData; a scanpy/squidpy Visium ``.h5ad`` is
    imported on the fly), or a slide image with spots from ``grid``
    (``"hex:100"``: over the tissue, or the whole slide with ``whole_slide``) or ``spots`` (a
    CSV of centres).
    """
    from .data.importers import import_csv
    from .inference.predict import grid_section

    if isinstance(data, ad.AnnData) or Path(data).suffix in SECTION_SUFFIXES:
        if grid or spots:
            raise ConfigError(f"{_name(data)} is a section: it has its own spots, so give "
                              "no grid or spot file")
        section = data if isinstance(data, ad.AnnData) else read_input_section(data, mpp=mpp)
        return section, section_slide(section, mpp_override=mpp)
    path = Path(data)
    if not path.exists():
        raise SectionError(f"{path} does not exist; give a section .h5ad or a slide image")
    if spots:
        section = import_csv(spots, path, mpp=mpp)
        return section, section_slide(section)
    if not grid:
        raise ConfigError(f"{path} is a slide without spots: give a grid (e.g. hex:100) or a "
                          "spot file")
    kind, pitch = parse_grid(grid)
    slide = Slide.open(path, mpp=mpp)
    try:
        return grid_section(slide, kind=kind, pitch_um=pitch, on_tissue=not whole_slide), slide
    except SectionError as e:
        slide.close()
        if whole_slide:
            raise
        raise SectionError(f"{e} (or cover the whole slide to ignore the tissue mask)") from e
    except BaseException:
        slide.close()
        raise


#: Inputs that carry their own spots: section files, and SpatialData stores (``.zarr``).
SECTION_SUFFIXES = (".h5ad", ".zarr")


def read_input_section(path: str | os.PathLike, mpp: float | None = None, *,
                       table: str | None = None, image: str | None = None,
                       shapes: str | None = None) -> ad.AnnData:
    """A section ``.h5ad`` of this project, a scanpy/squidpy Visium AnnData (``uns['spatial']``
    with images and scale factors), or a SpatialData ``.zarr`` store, the last two imported on
    the fly (``mpp``: µm/px where a store records none; ``table``, ``image``, ``shapes``: the
    store's elements to use where it holds several)."""
    path = Path(path)
    elements = {"table": table, "image": image, "shapes": shapes}
    if path.suffix == ".zarr" and path.is_dir():
        from .data.spatialdata_io import read_spatialdata

        return read_spatialdata(path, mpp=mpp, **elements)
    if any(v is not None for v in elements.values()):
        raise ConfigError(f"{path}: table=, image= and shapes= choose the elements of a "
                          "SpatialData .zarr store, which this input is not")
    if not path.is_file():
        raise SectionError(f"{path} does not exist; give a section .h5ad or a slide image")
    if _is_scanpy_visium(path):
        from .data.importers import import_scanpy_visium

        return import_scanpy_visium(path)
    return read_section(path)


def _is_scanpy_visium(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            uns = f.get("uns")
            return uns is not None and "spatial" in uns and "hifusion" not in uns
    except OSError:
        return False  # not HDF5: read_section says what is wrong


def _name(data: Any) -> str:
    return "the AnnData" if isinstance(data, ad.AnnData) else str(data)


def resolve_model(model: ModelSource, device: str | torch.device = "cpu"
                  ) -> tuple[torch.nn.Module, Checkpoint]:
    """``"bundled"``, a checkpoint path, or an already loaded ``(network, checkpoint)`` pair."""
    if isinstance(model, tuple):
        return model
    return load_model(model, device)


def predict(
    data: str | os.PathLike | ad.AnnData,
    model: ModelSource = "bundled",
    *,
    grid: str | None = None,
    spots: str | os.PathLike | None = None,
    mpp: float | None = None,
    whole_slide: bool = False,
    tta: int = 1,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int = 4,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    source: str | os.PathLike | None = None,
    dense: bool | None = None,
) -> ad.AnnData:
    """Predicted expression of every spot, as an AnnData ready for scanpy and ``evaluate``.

    ``data``: a section (``.h5ad`` path or AnnData; its counts become ``layers['truth']``), or a
    slide with ``grid="hex:100"`` or ``spots="centres.csv"``. ``model``: ``"bundled"``, a
    checkpoint path, or a ``(network, checkpoint)`` pair from :func:`load_model`. ``tta``
    averages up to 8 flipped/rotated views. ``precision``: ``auto`` runs GPUs in bf16 (fp16
    without it) and, on the CPU, jobs of 200 spots or more with int8 convolutions
    (:mod:`~.inference.int8_cpu`: per-gene PCC ≥ 0.993 with fp32 on every gene of four HER2ST
    sections, 2.2× as fast), smaller ones in bf16 where the CPU has it natively, else fp32; ``fp32``,
    ``bf16``, ``fp16`` (GPUs) and ``int8`` (the CPU, any size) force one. ``X`` holds the predictions (normalised as the
    model's targets), ``layers['uncertainty']`` how much to trust each value (the counting
    noise expected at that spot, :mod:`~.uncertainty`; absent for models trained before it
    existed), ``obsm['spatial']`` the spot centres in full-resolution pixels and
    ``uns['hifusion_model']`` the model's card summary (``source`` names the model there;
    default: its path). A NaN or infinite prediction is an error, never a result.

    ``dense``: True predicts on the dense path, where overlapping spots share the spot encoder's
    7×7-tile work (:mod:`~.inference.dense`: per-gene PCC ≥ 0.989 with the exact path on every
    gene of HER2ST C4, 1.1× its spots/s on a CPU in int8 or bf16, 1.05× in fp32); False on the
    exact path, one model call per spot; None (default) takes the dense path for a grid on a
    CPU in int8 or bf16, where it was measured faster, and the exact one otherwise
    (:func:`~.inference.dense.choose_dense`; ``uns['hifusion_model']['inference']`` says which
    ran).

    >>> pred = predict("C4.h5ad")                                  # doctest: +SKIP
    >>> pred[:, "ERBB2"].X.mean()                                  # doctest: +SKIP
    """
    from .devices import resolve_device
    from .inference.dense import choose_dense, predict_dense
    from .inference.fast_cpu import precision_run
    from .inference.predict import check_section_genes, predict_section, predictions_to_anndata

    dev = resolve_device(device)
    network, ckpt = resolve_model(model, dev)
    section, slide = open_input(data, grid=grid, spots=spots, mpp=mpp, whole_slide=whole_slide)
    noise = NoiseModel.from_card(ckpt.card)
    stain = np.zeros((section.n_obs, len(STAIN_FEATURES)))

    def observe(first: int, batch: dict[str, Any]) -> None:  # the dense path goes by bands
        stain[batch["index"].numpy()] = stain_features(batch["spot"].numpy())

    try:
        check_section_genes(section, ckpt.genes, None if isinstance(data, ad.AnnData) else data)
        runs_in = precision_run(dev, precision, section.n_obs * tta)
        shared = choose_dense(dense, section, network, ckpt.config, slide.require_mpp(), tta,
                              device=dev, runs_in=runs_in)
        run = {"batch_size": batch_size, "device": dev, "precision": precision,
               "workers": workers, "progress": progress, "should_stop": should_stop,
               "observe": observe if noise else None}
        values = (predict_dense(network, ckpt.config, section, slide, **run) if shared else
                  predict_section(network, ckpt, section, slide, tta=tta, **run))
    finally:
        slide.close()
    source = source or (model if not isinstance(model, tuple) else ckpt.path)
    check_finite_prediction(values, source)
    return predictions_to_anndata(section, values, ckpt, source=source, tta=tta,
                                  uncertainty=noise.uncertainty(values, stain) if noise else None,
                                  inference="dense" if shared else "exact")


def check_finite_prediction(pred: np.ndarray, model: object) -> None:
    """A NaN or infinite prediction is garbage, never a result: refuse it."""
    bad = ~np.isfinite(np.asarray(pred, dtype=np.float64))
    if bad.any():
        raise CheckpointError(
            f"the model {model} predicted {int(bad.sum())} NaN or infinite value(s) "
            f"({int(bad.any(axis=1).sum())} of {len(bad)} spots); nothing was written: the model "
            "is broken (retrain it, with a lower --lr) or use another one"
        )


def evaluate(
    predictions: ad.AnnData | str | os.PathLike | Sequence[str | os.PathLike],
    marker_genes: Sequence[str] = MARKER_GENES,
) -> dict[str, Any]:
    """MSE, MAE, per-spot and per-gene PCC of predictions against their measured truth, beside
    the model's constant training mean (``skill`` = 1 − MSE / MSE of the constant).

    ``predictions``: what :func:`predict` returned, or prediction files (several files of one
    model are scored per section, then averaged).
    """
    if isinstance(predictions, ad.AnnData):
        return _evaluate_anndata(predictions, marker_genes)
    from .cli.evaluate import evaluate_files

    paths = [predictions] if isinstance(predictions, (str, os.PathLike)) else list(predictions)
    return evaluate_files([Path(p) for p in paths], marker_genes)


def _evaluate_anndata(pred: ad.AnnData, marker_genes: Sequence[str]) -> dict[str, Any]:
    if "truth" not in pred.layers or "hifusion_model" not in pred.uns:
        raise SectionError("these predictions have no measured truth (layers['truth']): predict "
                           "a section that has counts to evaluate")
    genes = list(pred.var_names)
    p, t = (np.asarray(a, dtype=np.float64) for a in (pred.X, pred.layers["truth"]))
    result = evaluate_predictions(p, t, genes=genes, marker_genes=marker_genes,
                                  train_mean=pred.uns["hifusion_model"]["train_mean"])
    pcc = gene_pcc(p, t)
    for section in result["per_section"].values():
        section["genes"] = {g: float(pcc[genes.index(g)]) for g in marker_genes if g in genes}
    result["missing_genes"] = [g for g in marker_genes if g not in genes]
    return result


__all__ = [
    "check_finite_prediction",
    "evaluate",
    "open_input",
    "parse_grid",
    "predict",
    "read_input_section",
    "resolve_model",
]
