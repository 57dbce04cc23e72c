"""int8 convolutions against fp32 on every HER2ST section with an image: fidelity and accuracy.

For each section (B4, C2, C3, C4 in ``../shared/data/her2st``; the activation ranges are
calibrated on the packaged C4 sample's images, so B4, C2 and C3 are images the calibration
never saw), ``predict_section`` runs the bundled model (or ``--model``) on the section's own
spots three ways: fp32 (the reference), int8 with 8-bit weights (CPUs with VNNI) and int8
with 7-bit weights (what an x86 CPU without VNNI gets: :func:`~hifusion_model.inference.
int8_cpu.weight_bits`). Reported per section: per-gene PCC of each int8 variant against fp32
(mean, worst gene, the marker genes), the accuracy of each against the measured truth (mean
per-gene PCC, ERBB2, MSE), and each run's spots/s (after one untimed run that quantises).

    python benchmarks/int8.py --json int8.json      # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hifusion_model.data.importers import import_her2st
from hifusion_model.data.slide import Slide
from hifusion_model.evaluation.metrics import gene_pcc
from hifusion_model.inference import fast_cpu, int8_cpu
from hifusion_model.inference.predict import predict_section
from hifusion_model.models.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense import HER2ST, accuracy  # noqa: E402 (a sibling script)
from dense import agreement as dense_agreement  # noqa: E402

MARKERS = ("ERBB2", "KRT19", "CD74")


def with_weight_bits(bits: int) -> None:
    """Quantise with ``bits``-bit weights whatever this CPU has (a cache entry of their own),
    and forget the sessions held in memory."""
    int8_cpu.weight_bits = fast_cpu.weight_bits = lambda: bits
    fast_cpu._RUNNERS = type(fast_cpu._RUNNERS)()


def agreement(ours: np.ndarray, reference: np.ndarray, genes: list[str]) -> dict[str, float]:
    """:func:`dense.agreement` (mean and worst gene) and the marker genes' PCC."""
    pcc = gene_pcc(ours.astype(np.float64), reference.astype(np.float64))
    return {**dense_agreement(ours, reference), **{g: float(pcc[genes.index(g)]) for g in MARKERS}}


def one_section(name: str, model: Any, ckpt: Any, workers: int) -> dict[str, Any]:
    raw = import_her2st(HER2ST / "images" / f"{name}.jpg", HER2ST / "counts" / f"{name}.tsv.gz",
                        HER2ST / "spots" / f"{name}_selection.tsv")
    genes = list(ckpt.config.genes)
    out: dict[str, Any] = {"n_spots": raw.n_obs}
    preds: dict[str, np.ndarray] = {}
    with Slide.open(HER2ST / "images" / f"{name}.jpg", mpp=float(raw.uns["hifusion"]["mpp"])) \
            as slide:
        for variant, precision, bits in (("fp32", "fp32", 8), ("int8", "int8", 8),
                                         ("int8_7bit", "int8", 7)):
            with_weight_bits(bits)

            def run(precision: str = precision) -> np.ndarray:
                return predict_section(model, ckpt, raw, slide, precision=precision,
                                       workers=workers, device="cpu")

            run()  # quantised (or exported) here, untimed
            start = time.perf_counter()
            preds[variant] = run()
            out.setdefault("spots_per_s", {})[variant] = raw.n_obs / (time.perf_counter() - start)
    out["vs_fp32"] = {v: agreement(preds[v], preds["fp32"], genes) for v in ("int8", "int8_7bit")}
    out["accuracy"] = {v: accuracy(p, raw, ckpt) for v, p in preds.items()}
    return out


def print_table(results: dict[str, Any]) -> None:
    print("section  variant     vs fp32: mean   worst  ERBB2   KRT19   CD74  | truth: gene PCC "
          "ERBB2   MSE    | spots/s")
    for name, r in results["sections"].items():
        for v in ("fp32", "int8", "int8_7bit"):
            a, acc = r["vs_fp32"].get(v), r["accuracy"][v]
            fid = ("            " + " " * 36 if a is None else
                   f"         {a['gene_pcc_mean']:.4f} {a['gene_pcc_min']:.4f} "
                   + " ".join(f"{a[g]:.4f}" for g in MARKERS))
            print(f"{name:8s} {v:11s}{fid} | {acc['gene_pcc']:.4f} {acc['ERBB2']:.4f} "
                  f"{acc['mse']:.4f} | {r['spots_per_s'][v]:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--sections", default="B4,C2,C3,C4")
    p.add_argument("--workers", type=int, default=2, help="patch-reading threads")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if not (HER2ST / "images").is_dir():
        print(f"needs the HER2ST data at {HER2ST}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.model, "cpu")
    results = {"cpu_has_vnni": int8_cpu.cpu_has_vnni(), "sections": {
        name: one_section(name, model, ckpt, args.workers) for name in args.sections.split(",")}}
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
