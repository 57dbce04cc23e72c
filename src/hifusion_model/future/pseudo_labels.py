"""Pseudo-labels: what trained models predict on the tissue between a section's spots.

Spots cover only part of a section's tissue: legacy ST spots (100 µm) sit 200 µm apart, Visium
spots (55 µm) 100 µm apart. The gaps hold tissue of the same slide, patient and stain that no
label covers. Teachers (models trained on the section) predict expression there, and a student
trained on the measured spots plus these pseudo-labelled ones sees more tissue per label
(self-training; with several teachers, distillation of their ensemble). On HER2ST (train on C2,
test on C3 and C4; three teachers) one student scored gene PCC 0.355 / 0.357, against 0.347 /
0.351 for the same seed trained on the measured spots alone (``BENCHMARKS.md``).

A pseudo-label file is a prediction file (``hifusion predict``'s format, so napari shows it):
``X`` holds the teachers' mean normalised prediction, ``uns['hifusion_pseudo']`` says who made
it and between which spots. Training reads ``X`` as the targets of those spots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
from scipy.spatial import cKDTree

from ..data.grids import on_tissue
from ..data.sections import UNS_KEY, new_section, section_mpp, section_name, section_slide_path
from ..errors import SectionError
from ..inference.predict import predict_section, predictions_to_anndata
from ..models.checkpoint import Checkpoint
from ..progress import Progress

#: Key of a pseudo-label file's provenance in ``adata.uns``.
PSEUDO_KEY = "hifusion_pseudo"


def lattice_of(xy: np.ndarray) -> tuple[float, int, float]:
    """The spot array's pitch (px), neighbours per spot (4: square, 6: hex) and angle (rad).

    The pitch is the median distance between neighbours; an interior spot has 4 (legacy ST) or 6
    (Visium) neighbours at about one pitch; the angle is the circular mean of the neighbour
    directions modulo the lattice's symmetry, so a slightly rotated array is followed.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 3:
        raise SectionError(f"need at least 3 spots to find the gaps between them, got {len(xy)}")
    tree = cKDTree(xy)
    nearest = float(np.median(tree.query(xy, k=2)[0][:, 1]))
    if not nearest > 0:
        raise SectionError("spots share positions; their centres must differ")
    pairs = tree.query_pairs(1.25 * nearest, output_type="ndarray")
    d = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    pitch = float(np.median(np.hypot(d[:, 0], d[:, 1])))  # the nearest of a jittered few is short
    counts = np.bincount(pairs.ravel(), minlength=len(xy))
    symmetry = 6 if np.percentile(counts, 90) >= 5.5 else 4
    theta = np.arctan2(d[:, 1], d[:, 0])
    angle = float(np.angle(np.exp(1j * symmetry * theta).mean()) / symmetry)
    return pitch, symmetry, angle


def gap_positions(xy: np.ndarray) -> np.ndarray:
    """Centres ``(n, 2)`` px of the gaps around every spot: the middle of each square of a
    square array, the centroid of each triangle of a hex array, the array's rim included.

    Neighbouring spots propose the same gap; their proposals are averaged, which also follows a
    jittered array. Gaps closer than 0.45 pitch to a spot are dropped (a true gap lies 0.58
    (hex) or 0.71 (square) pitch from its spots).
    """
    xy = np.asarray(xy, dtype=np.float64)
    pitch, symmetry, angle = lattice_of(xy)
    radius = pitch / np.sqrt(3) if symmetry == 6 else pitch / np.sqrt(2)
    turns = angle + np.pi / symmetry + 2 * np.pi * np.arange(symmetry) / symmetry
    offsets = radius * np.column_stack([np.cos(turns), np.sin(turns)])
    proposals = (xy[:, None, :] + offsets[None]).reshape(-1, 2)
    tree = cKDTree(proposals)
    taken = np.zeros(len(proposals), bool)
    gaps = []
    for i in range(len(proposals)):
        if taken[i]:
            continue
        group = [j for j in tree.query_ball_point(proposals[i], 0.25 * pitch) if not taken[j]]
        taken[group] = True
        gaps.append(proposals[group].mean(axis=0))
    gaps = np.asarray(gaps)
    far = cKDTree(xy).query(gaps)[0] > 0.45 * pitch
    return gaps[far]


def gap_section(section: ad.AnnData, slide: Any, margin_um: float) -> ad.AnnData:
    """A count-free section of the gaps between ``section``'s spots that lie on tissue, with
    ``margin_um`` of slide around them (the widest patch a model reads)."""
    gaps = gap_positions(section.obsm["spatial"])
    mpp = section_mpp(section)
    h, w = slide.shape[:2]
    m = margin_um / mpp
    inside = (gaps[:, 0] >= m) & (gaps[:, 1] >= m) & (gaps[:, 0] <= w - m) & (gaps[:, 1] <= h - m)
    gaps = gaps[inside]
    gaps = gaps[on_tissue(gaps, slide)] if len(gaps) else gaps
    name = section_name(section)
    if not len(gaps):
        raise SectionError(f"section {name!r}: no gap between its spots lies on tissue")
    meta = section.uns[UNS_KEY]
    return new_section(gaps, slide=section_slide_path(section), mpp=mpp,
                       spot_diameter_um=meta["spot_diameter_um"], name=f"{name} pseudo",
                       source=f"gaps between the spots of {name}",
                       obs_names=[f"gap_{i:05d}" for i in range(len(gaps))])


def pseudo_label(
    section: ad.AnnData,
    slide: Any,
    teachers: Sequence[tuple[torch.nn.Module, Checkpoint]],
    *,
    sources: Sequence[str | os.PathLike] | None = None,
    progress: Progress | None = None,
    **predict_options: Any,
) -> ad.AnnData:
    """The pseudo-label file of ``section``: its gaps, predicted by the mean of ``teachers``.

    ``sources`` name the teachers (default: their checkpoint paths); ``predict_options`` go to
    :func:`~hifusion_model.inference.predict.predict_section` (device, precision, tta, batch size).
    """
    if not teachers:
        raise SectionError("pseudo-labels need at least one teacher model")
    first = teachers[0][1]
    for _, ckpt in teachers[1:]:
        if ckpt.genes != first.genes or ckpt.config.normalization != first.config.normalization:
            raise SectionError(f"teacher {ckpt.path} predicts other genes or another "
                               f"normalisation than {first.path}; teachers must agree")
    margin = max(max(c.config.spot_um, c.config.region_um) for _, c in teachers) / 2
    gaps = gap_section(section, slide, margin)
    preds = []
    for k, (model, ckpt) in enumerate(teachers):
        step = None if progress is None else (
            lambda done, total, msg, k=k: progress(k * total + done, len(teachers) * total,
                                                   f"teacher {k + 1}/{len(teachers)}, {msg}"))
        preds.append(predict_section(model, ckpt, gaps, slide, progress=step, **predict_options))
    names = [str(s) for s in sources] if sources else [str(c.path) for _, c in teachers]
    out = predictions_to_anndata(gaps, np.mean(preds, axis=0), first, source=" + ".join(names))
    out.uns["hifusion_model"]["train_mean"] = np.mean(
        [c.train_mean.numpy() for _, c in teachers], axis=0).tolist()
    out.uns[PSEUDO_KEY] = {"teachers": names, "between_spots_of": section_name(section),
                           "n_spots_measured": int(section.n_obs)}
    return out


@dataclass
class PseudoLabels:
    """A pseudo-label file read back: its gaps as a count-free section, and their targets."""

    section: ad.AnnData
    targets: np.ndarray  #: ``(n, G)`` normalised expression, in ``genes`` order
    genes: list[str]
    normalization: str
    teachers: list[str]
    path: str | None = None

    def targets_for(self, genes: Sequence[str], normalization: str) -> np.ndarray:
        """The targets of ``genes`` (in that order) for a model with ``normalization``."""
        name = self.path or section_name(self.section)
        if normalization != self.normalization:
            raise SectionError(f"{name}: pseudo-labels are {self.normalization} but the model "
                               f"is trained on {normalization}; make them with such teachers")
        index = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        if missing:
            raise SectionError(f"{name}: pseudo-labels lack {len(missing)} of the model's "
                               f"{len(genes)} genes (e.g. {', '.join(missing[:5])}); train on "
                               "the teachers' genes (--genes with their gene list)")
        return self.targets[:, [index[g] for g in genes]]


def read_pseudo_labels(path: str | os.PathLike) -> PseudoLabels:
    """Read a file written by :func:`pseudo_label` (``hifusion pseudolabel``)."""
    path = Path(path)
    if not path.is_file():
        raise SectionError(f"{path}: pseudo-label file not found; make one with "
                           "`hifusion pseudolabel`")
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for a file that is not an .h5ad
        raise SectionError(f"{path}: cannot read as an .h5ad ({type(e).__name__}: {e})") from e
    if PSEUDO_KEY not in adata.uns or "hifusion_model" not in adata.uns:
        raise SectionError(f"{path}: not a pseudo-label file (no uns[{PSEUDO_KEY!r}]); make one "
                           "with `hifusion pseudolabel`")
    targets = np.asarray(adata.X, dtype=np.float32)
    if not np.isfinite(targets).all():
        raise SectionError(f"{path}: pseudo-labels hold NaN or infinite values")
    meta = dict(adata.uns[UNS_KEY])
    slide = Path(meta["slide"])
    slide = slide if slide.is_absolute() else (path.parent / slide).resolve()
    section = new_section(adata.obsm["spatial"], slide=slide, mpp=meta["mpp"],
                          spot_diameter_um=meta["spot_diameter_um"], name=meta["name"],
                          source=meta["source"], obs_names=adata.obs_names, label=path)
    return PseudoLabels(section, targets, list(adata.var_names),
                        str(adata.uns["hifusion_model"]["normalization"]),
                        [str(t) for t in adata.uns[PSEUDO_KEY]["teachers"]], str(path.resolve()))


__all__ = ["PSEUDO_KEY", "PseudoLabels", "gap_positions", "gap_section", "lattice_of", "pseudo_label",
           "read_pseudo_labels"]
