"""``hifusion evaluate PRED.h5ad …``: score predictions against the measured truth.

Always beside the constant predictor (the model's training mean, stored in every prediction
file): on HER2ST a constant already reaches a per-spot PCC of ~0.45-0.8, so only the per-gene PCC
(across the spots of a section; a constant scores 0) says whether morphology was read.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from ..errors import ConfigError, SectionError
from ..evaluation.metrics import MARKER_GENES, evaluate_predictions, gene_pcc


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Score prediction files (from `hifusion predict` on sections with counts): "
        "MSE, MAE, per-spot PCC, per-gene PCC (per section, then averaged), beside the "
        "constant predictor that always answers the training mean.",
    )
    p.add_argument(
        "predictions", nargs="+", type=Path, metavar="PRED.h5ad|PRED.zarr",
        help="prediction files or stores"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--genes",
        nargs="+",
        default=list(MARKER_GENES),
        metavar="GENE",
        help=f"genes whose PCC is reported (default: {' '.join(MARKER_GENES)})",
    )
    return p


def read_predictions(path: Path, *, need_truth: bool = True) -> ad.AnnData:
    """A prediction file or store (with its truth, unless ``need_truth`` is off), or a clear
    error."""
    if path.suffix == ".zarr" and path.is_dir():
        from ..data.spatialdata_io import read_spatialdata_prediction

        adata = read_spatialdata_prediction(path)
    elif not path.is_file():
        raise SectionError(f"{path}: prediction file not found")
    else:
        try:
            adata = ad.read_h5ad(path)
        except Exception as e:  # h5py/anndata raise many types for a file that is not an .h5ad
            raise SectionError(f"{path}: cannot read as an .h5ad ({type(e).__name__}: {e})") \
                from e
    if "hifusion_model" not in adata.uns:
        raise SectionError(
            f"{path}: not a prediction file (no uns['hifusion_model']); make one with "
            "`hifusion predict`"
        )
    if need_truth and "truth" not in adata.layers:
        raise SectionError(
            f"{path}: has no measured truth (layers['truth']); it was predicted on spots "
            "without counts. Predict on a section imported with its counts to evaluate"
        )
    return adata


def _label(adata: ad.AnnData, path: Path, taken: set[str]) -> str:
    label = str(adata.uns.get("hifusion", {}).get("name") or path.stem)
    return label if label not in taken else f"{label} ({path.name})"


def gather(paths: list[Path]) -> dict[str, Any]:
    """Stack several prediction files of one model: predictions, truth, section labels, baseline."""
    files = [read_predictions(p) for p in paths]
    genes = list(files[0].var_names)
    mean = np.asarray(files[0].uns["hifusion_model"]["train_mean"], dtype=np.float64)
    labels: list[str] = []
    for path, adata in zip(paths, files, strict=True):
        if list(adata.var_names) != genes:
            raise ConfigError(
                f"{path} predicts other genes than {paths[0]}; evaluate them separately"
            )
        other = np.asarray(adata.uns["hifusion_model"]["train_mean"], dtype=np.float64)
        if other.shape != mean.shape or not np.allclose(other, mean):
            raise ConfigError(
                f"{path} comes from another model than {paths[0]}; evaluate them separately"
            )
        labels += [_label(adata, path, set(labels))] * adata.n_obs
    return {
        "pred": np.concatenate([np.asarray(a.X, dtype=np.float64) for a in files]),
        "truth": np.concatenate([np.asarray(a.layers["truth"], dtype=np.float64) for a in files]),
        "sections": np.asarray(labels),
        "genes": genes,
        "train_mean": mean,
        "model": dict(files[0].uns["hifusion_model"]).get("source"),
    }


def evaluate_files(paths: list[Path], marker_genes: Sequence[str] = MARKER_GENES) -> dict[str, Any]:
    """The metrics of :func:`evaluate_predictions`, plus the named genes' PCC per section."""
    data = gather(paths)
    result = evaluate_predictions(
        data["pred"],
        data["truth"],
        sections=data["sections"],
        genes=data["genes"],
        train_mean=data["train_mean"],
        marker_genes=marker_genes,
    )
    for label, section in result["per_section"].items():
        idx = data["sections"] == label
        pcc = gene_pcc(data["pred"][idx], data["truth"][idx])
        section["genes"] = {
            g: float(pcc[data["genes"].index(g)]) for g in marker_genes if g in data["genes"]
        }
    result["files"] = [str(p) for p in paths]
    result["model"] = data["model"]
    result["missing_genes"] = [g for g in marker_genes if g not in data["genes"]]
    return json.loads(json.dumps(result))


def format_table(result: dict[str, Any]) -> str:
    """Model and constant baseline side by side, per section and overall."""
    genes = list(result["genes"])
    head = f"{'':<24}{'MSE':>8}{'MAE':>8}{'spot PCC':>10}{'gene PCC':>10}" + "".join(
        f"{g:>9}" for g in genes
    )

    def row(name: str, m: dict[str, Any], gene_values: dict[str, float] | None) -> str:
        values = "".join(f"{gene_values[g]:>9.3f}" if gene_values else f"{'':>9}" for g in genes)
        scores = f"{m['mse']:>8.4f}{m['mae']:>8.4f}{m['spot_pcc']:>10.3f}{m['gene_pcc']:>10.3f}"
        return f"  {name:<22}{scores}{values}"

    lines = [head]
    blocks = list(result["per_section"].items())
    if len(blocks) > 1:
        blocks.append((f"all {result['n_sections']} sections", result))
    for name, m in blocks:
        lines.append(f"{name} ({m['n_spots']} spots)")
        lines.append(row("model", m, m["genes"]))
        lines.append(row("constant (train mean)", m["baseline"], {g: 0.0 for g in genes}))
        lines.append(f"  {'skill over constant':<22}{m['skill']:>8.3f}")
    lines.append(
        "gene PCC: correlation across the spots of a section, averaged over sections and genes; "
        "spot PCC: across genes within a spot (a constant already scores high)"
    )
    if result["missing_genes"]:
        lines.append(f"not predicted by this model: {', '.join(result['missing_genes'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate_files(args.predictions, args.genes)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
