"""Run a protocol's folds for several models and seeds, resumably, and summarise them.

A *cell* is one model variant trained on one fold's training sections with one seed and scored
once on that fold's test sections. Cells are written to the results file as soon as each one is
done, and a later run with the same settings skips the cells already there: a protocol that takes
hours on a CPU can be run in pieces (``--variants ridge,constant`` first, then the networks) and
on different machines.

The summary answers the question the protocol exists for, *how well does a model do on a
section it never saw*: per variant, the mean over folds of each metric with its spread over
folds (SD of the per-fold values, each the mean over seeds) and its spread over seeds (SD over
seeds of the mean over folds). A difference between two variants smaller than the seed spread is
no difference.

>>> VARIANTS["spot_resnet18"].description
'spot-only ResNet-18, our recipe'
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from ..data.sections import section_slide
from ..devices import cpu_has_native_bf16
from ..engine.recipes import TrainConfig, get_recipe
from ..errors import ConfigError
from ..inference.uncertainty import (
    error_correlation,
    fit_noise_model,
    library_sizes,
    section_stain_features,
)
from ..io_utils import atomic_path
from ..models.config import ModelConfig
from ..models.spot_only import spot_only_config
from .baselines import fit_constant, fit_ridge, section_targets
from .protocols import (
    Fold,
    Plan,
    Predictor,
    fit_network,
    gene_panel,
    score,
)

Log = Callable[[str], None]
FORMAT = "hifusion-benchmark/2"


@dataclass(frozen=True)
class Variant:
    """A model the protocol compares: a network trained by the engine or a closed-form fit."""

    name: str
    description: str
    network: bool


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("hifusion", "HiFusion, our recipe", True),
    Variant("released", "HiFusion, released recipe", True),
    Variant("spot_resnet18", "spot-only ResNet-18, our recipe", True),
    Variant("ridge", "ridge on colour/texture features", False),
    Variant("constant", "constant training mean", False),
)}
#: What the summary reports, in this order: (key, label, digits). ``skill`` is
#: 1 - MSE / MSE(constant training mean); marker genes are read from ``metrics['genes']``.
SUMMARY_METRICS = (
    ("gene_pcc", "gene PCC", 3), ("ERBB2", "ERBB2", 3), ("KRT19", "KRT19", 3),
    ("CD74", "CD74", 3), ("mse", "MSE", 4), ("skill", "skill", 3), ("spot_pcc", "spot PCC", 3),
)


def parse_variants(text: str) -> list[str]:
    """``"hifusion,ridge"`` -> the variant names, checked."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ConfigError(f"unknown variant {', '.join(bad) or '(none)'}; choose from "
                          f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds takes non-negative integers separated by commas, got {text!r}")
    return list(dict.fromkeys(seeds))


def variant_recipe(variant: str, recipe: TrainConfig, seed: int) -> TrainConfig:
    """The recipe a variant trains (or draws its validation split) with: ``recipe`` for all but
    ``released``, which is the released recipe as-is (only genes and precision follow ours)."""
    if variant == "released":
        recipe = get_recipe("released", n_genes=recipe.n_genes, precision=recipe.precision)
    return recipe.replace(seed=seed)


def fit_variant(
    variant: str,
    train_sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    out: Path,
    *,
    recipe: TrainConfig,
    model_config: ModelConfig | None = None,
    device: str = "auto",
    workers: int = 2,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Predictor:
    """Fit one variant; networks are written to ``out`` (the ridge and constant need no file)."""
    template = model_config or ModelConfig(genes=list(genes))
    if VARIANTS[variant].network:
        config = spot_only_config(template) if variant == "spot_resnet18" else template
        return fit_network(train_sections, genes, out, recipe=recipe, model_config=config,
                           device=device, workers=workers, on_epoch=on_epoch)
    if variant == "ridge":
        return fit_ridge(train_sections, genes, template.replace(genes=list(genes)),
                         recipe=recipe)
    return fit_constant(train_sections, genes, normalization=template.normalization,
                        recipe=recipe)


# -- the results file -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where a cell ran: numbers from a CPU with native bf16 and one without are not alike."""
    info: dict[str, Any] = {"platform": platform.platform(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def new_results(plan: Plan, settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, **plan.to_dict(), "settings": settings, "fold_genes": {},
            "runs": []}


def load_results(path: Path | None, plan: Plan, settings: dict[str, Any]) -> dict[str, Any]:
    """The results so far in ``path``, or new ones; refuses a file made with other settings
    (its cells would not be comparable with the new ones)."""
    if path is None or not path.is_file():
        return new_results(plan, settings)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable results file ({e}); give another --json")
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a results file of hifusion benchmark; give another "
                          "--json")
    for key, value in (("protocol", plan.protocol), ("settings", settings),
                       ("folds", plan.to_dict()["folds"])):
        if results.get(key) != value:
            raise ConfigError(
                f"{path} holds runs with another {key} ({json.dumps(results.get(key))[:80]}); "
                "give another --json to start afresh, or the same options to continue it"
            )
    return results


def save_results(path: Path | None, results: dict[str, Any]) -> None:
    """Write ``results`` atomically, keeping the cells another run of the same protocol added
    to the file meanwhile (two machines, or two variants run side by side, share one file)."""
    if path is None:
        return
    try:
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        on_disk = {}
    if on_disk.get("format") == FORMAT and on_disk.get("settings") == results.get("settings"):
        for run in on_disk.get("runs", []):
            mine = _cell(results, run["variant"], run["fold"], run["seed"])
            if mine is None:
                results["runs"].append(run)
            elif run.get("uncertainty") and not mine.get("uncertainty"):
                mine["uncertainty"] = run["uncertainty"]
        for fold, genes in on_disk.get("fold_genes", {}).items():
            results["fold_genes"].setdefault(fold, genes)
    results["summary"] = summarize(results)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def _cell(results: dict[str, Any], variant: str, fold: str, seed: int) -> dict | None:
    return next((r for r in results["runs"]
                 if (r["variant"], r["fold"], r["seed"]) == (variant, fold, seed)), None)


# -- running ----------------------------------------------------------------------------------


def run_cells(
    plan: Plan,
    sections: Mapping[str, ad.AnnData],
    work: str | os.PathLike,
    *,
    variants: Sequence[str],
    seeds: Sequence[int],
    recipe: TrainConfig,
    model_config: ModelConfig | None = None,
    results: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    device: str = "auto",
    workers: int = 2,
    log: Log | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    folds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every (variant, fold, seed) cell not yet in ``results``; ``save`` is called after each.
    ``folds`` limits the run to those folds (a piece of the protocol for one machine).

    Networks go to ``WORK/<protocol>/<fold>/<variant>-seed<k>/model.pt``. Every variant of a
    fold predicts the same genes (:func:`~.protocols.gene_panel`, never the test counts).
    """
    normalization = (model_config or ModelConfig(genes=["-"])).normalization
    results = results or new_results(plan, {})
    stain = StainCache()
    for fold in plan.folds:
        if folds is not None and fold.name not in folds:
            continue
        train_sections = [sections[n] for n in fold.train]
        test = {n: sections[n] for n in fold.test}
        genes = gene_panel(train_sections, list(test.values()), recipe.n_genes)
        results["fold_genes"][fold.name] = genes
        for variant in variants:
            for seed in seeds:
                folder = Path(work) / plan.protocol / slug(fold.name) / f"{variant}-seed{seed}"
                if _cell(results, variant, fold.name, seed) is not None:
                    continue
                results["runs"].append(run_cell(
                    variant, fold, seed, train_sections, test, genes, folder,
                    recipe=variant_recipe(variant, recipe, seed), model_config=model_config,
                    normalization=normalization, stain=stain, device=device,
                    workers=workers, log=log, on_epoch=on_epoch,
                ))
                if save:
                    save(results)
    return results


def run_cell(
    variant: str,
    fold: Fold,
    seed: int,
    train_sections: Sequence[ad.AnnData],
    test: Mapping[str, ad.AnnData],
    genes: Sequence[str],
    folder: Path,
    *,
    recipe: TrainConfig,
    model_config: ModelConfig | None,
    normalization: str,
    stain: StainCache,
    device: str,
    workers: int,
    log: Log | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Fit one variant on one fold with one seed and score it on the fold's test sections."""
    if log:
        log(f"{fold.name} / {variant} / seed {seed}: fitting on {', '.join(fold.train)}")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    predictor = fit_variant(variant, train_sections, genes, folder / "model.pt", recipe=recipe,
                            model_config=model_config, device=device, workers=workers,
                            on_epoch=on_epoch)
    fitted = time.perf_counter()
    preds = {n: predictor.predict(s) for n, s in test.items()}
    metrics = score(preds, test, predictor.genes, predictor.train_mean,
                    normalization=normalization)
    done = time.perf_counter()
    template = (model_config or ModelConfig(genes=["-"])).replace(genes=list(predictor.genes))
    uncertainty = uncertainty_scores(dict(zip(fold.train, train_sections, strict=True)), test,
                                     preds, template, stain)
    if log:
        log(f"{fold.name} / {variant} / seed {seed}: gene PCC {metrics['gene_pcc']:.3f}, MSE "
            f"{metrics['mse']:.4f} (constant {metrics['baseline']['mse']:.4f}), "
            f"{done - start:.0f} s")
    return {
        "variant": variant, "fold": fold.name, "seed": seed, "train": list(fold.train),
        "test": list(fold.test), "description": VARIANTS[variant].description,
        "recipe": recipe.to_dict() if VARIANTS[variant].network else None,
        "info": predictor.info, "metrics": metrics, "uncertainty": uncertainty,
        "machine": machine(), "device": device,
        "seconds": {"fit": fitted - start, "predict": done - fitted},
    }


class StainCache:
    """Stain features of each section's spots at a model's spot scale, computed once a run."""

    def __init__(self) -> None:
        self._features: dict[tuple[str, float, int], np.ndarray] = {}

    def __call__(self, name: str, section: ad.AnnData, config: ModelConfig) -> np.ndarray:
        key = (name, config.spot_um, config.spot_px)
        if key not in self._features:
            slide = section_slide(section)
            try:
                self._features[key] = section_stain_features(section, slide, config)
            finally:
                slide.close()
        return self._features[key]


def uncertainty_scores(
    train_sections: Mapping[str, ad.AnnData],
    test: Mapping[str, ad.AnnData],
    preds: Mapping[str, np.ndarray],
    config: ModelConfig,
    stain: StainCache,
) -> dict[str, Any]:
    """How well :mod:`~.uncertainty` (its noise model fitted on the training sections) ranks
    the absolute error on each test section: Spearman per gene, per spot and pooled."""
    model = fit_noise_model(
        np.concatenate([stain(n, s, config) for n, s in train_sections.items()]),
        np.concatenate([library_sizes(s, config.genes) for s in train_sections.values()]))
    out = {"noise_model": model.to_dict(), "per_section": {}}
    for name, section in test.items():
        truth = section_targets(section, config.genes, config.normalization)
        u = model.uncertainty(preds[name], stain(name, section, config))
        out["per_section"][name] = error_correlation(u, preds[name], truth)
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


# -- the summary ------------------------------------------------------------------------------


def cell_value(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key, metrics["genes"].get(key))
    return None if value is None else float(value)


def _sd(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per variant: each fold's mean over seeds, and per metric the mean over folds, its SD over
    folds and its SD over seeds (of the mean over folds, for the seeds run on every fold)."""
    out: dict[str, Any] = {}
    folds = [f["name"] for f in results["folds"]]
    for variant in dict.fromkeys(r["variant"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["variant"] == variant]
        seeds = sorted({r["seed"] for r in runs})
        complete = [s for s in seeds
                    if {r["fold"] for r in runs if r["seed"] == s} == set(folds)]
        entry: dict[str, Any] = {"description": runs[0]["description"], "seeds": seeds,
                                 "complete_seeds": complete, "folds": {}, "metrics": {},
                                 "fit_seconds": float(sum(r["seconds"]["fit"] for r in runs))}
        for key, _, _ in SUMMARY_METRICS:
            per_fold = {}
            for fold in folds:
                vals = [cell_value(r["metrics"], key) for r in runs if r["fold"] == fold]
                vals = [v for v in vals if v is not None]
                if vals:
                    per_fold[fold] = float(np.mean(vals))
                    entry["folds"].setdefault(fold, {})[key] = per_fold[fold]
            if not per_fold:
                continue
            by_seed = [np.mean([cell_value(r["metrics"], key) for r in runs if r["seed"] == s])
                       for s in complete]
            entry["metrics"][key] = {
                "mean": float(np.mean(list(per_fold.values()))),
                "sd_folds": _sd(list(per_fold.values())),
                "sd_seeds": _sd([float(v) for v in by_seed]),
                "n_folds": len(per_fold),
            }
        entry["uncertainty"] = _uncertainty_by_fold(runs, folds)
        out[variant] = entry
    return out


def _uncertainty_by_fold(runs: Sequence[Mapping[str, Any]], folds: Sequence[str]
                         ) -> dict[str, dict[str, float]]:
    """Per fold, the Spearman of the uncertainty with the error, averaged over seeds/sections."""
    out = {}
    for fold in folds:
        scores = [s for r in runs if r["fold"] == fold and r.get("uncertainty")
                  for s in r["uncertainty"]["per_section"].values()]
        if scores:
            out[fold] = {k: float(np.nanmean([s[k] for s in scores]))
                         for k in ("per_spot", "per_gene")}
    return out


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}".replace("-", "−")


def markdown_summary(results: Mapping[str, Any]) -> str:
    """Two tables: mean ± SD over folds [SD over seeds] per variant, then every fold."""
    summary = results.get("summary") or summarize(results)
    folds = [f["name"] for f in results["folds"]]
    head = ["variant", "seeds", *[label for _, label, _ in SUMMARY_METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in summary.items():
        n = max((m["n_folds"] for m in entry["metrics"].values()), default=0)
        seeds = ",".join(map(str, entry["seeds"])) + (f" ({n} of {len(folds)} folds)"
                                                      if n < len(folds) else "")
        cells = [entry["description"], seeds]
        for key, _, digits in SUMMARY_METRICS:
            m = entry["metrics"].get(key)
            cells.append("–" if m is None else (
                f"{_fmt(m['mean'], digits)} ± {_fmt(m['sd_folds'], digits)}"
                + (f" [{_fmt(m['sd_seeds'], digits)}]" if m["sd_seeds"] is not None else "")))
        lines.append("| " + " | ".join(cells) + " |")
    head = ["variant", "metric", *folds]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in summary.items():
        for key, label, digits in SUMMARY_METRICS[:2] + SUMMARY_METRICS[4:6]:
            cells = [entry["description"], label,
                     *[_fmt(entry["folds"].get(f, {}).get(key), digits) for f in folds]]
            lines.append("| " + " | ".join(cells) + " |")
    rows = [(entry["description"], entry["uncertainty"]) for entry in summary.values()
            if entry.get("uncertainty")]
    if rows:
        head = ["variant", "uncertainty vs error", *folds]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for description, by_fold in rows:
            for key, label in (("per_spot", "Spearman per spot"), ("per_gene", "per gene")):
                cells = [description, label,
                         *[_fmt(by_fold.get(f, {}).get(key), 3) for f in folds]]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "SUMMARY_METRICS",
    "VARIANTS",
    "Variant",
    "fit_variant",
    "load_results",
    "machine",
    "markdown_summary",
    "parse_seeds",
    "parse_variants",
    "run_cells",
    "save_results",
    "summarize",
    "variant_recipe",
]
