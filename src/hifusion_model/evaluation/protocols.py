"""The HiFusion paper's HER2ST protocols, run as far as a folder's images allow.

* **3-D** (per patient): train on the patient's first section, test on its other sections.
* **2-D** (cross-patient): four folds by patient pairs ``{A,E}, {B,F}, {C,G}, {D,H}``; train on
  the six other patients, test on the pair.
* **LOSO** (ours, the project's yardstick): leave each usable section out in turn, train on all
  the others, test once on the one left out. Every section is tested exactly once, and a fold
  whose patient has no other usable section is a test on a new patient.

A protocol needs H&E images, and a HER2ST folder may hold counts for every section but images for
a few (``../shared/data/her2st``: B4, C2, C3, C4 only). :func:`plan_protocol` keeps every fold
that can run with the imaged sections and says, line by line, what it changed or skipped and
why. Unlike the released scripts, which keep the epoch that scores best *on the test fold*,
models are selected on spatial blocks of the training sections (:func:`~.training.train`).

Every model in a fold predicts the same genes (the most expressed of the training sections
among those all test sections measure) with the same normalisation, and is scored per test
section beside the constant training mean (:func:`score`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anndata as ad
import numpy as np
import torch

from ..data.expression import select_top_genes
from ..data.importers import import_her2st
from ..data.sections import read_section, section_slide, write_section
from ..engine.recipes import TrainConfig
from ..engine.train import train
from ..errors import ConfigError, SectionError
from ..future.pseudo_labels import pseudo_label
from ..inference.predict import predict_section, write_predictions
from ..models.checkpoint import Checkpoint, load_model
from ..models.config import ModelConfig
from ..progress import Progress, ShouldStop
from .baselines import section_targets
from .metrics import MARKER_GENES, evaluate_predictions, gene_pcc

Log = Callable[[str], None]

PROTOCOLS = ("loso", "3d", "2d")
#: The paper's 2-D folds: each pair of patients is tested once, the other six train.
PATIENT_PAIRS = (("A", "E"), ("B", "F"), ("C", "G"), ("D", "H"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_SECTION = re.compile(r"^([A-Za-z]+)(\d+)$")


# -- the folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Her2stFiles:
    """The files of one HER2ST section; ``image`` or ``spots`` is None when absent."""

    name: str
    counts: Path
    spots: Path | None
    image: Path | None

    @property
    def patient(self) -> str:
        return _SECTION.match(self.name).group(1)  # type: ignore[union-attr]

    @property
    def number(self) -> int:
        return int(_SECTION.match(self.name).group(2))  # type: ignore[union-attr]

    @property
    def usable(self) -> bool:
        """Counts, spot table and image: what training and testing both need."""
        return self.spots is not None and self.image is not None


def scan_her2st(folder: str | os.PathLike) -> dict[str, Her2stFiles]:
    """Sections of a HER2ST folder (``counts/<S>.tsv.gz``, ``spots/<S>_selection.tsv``,
    ``images/<S>.jpg``), by name in patient then section order."""
    folder = Path(folder).expanduser()
    counts = folder / "counts"
    if not counts.is_dir():
        raise SectionError(
            f"{folder}: not a HER2ST folder (no counts/ inside); give the folder that holds "
            "counts/, spots/ and images/"
        )
    found = {}
    for path in counts.glob("*.tsv*"):
        name = path.name.split(".")[0]
        if not _SECTION.match(name):
            continue
        spots = folder / "spots" / f"{name}_selection.tsv"
        images = [folder / "images" / f"{name}{s}" for s in IMAGE_SUFFIXES]
        found[name] = Her2stFiles(
            name,
            path,
            spots if spots.is_file() else None,
            next((p for p in images if p.is_file()), None),
        )
    if not found:
        raise SectionError(
            f"{counts}: no count tables named like A1.tsv.gz; is this the HER2ST counts folder?"
        )
    return dict(sorted(found.items(), key=lambda kv: (kv[1].patient, kv[1].number)))


# -- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The folds a folder allows, and what was changed or skipped from the paper, and why."""

    protocol: str
    paper: str  #: the paper's protocol in one sentence
    folds: tuple[Fold, ...]
    notes: tuple[str, ...] = ()  #: deviations in the folds that run
    skipped: tuple[str, ...] = ()  #: folds (or patients) that cannot run

    def describe(self) -> str:
        lines = [f"protocol {self.protocol}: {self.paper}"]
        lines += [f"  run   {f.name}: train {', '.join(f.train)} -> test {', '.join(f.test)}"
                  for f in self.folds]
        lines += [f"  note  {n}" for n in self.notes]
        lines += [f"  skip  {s}" for s in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "paper": self.paper,
            "folds": [{"name": f.name, "train": list(f.train), "test": list(f.test)}
                      for f in self.folds],
            "notes": list(self.notes),
            "skipped": list(self.skipped),
        }


def _by_patient(files: Mapping[str, Her2stFiles]) -> dict[str, list[Her2stFiles]]:
    groups: dict[str, list[Her2stFiles]] = {}
    for f in files.values():
        groups.setdefault(f.patient, []).append(f)
    return {p: sorted(g, key=lambda f: f.number) for p, g in sorted(groups.items())}


def _names(files: Iterable[Her2stFiles]) -> list[str]:
    return [f.name for f in files]


def _missing(files: Iterable[Her2stFiles]) -> str:
    """Why sections cannot be used: 'no image' and/or 'no spot table'."""
    parts = []
    for f in files:
        why = [w for w, ok in (("image", f.image), ("spot table", f.spots)) if ok is None]
        parts.append(f"{f.name} (no {' or '.join(why)})")
    return ", ".join(parts)


def plan_3d(files: Mapping[str, Her2stFiles]) -> Plan:
    """Per patient: train on the first usable section, test on the other usable ones."""
    folds, notes, skipped, bare = [], [], [], []
    for patient, group in _by_patient(files).items():
        usable = [f for f in group if f.usable]
        if not usable:
            bare.append(patient)
            continue
        if len(usable) == 1:
            unusable = _missing(f for f in group if not f.usable)
            skipped.append(
                f"patient {patient}: only {usable[0].name} is usable, the protocol needs a "
                f"training and a test section (unusable: {unusable})"
            )
            continue
        folds.append(Fold(f"patient {patient}", (usable[0].name,), tuple(_names(usable[1:]))))
        if usable[0] is not group[0]:
            notes.append(
                f"patient {patient}: the paper trains on {group[0].name}, which is not usable "
                f"here; {usable[0].name} (the first usable section) trains instead"
            )
        left_out = [f for f in group[1:] if not f.usable]
        if left_out:
            notes.append(f"patient {patient}: not tested: {_missing(left_out)}")
    if bare:
        skipped.append(
            f"patient{'s' * (len(bare) > 1)} {', '.join(bare)}: no section has both an image "
            "and a spot table"
        )
    paper = "per patient, train on the first section and test on the patient's other sections"
    return Plan("3d", paper, tuple(folds), tuple(notes), tuple(skipped))


def plan_2d(files: Mapping[str, Her2stFiles]) -> Plan:
    """The four patient-pair folds, each with the usable sections of its patients."""
    groups = _by_patient(files)
    folds, notes, skipped = [], [], []
    for pair in PATIENT_PAIRS:
        name = "fold {" + ",".join(pair) + "}"
        test_all = [f for p in pair for f in groups.get(p, [])]
        train_all = [f for p, g in groups.items() if p not in pair for f in g]
        test = [f for f in test_all if f.usable]
        training = [f for f in train_all if f.usable]
        if not test or not training:
            role, pool = ("test", test_all) if not test else ("training", train_all)
            skipped.append(
                f"{name}: no usable {role} section among the {len(pool)} of "
                f"patients {', '.join(sorted({f.patient for f in pool}) or '-')} "
                "(usable = counts, spot table and image)"
            )
            continue
        folds.append(Fold(name, tuple(_names(training)), tuple(_names(test))))
        notes.append(
            f"{name}: trains on {len(training)} of the {len(train_all)} sections of the other "
            f"patients and tests on {len(test)} of the {len(test_all)} of "
            f"{', '.join(pair)}; the others have no image or spot table here"
        )
    paper = ("4 folds by patient pairs {A,E}, {B,F}, {C,G}, {D,H}: train on the six other "
             "patients, test on the pair")
    return Plan("2d", paper, tuple(folds), tuple(notes), tuple(skipped))


def plan_loso(files: Mapping[str, Her2stFiles]) -> Plan:
    """One fold per usable section: test on it, train on every other usable section."""
    usable = [f for f in files.values() if f.usable]
    unusable = [f for f in files.values() if not f.usable]
    folds, notes, skipped = [], [], []
    if len(usable) < 2:
        skipped.append(f"{len(usable)} usable section(s); leaving one out needs at least two")
    else:
        for left in usable:
            rest = [f for f in usable if f is not left]
            folds.append(Fold(left.name, tuple(_names(rest)), (left.name,)))
            if not any(f.patient == left.patient for f in rest):
                notes.append(f"fold {left.name}: no other section of patient {left.patient} "
                             "trains, so this fold tests on a new patient")
    if unusable:
        notes.append(f"not used ({len(unusable)} sections): {_missing(unusable)}")
    paper = ("leave one section out: each usable section is tested once by a model trained on "
             "all the others (validation from the training sections only)")
    return Plan("loso", paper, tuple(folds), tuple(notes), tuple(skipped))


PLANS = {"loso": plan_loso, "3d": plan_3d, "2d": plan_2d}


def plan_protocol(protocol: str, files: Mapping[str, Her2stFiles]) -> Plan:
    """:func:`plan_loso`, :func:`plan_3d` or :func:`plan_2d`; a ConfigError when no fold can
    run."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    plan = PLANS[protocol](files)
    if not plan.folds:
        raise ConfigError(
            f"the {protocol} protocol cannot run on these sections: "
            + "; ".join(plan.skipped) + ". Add H&E images under images/"
        )
    return plan


# -- sections ---------------------------------------------------------------------------------


def cut_spots(section: ad.AnnData, n: int) -> ad.AnnData:
    """``n`` spots spread evenly through ``section`` (quick checks only; metrics mean little)."""
    if n < 1:
        raise ConfigError(f"--max-spots must be at least 1, got {n}")
    if section.n_obs <= n:
        return section
    keep = np.unique(np.linspace(0, section.n_obs - 1, n).round().astype(int))
    return section[keep].copy()


def _fresh(cache: Path, sources: Iterable[Path]) -> bool:
    return cache.is_file() and all(cache.stat().st_mtime >= p.stat().st_mtime for p in sources)


def import_sections(
    files: Mapping[str, Her2stFiles],
    names: Iterable[str],
    work: str | os.PathLike,
    *,
    max_spots: int | None = None,
    log: Log | None = None,
) -> dict[str, ad.AnnData]:
    """Import ``names`` into ``WORK/sections/<S>.h5ad`` (reused while newer than the sources)."""
    folder = Path(work) / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in dict.fromkeys(names):
        f = files[name]
        if not f.usable:
            raise SectionError(f"section {name} cannot be imported: {_missing([f])}")
        cache = folder / f"{name}.h5ad"
        if _fresh(cache, (f.counts, f.spots, f.image)):  # type: ignore[arg-type]
            section = read_section(cache)
        else:
            if log:
                log(f"importing {name} -> {cache}")
            section = import_her2st(f.image, f.counts, f.spots, name=name)  # type: ignore[arg-type]
            write_section(section, cache)
        out[name] = cut_spots(section, max_spots) if max_spots else section
    return out


def gene_panel(
    train_sections: Sequence[ad.AnnData], test_sections: Sequence[ad.AnnData], n: int = 250
) -> list[str]:
    """The ``n`` most expressed genes of the training sections that every test section measures.

    Only the test sections' gene *names* are consulted, never their counts.
    """
    measured = set.intersection(*(set(s.var_names) for s in test_sections))
    return select_top_genes([s[:, s.var_names.isin(measured)] for s in train_sections], n)


# -- models behind one interface --------------------------------------------------------------


class Predictor(Protocol):
    """A fitted model of one fold: what it predicts and the constant it is compared with."""

    genes: list[str]
    train_mean: np.ndarray
    info: dict[str, Any]

    def predict(self, section: ad.AnnData) -> np.ndarray: ...


@dataclass
class NetworkPredictor:
    """A trained network (HiFusion or the spot-only CNN) loaded from its checkpoint."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    info: dict[str, Any] = field(default_factory=dict)
    tta: int = 1  # test-time views averaged per spot

    @property
    def genes(self) -> list[str]:
        return self.checkpoint.genes

    @property
    def train_mean(self) -> np.ndarray:
        return self.checkpoint.train_mean.numpy().astype(np.float64)

    def predict(self, section: ad.AnnData) -> np.ndarray:
        slide = section_slide(section)
        try:
            return predict_section(
                self.model, self.checkpoint, section, slide, device=self.device,
                precision=self.precision, workers=self.workers, tta=self.tta,
            )
        finally:
            slide.close()


def fit_network(
    train_sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    out: str | os.PathLike,
    *,
    recipe: TrainConfig,
    model_config: ModelConfig | None = None,
    spot_encoder_init: str | os.PathLike | None = None,
    region_encoder_init: str | os.PathLike | None = None,
    device: str = "auto",
    workers: int = 2,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    pseudo_labels: Sequence[str | os.PathLike] | None = None,
) -> NetworkPredictor:
    """Train with :func:`~.training.train` (validation: spatial blocks) and load the best epoch."""
    result = train(
        list(train_sections), out, recipe=recipe, model_config=model_config, genes=list(genes),
        spot_encoder_init=spot_encoder_init, region_encoder_init=region_encoder_init,
        device=device, workers=workers, progress=progress,
        should_stop=should_stop, on_epoch=on_epoch, pseudo_labels=pseudo_labels,
    )
    model, ckpt = load_model(result.checkpoint, device="cpu")
    v = result.validation
    info = {
        "checkpoint": str(result.checkpoint),
        "arch": ckpt.config.arch,
        "recipe": recipe.name,
        "epochs": recipe.epochs,
        "best_epoch": result.best_epoch,
        "validation": {
            "mse": v.get("mse"),
            "gene_pcc": v.get("gene_pcc"),
            "spot_pcc": v.get("spot_pcc"),
            "baseline_mse": (v.get("baseline") or {}).get("mse"),
        },
    }
    return NetworkPredictor(model, ckpt, device, recipe.precision, workers, info)


def fit_student(
    train_sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    out: str | os.PathLike,
    *,
    recipe: TrainConfig,
    teachers: int,
    **options: Any,
) -> NetworkPredictor:
    """Self-training: ``teachers`` runs of ``recipe`` (seeds 0, 1, …) label the gaps between
    the training spots (:mod:`~.pseudo_labels`), then a student learns from the measured and
    the pseudo-labelled spots, without validation (its teachers saw every spot). ``options``
    go to :func:`fit_network` for every run."""
    out = Path(out)
    taught = [fit_network(train_sections, genes, out.parent / f"teacher{k}" / out.name,
                          recipe=recipe.replace(seed=k), **options) for k in range(teachers)]
    labels, counts = [], []
    for i, section in enumerate(train_sections):
        slide = section_slide(section)
        try:
            pseudo = pseudo_label(section, slide, [(t.model, t.checkpoint) for t in taught],
                                  device=options.get("device", "auto"),
                                  precision=recipe.precision)
        finally:
            slide.close()
        labels.append(write_predictions(pseudo, out.parent / "pseudo" / f"{i}.h5ad"))
        counts.append(pseudo.n_obs)
    student = fit_network(train_sections, genes, out, recipe=recipe.replace(val_fraction=0.0),
                          pseudo_labels=labels, **options)
    student.info["teachers"] = [t.info for t in taught]
    student.info["pseudo_spots"] = counts
    return student


# -- scoring ----------------------------------------------------------------------------------


def score(
    predictions: Mapping[str, np.ndarray],
    sections: Mapping[str, ad.AnnData],
    genes: Sequence[str],
    train_mean: np.ndarray,
    *,
    normalization: str = "log_relative",
    marker_genes: Sequence[str] = MARKER_GENES,
) -> dict[str, Any]:
    """:func:`~.metrics.evaluate_predictions` over the test sections (per-gene PCC within each
    section), plus the marker genes' PCC per section; JSON-ready and printable with
    :func:`hifusion_model.cli.evaluate.format_table`."""
    names = list(predictions)
    truth = {n: section_targets(sections[n], genes, normalization) for n in names}
    pred = np.concatenate([predictions[n] for n in names])
    labels = np.concatenate([np.full(len(predictions[n]), n) for n in names])
    result = evaluate_predictions(
        pred, np.concatenate([truth[n] for n in names]), sections=labels, genes=genes,
        train_mean=train_mean, marker_genes=marker_genes,
    )
    index = {g: i for i, g in enumerate(genes)}
    for n in names:
        pcc = gene_pcc(predictions[n], truth[n])
        result["per_section"][n]["genes"] = {
            g: float(pcc[index[g]]) for g in marker_genes if g in index
        }
    result["missing_genes"] = [g for g in marker_genes if g not in index]
    return json.loads(json.dumps(result))


def predict_and_score(
    predictor: Predictor,
    test_sections: Mapping[str, ad.AnnData],
    *,
    normalization: str = "log_relative",
) -> dict[str, Any]:
    """Predict every test section with ``predictor`` and :func:`score` the lot."""
    preds = {n: predictor.predict(s) for n, s in test_sections.items()}
    return score(preds, test_sections, predictor.genes, predictor.train_mean,
                 normalization=normalization)


__all__ = [
    "PATIENT_PAIRS",
    "PROTOCOLS",
    "Fold",
    "Her2stFiles",
    "NetworkPredictor",
    "Plan",
    "Predictor",
    "cut_spots",
    "fit_network",
    "fit_student",
    "gene_panel",
    "import_sections",
    "plan_2d",
    "plan_3d",
    "plan_loso",
    "plan_protocol",
    "predict_and_score",
    "scan_her2st",
    "score",
]
