"""Inference: predict expression for every spot of a section, fast and with bounded memory.

Patches are read by a small thread pool a few batches ahead of the model (tifffile, imagecodecs
and scikit-image release the GIL while decoding and resizing), through a bounded queue, so reading
overlaps compute without ever holding more than ``prefetch`` batches. The model runs under
``torch.inference_mode`` in channels-last layout, with bf16 autocast where the hardware computes
it natively (``precision="fp32"`` turns that off); on the CPU, jobs of 200 spots or more run
its convolutions in int8 through ONNX Runtime (:mod:`.int8_cpu`, :mod:`.fast_cpu`).

When the slide's µm/px differs from the model's, :class:`~hifusion_model.data.dataset.SpotDataset`
reads ``spot_um`` / ``region_um`` of tissue and resamples it to ``spot_px`` / ``region_px``, so
the model always sees tissue at the scale it was trained on.

Test-time augmentation (``tta=n``) averages the predictions over the first ``n`` of the eight
symmetries of the square, applied alike to spot and region: the model was trained on flips and
90° rotations, so each view is an equally valid reading of the same tissue.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ..data.dataset import SpotDataset, as_unit_float
from ..data.expression import section_targets
from ..data.grids import GRID_DEFAULTS, grid_source, spot_grid, tissue_mask
from ..data.sections import UNS_KEY, new_section, section_name, section_slide_path
from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import Cancelled, SectionError
from ..io_utils import atomic_path
from ..models.checkpoint import Checkpoint
from ..models.config import ModelConfig
from ..progress import Progress, ShouldStop
from .fast_cpu import cpu_runner, int8_asked
from .heap import reused_heap
from .views import check_tta, dihedral

#: Spots per model call on the CPU. Whole batches of 32 hold four times the activations
#: (448-px regions through a ResNet) and ran slower: 14.3 vs 17.8 spots/s (BENCHMARKS.md).
CPU_CHUNK = 8
#: Keys of ``uns['hifusion']`` carried from the section into a prediction file.
SECTION_KEYS = ("slide", "mpp", "spot_diameter_um", "name", "source")


def prefetch_batches(
    dataset: Dataset, batch_size: int, *, workers: int = 2, prefetch: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yield collated batches of ``dataset`` in order while threads read the next ones.

    At most ``prefetch`` (default ``2 * workers``) batches are in flight; ``workers=0`` reads in
    the calling thread. Closing the generator early cancels the pending reads.
    """
    n = len(dataset)
    starts = iter(range(0, n, batch_size))

    def load(start: int) -> dict[str, Any]:
        return default_collate([dataset[i] for i in range(start, min(start + batch_size, n))])

    if workers <= 0:
        for start in starts:
            yield load(start)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hifusion-read")
    pending: deque[Future] = deque()
    try:
        for start in starts:
            pending.append(pool.submit(load, start))
            if len(pending) >= (prefetch or 2 * workers):
                break
        while pending:
            batch = pending.popleft().result()
            start = next(starts, None)
            if start is not None:
                pending.append(pool.submit(load, start))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _config_of(ckpt_or_config: Checkpoint | ModelConfig) -> ModelConfig:
    return ckpt_or_config.config if isinstance(ckpt_or_config, Checkpoint) else ckpt_or_config


@torch.inference_mode()
@reused_heap()
def predict_section(
    model: nn.Module,
    ckpt_or_config: Checkpoint | ModelConfig,
    section: ad.AnnData,
    slide: Any,
    *,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: str = "auto",
    workers: int = 2,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    tta: int = 1,
    observe: Callable[[int, dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """Predicted normalised expression ``(n_spots, G)`` float32 for every spot of ``section``.

    ``model`` is moved to ``device`` (``auto``: CUDA, MPS, then CPU) and put in eval mode.
    ``precision``: ``auto`` (on the CPU int8 convolutions for jobs of
    :data:`~.fast_cpu.MIN_SPOTS` spot views or more, else bf16 where native), ``fp32``,
    ``bf16``, ``fp16`` (GPU) or ``int8`` (CPU). ``batch_size`` spots are read together; the
    CPU runs them :data:`CPU_CHUNK` at a time (int8 and fp32 through ONNX Runtime, bf16
    compiled for large jobs: :mod:`.fast_cpu`).
    ``tta``: views averaged per spot (1 to :data:`MAX_TTA`; the time grows in proportion).
    ``observe(first_index, batch)`` sees every batch of uint8 patches as read, so that other
    per-spot measures (the uncertainty's stain features) need no second read of the slide.
    """
    config = _config_of(ckpt_or_config)
    if section.n_obs == 0:
        raise SectionError(f"section {section_name(section)!r} has no spots to predict")
    if batch_size < 1:
        raise SectionError(f"batch size must be at least 1, got {batch_size}")
    check_tta(tta)
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    name = section_name(section)
    announce = None if progress is None else lambda m: progress(0, section.n_obs, f"{name}: {m}")
    runner = cpu_runner(model, dev, dtype, section.n_obs * tta, CPU_CHUNK, announce,
                        int8=int8_asked(precision))
    dataset = SpotDataset(section, slide, config, raw=True)  # uint8 while queued
    out = np.empty((section.n_obs, config.n_genes), np.float32)
    done = 0
    batches = prefetch_batches(dataset, batch_size, workers=workers)
    try:
        for batch in batches:
            if should_stop is not None and should_stop():
                raise Cancelled(
                    f"prediction of {name!r} stopped after {done} spots"
                )
            n = len(batch["spot"])
            if observe is not None:
                observe(done, batch)
            out[done : done + n] = predict_batch(runner, batch, dev, dtype, tta=tta)
            done += n
            if progress is not None:
                progress(
                    done, section.n_obs, f"{name}: {done}/{section.n_obs} spots"
                )
    finally:
        batches.close()
    return out


def predict_batch(model: nn.Module, batch: dict[str, Any], dev: torch.device,
                  dtype: torch.dtype | None, chunk: int | None = None,
                  tta: int = 1) -> np.ndarray:
    """Predictions ``(n, G)`` float32 for a batch of ``spot`` and ``region`` tensors.

    Patches may be uint8 (converted per chunk: a queued batch takes a quarter of the memory).
    The model sees ``chunk`` spots per call (default: :data:`CPU_CHUNK` on the CPU, the whole
    batch elsewhere) in channels-last layout under ``dtype`` autocast, once per test-time view
    (``tta``, averaged); call it in inference mode.
    """
    step = chunk or (CPU_CHUNK if dev.type == "cpu" else len(batch["spot"]))
    parts = []
    for start in range(0, len(batch["spot"]), step):
        spot, region = (
            as_unit_float(batch[k][start : start + step].to(dev, non_blocking=True))
            for k in ("spot", "region")
        )
        total = None
        for k in range(tta):
            views = (dihedral(x, k).contiguous(memory_format=torch.channels_last)
                     for x in (spot, region))
            with autocast(dev, dtype):
                pred = model(*views).prediction.float()
            total = pred if total is None else total + pred
        parts.append((total / tta).cpu().numpy())
    return np.concatenate(parts)


# -- inputs -----------------------------------------------------------------------------------
def check_section_genes(
    section: ad.AnnData, genes: list[str], source: str | os.PathLike | None = None
) -> None:
    """A section with counts must measure every model gene, or its truth cannot be compared."""
    if section.n_vars == 0:
        return
    missing = [g for g in genes if g not in section.var_names]
    if missing:
        raise SectionError(
            f"{source or section_name(section)}: the section measures {section.n_vars} genes but "
            f"lacks {len(missing)} of the model's {len(genes)} (e.g. {', '.join(missing[:3])}); "
            "use a model trained on this gene panel, or predict on its spots without counts"
        )


def grid_section(
    slide: Any,
    *,
    kind: str = "hex",
    pitch_um: float | None = None,
    on_tissue: bool = True,
    name: str | None = None,
) -> ad.AnnData:
    """A count-free section of grid spots on a bare slide (Visium-like hex or legacy-ST square).

    The spot diameter keeps the imitated array's ratio to the pitch (Visium: 55 µm per 100 µm).
    With ``on_tissue`` only spots whose centre lies on the tissue mask are kept.
    """
    mpp = slide.require_mpp()
    if kind not in GRID_DEFAULTS:
        raise SectionError(
            f"unknown grid kind {kind!r}; use hex (Visium-like) or square (legacy ST)"
        )
    default_pitch, default_diameter = GRID_DEFAULTS[kind]
    diameter = default_diameter * (pitch_um or default_pitch) / default_pitch
    mask, downsample = tissue_mask(slide) if on_tissue else (None, 1.0)
    xy, row, col = spot_grid(
        slide.shape,
        mpp,
        kind,
        pitch_um=pitch_um,
        diameter_um=diameter,
        mask=mask,
        mask_downsample=downsample,
        return_indices=True,
    )
    return new_section(
        xy,
        slide=slide.path,
        mpp=mpp,
        spot_diameter_um=diameter,
        name=name or Path(slide.path).stem,
        source=grid_source(kind),
        array_row=row,
        array_col=col,
    )


# -- output file ------------------------------------------------------------------------------
def _h5_safe(value: Any) -> Any:
    """Drop ``None`` (h5ad cannot store it) from nested dicts and lists."""
    if isinstance(value, dict):
        return {str(k): _h5_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_h5_safe(v) for v in value if v is not None]
    return value


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The few card entries worth carrying into every prediction file."""
    validation = card.get("validation") or {}
    data = card.get("data") or []
    summary = {
        "date": card.get("date"),
        "software": card.get("software"),
        # section names (older cards held {"name": ...} records)
        "trained_on": [d.get("name") if isinstance(d, dict) else str(d) for d in data],
        "recipe": (card.get("recipe") or {}).get("name"),
        "epoch": card.get("epoch"),
        "refit": "refit" in card,
        "val_mse": validation.get("mse"),
        "val_gene_pcc": validation.get("gene_pcc"),
        "val_spot_pcc": validation.get("spot_pcc"),
    }
    return _h5_safe(summary)


def model_identity(ckpt: Checkpoint, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """``uns['hifusion_model']``: which model made the predictions and its constant baseline."""
    c = ckpt.config
    return _h5_safe(
        {
            "source": str(source if source is not None else ckpt.path),
            "n_genes": c.n_genes,
            "normalization": c.normalization,
            "spot_um": c.spot_um,
            "region_um": c.region_um,
            "spot_px": c.spot_px,
            "region_px": c.region_px,
            "card": card_summary(ckpt.card),
            "train_mean": [float(v) for v in ckpt.train_mean.tolist()],
        }
    )


def predictions_to_anndata(
    section: ad.AnnData,
    pred: np.ndarray,
    ckpt: Checkpoint,
    *,
    source: str | os.PathLike | None = None,
    tta: int = 1,
    uncertainty: np.ndarray | None = None,
    inference: str = "exact",
) -> ad.AnnData:
    """Predictions as an AnnData: ``X`` = predictions, ``layers['truth']`` = measured (if any),
    ``layers['uncertainty']`` = the per-spot, per-gene uncertainty (if given; see
    :mod:`~hifusion_model.inference.uncertainty`).

    ``uns['hifusion_model']`` says which model made them, with ``tta`` test-time views, and
    on which path (``inference``: ``exact``, one model call per spot, or ``dense``, see
    :mod:`~hifusion_model.inference.dense`).

    The truth is the section's counts normalised exactly as the model's training targets, so
    ``hifusion evaluate`` compares like with like; a section without counts has no truth layer.
    """
    genes = ckpt.config.genes
    pred = np.asarray(pred, dtype=np.float32)
    if pred.shape != (section.n_obs, len(genes)):
        raise SectionError(
            f"predictions have shape {pred.shape}, expected ({section.n_obs}, {len(genes)}) for "
            f"section {section_name(section)!r} and a {len(genes)}-gene model"
        )
    layers = {}
    if uncertainty is not None:
        layers["uncertainty"] = np.asarray(uncertainty, dtype=np.float32).reshape(pred.shape)
    if section.n_vars:
        layers["truth"] = section_targets(section, genes, ckpt.config.normalization)
    obs = pd.DataFrame(index=section.obs_names.copy())
    for col in ("array_row", "array_col"):
        if col in section.obs:
            obs[col] = section.obs[col].to_numpy()
    meta = section.uns[UNS_KEY]
    uns = {
        UNS_KEY: _h5_safe(
            {k: meta.get(k) for k in SECTION_KEYS} | {"slide_abs": str(section_slide_path(section))}
        ),
        "hifusion_model": {**model_identity(ckpt, source), "test_time_views": tta,
                           "inference": inference},
    }
    return ad.AnnData(
        X=pred,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        obsm={"spatial": np.asarray(section.obsm["spatial"], dtype=np.float64)},
        layers=layers,
        uns=uns,
    )


def prediction_spots(pred: ad.AnnData, path: str | os.PathLike) -> ad.AnnData:
    """The count-free section of the spots of a prediction read from ``path``: what the model
    read, where, on which slide (resolved against ``path``'s folder, as the file stores it), so
    other readings of the same spots (the napari layers, sub-spot estimates) need no section."""
    path = Path(path)
    meta = dict(pred.uns.get(UNS_KEY, {}))
    missing = [f"uns['{UNS_KEY}']['{k}']" for k in SECTION_KEYS if k not in meta]
    if "spatial" not in pred.obsm:
        missing.append("obsm['spatial']")
    if missing:
        raise SectionError(
            f"{path}: not a complete prediction file (lacks {', '.join(missing)}); "
            "predict again with `hifusion predict` or the Predict panel"
        )
    slide = Path(str(meta["slide"])).expanduser()
    slide = slide if slide.is_absolute() else (path.parent / slide).resolve()
    obs = pred.obs
    return new_section(
        np.asarray(pred.obsm["spatial"], dtype=np.float64)[:, :2], slide=slide,
        mpp=float(meta["mpp"]), spot_diameter_um=float(meta["spot_diameter_um"]),
        name=str(meta["name"]), source=str(meta["source"]), obs_names=list(pred.obs_names),
        array_row=obs["array_row"].to_numpy() if "array_row" in obs else None,
        array_col=obs["array_col"].to_numpy() if "array_col" in obs else None, label=path,
    )


#: Longest side (px) of the H&E image a prediction file carries for scanpy and squidpy (their
#: ``hires`` convention of Space Ranger, whose hires image is at most 2000 px).
SCANPY_IMAGE_PX = 2000


def scanpy_spatial(meta: dict, slide_path: str | os.PathLike, image_px: int = SCANPY_IMAGE_PX,
                   slide: Any = None) -> tuple[str, dict, np.ndarray | None]:
    """``uns['spatial'][library]`` in the scanpy convention, and the slide's thumbnail.

    ``scalefactors`` say how the image and the spots relate to ``obsm['spatial']`` (full-res
    px): ``tissue_hires_scalef`` maps full-res px to the image, ``spot_diameter_fullres`` sizes
    the spots (the section's true diameter, so circles cover the tissue the model read).
    Without a readable slide (or with ``image_px=0``) there is no image, only the scale factors.
    An open ``slide`` of ``slide_path`` saves opening (for a plain JPEG, decoding) it again.
    """
    from ..data.slide import Slide

    library = str(meta["name"]).replace("/", "_")  # an HDF5 group name
    factors = {"spot_diameter_fullres": float(meta["spot_diameter_um"]) / float(meta["mpp"]),
               "tissue_hires_scalef": 1.0}
    lib: dict[str, Any] = {"scalefactors": factors,
                           "metadata": {"source_image_path": str(slide_path)}}
    image = None
    if image_px > 0:
        try:
            if slide is not None:
                image, _ = slide.thumbnail(image_px)
                factors["tissue_hires_scalef"] = image.shape[1] / slide.shape[1]
            else:
                with Slide.open(slide_path, mpp=float(meta["mpp"])) as opened:
                    image, _ = opened.thumbnail(image_px)
                    factors["tissue_hires_scalef"] = image.shape[1] / opened.shape[1]
        except Exception as e:  # noqa: BLE001 (a moved or unreadable slide: still write)
            warnings.warn(f"{slide_path}: cannot read the slide ({type(e).__name__}: {e}), so the "
                          "prediction file carries no H&E image for scanpy/squidpy", stacklevel=3)
    return library, lib, image


def write_predictions(adata: ad.AnnData, path: str | os.PathLike,
                      image_px: int = SCANPY_IMAGE_PX, slide: Any = None) -> Path:
    """Write atomically; the slide path becomes relative to ``path``'s folder when below it.

    The file also follows the scanpy/squidpy convention (``uns['spatial'][name]``: a ``hires``
    thumbnail of the slide, at most ``image_px`` px, gzip-compressed, and its scale factors),
    so ``squidpy.pl.spatial_scatter(pred, color="ERBB2")`` and ``scanpy.pl.spatial`` draw the
    predictions over the H&E unchanged. A ``uns['spatial']`` already present is kept. Pass
    the open ``slide`` where the caller has it, to spare reading it again.
    """
    path = Path(path)
    out = adata.copy()
    meta = dict(out.uns[UNS_KEY])
    slide_path = Path(meta.pop("slide_abs", meta["slide"])).resolve()
    folder = path.parent.resolve()
    meta["slide"] = (
        slide_path.relative_to(folder).as_posix() if slide_path.is_relative_to(folder)
        else str(slide_path)
    )
    out.uns[UNS_KEY] = meta
    image, library = None, None
    if "spatial" not in out.uns:
        library, lib, image = scanpy_spatial(meta, slide_path, image_px, slide)
        out.uns["spatial"] = {library: {**lib, "images": {}}}
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp)
        if image is not None:  # the one large array that compresses well: written on its own
            import h5py
            from anndata.io import write_elem

            with h5py.File(tmp, "r+") as f:
                write_elem(f[f"uns/spatial/{library}/images"], "hires", image,
                           dataset_kwargs={"compression": "gzip", "compression_opts": 4})
    return path


__all__ = [
    "predict_section",
    "prediction_spots",
    "predictions_to_anndata",
    "write_predictions",
    "prefetch_batches",
    "model_identity",
    "card_summary",
    "check_section_genes",
    "check_tta",
    "dihedral",
    "grid_section",
]
