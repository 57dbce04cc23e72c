"""The dense path against the exact one: fidelity on HER2ST C4 and spots/s on a hex grid.

Fidelity (fp32, the bundled model unless ``--model``):

* **own spots**: C4's 184 spots (200 µm apart, so their patches barely overlap: a check of
  fidelity, not a case for speed) predicted both ways; per-gene PCC of dense against exact
  (mean and worst gene), and the accuracy against the measured truth of each (mean per-gene
  PCC, ERBB2's PCC, MSE) with their differences;
* **shift floor**: the exact path on the same spots moved by half a lattice step (11 µm) in x
  and y, against the exact path: how much an imperceptible move changes the exact predictions,
  to read the dense path's deviation against;
* **grid**: a hex grid (``--grid``, 100 µm) over C4's tissue, both ways; per-gene PCC.

Speed: spots/s of both paths on the grid (its first ``--max-spots`` spots nearest the tissue
centre, a contiguous patch), in each of ``--precisions`` (default fp32, bf16 where the CPU has
it natively, and int8; each against the first's exact path too), repetitions interleaved
(exact, dense, exact, dense …) and medians reported, so that a busy machine slows both alike.
Patches are read as ``predict`` reads them (``--workers`` threads). ``--cpu-path compile``
times the bf16 runs with the network compiled (``HIFUSION_CPU_PATH``; on its own a bf16 job
compiles only from 2,000 spots); int8 and compiled runs follow one untimed run of each path
that quantises or compiles it (its seconds are reported as ``setup_s``). On C4's own spots the
int8 predictions of both paths are compared with the exact fp32 ones and the truth as well.

    python benchmarks/dense.py --json dense.json          # 5-20 min on 2 cores
    python benchmarks/dense.py --max-spots 120 --skip-grid-fidelity   # speed only, shorter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hifusion_model.data.importers import import_her2st
from hifusion_model.data.slide import Slide
from hifusion_model.devices import cpu_has_native_bf16
from hifusion_model.evaluation.metrics import gene_pcc, mse
from hifusion_model.inference.dense import Lattice, predict_dense, sharing
from hifusion_model.inference.fast_cpu import PATH_ENV
from hifusion_model.inference.predict import grid_section, predict_section, predictions_to_anndata
from hifusion_model.models.checkpoint import load_model

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-gene PCC across spots of two predictions of the same spots: mean and worst gene."""
    pcc = gene_pcc(ours.astype(np.float64), reference.astype(np.float64))
    return {"gene_pcc_mean": float(np.nanmean(pcc)), "gene_pcc_min": float(np.nanmin(pcc))}


def accuracy(pred: np.ndarray, section: Any, ckpt: Any) -> dict[str, float]:
    """Mean per-gene PCC, ERBB2's PCC and MSE against the section's measured truth."""
    truth = predictions_to_anndata(section, pred, ckpt).layers["truth"].astype(np.float64)
    pcc = gene_pcc(pred.astype(np.float64), truth)
    genes = list(ckpt.config.genes)
    return {"gene_pcc": float(np.nanmean(pcc)), "ERBB2": float(pcc[genes.index("ERBB2")]),
            "mse": float(mse(pred, truth))}


def timed(predict: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = predict()
    return out, time.perf_counter() - start


def paths(model: Any, ckpt: Any, section: Any, slide: Slide, precision: str,
          workers: int) -> dict[str, Callable[[], np.ndarray]]:
    run = {"precision": precision, "workers": workers, "device": "cpu"}
    return {"exact": lambda: predict_section(model, ckpt, section, slide, **run),
            "dense": lambda: predict_dense(model, ckpt.config, section, slide, **run)}


def own_spots(model: Any, ckpt: Any, args: argparse.Namespace) -> dict[str, Any]:
    raw = import_her2st(HER2ST / "images" / "C4.jpg", HER2ST / "counts" / "C4.tsv.gz",
                        HER2ST / "spots" / "C4_selection.tsv")
    with Slide.open(HER2ST / "images" / "C4.jpg", mpp=float(raw.uns["hifusion"]["mpp"])) as slide:
        runs = paths(model, ckpt, raw, slide, "fp32", args.workers)
        (exact, t_exact), (dense, t_dense) = timed(runs["exact"]), timed(runs["dense"])
        int8 = {name: run() for name, run in
                paths(model, ckpt, raw, slide, "int8", args.workers).items()}
        lattice = Lattice.of(ckpt.config, slide.mpp)
        moved = raw.copy()
        moved.obsm["spatial"] = moved.obsm["spatial"] + lattice.step / 2 / lattice.scale
        shifted = predict_section(model, ckpt, moved, slide, precision="fp32",
                                  workers=args.workers, device="cpu")
    a_exact, a_dense = accuracy(exact, raw, ckpt), accuracy(dense, raw, ckpt)
    a_int8 = {f"{name}_int8": accuracy(pred, raw, ckpt) for name, pred in int8.items()}
    return {
        "n_spots": raw.n_obs, "sharing": sharing(raw, ckpt.config, slide.mpp),
        "dense_vs_exact": agreement(dense, exact),
        "int8_vs_exact_fp32": {name: agreement(pred, exact) for name, pred in int8.items()},
        "shift_floor": {"shift_um": lattice.step_um / 2 * 2**0.5, **agreement(shifted, exact)},
        "accuracy": {"exact": a_exact, "dense": a_dense, **a_int8,
                     "dense_minus_exact": {k: a_dense[k] - a_exact[k] for k in a_exact},
                     "dense_int8_minus_exact": {k: a_int8["dense_int8"][k] - a_exact[k]
                                                for k in a_exact}},
        "seconds": {"exact": t_exact, "dense": t_dense},
    }


def grid_runs(model: Any, ckpt: Any, args: argparse.Namespace) -> dict[str, Any]:
    mpp = float(import_her2st(HER2ST / "images" / "C4.jpg", HER2ST / "counts" / "C4.tsv.gz",
                              HER2ST / "spots" / "C4_selection.tsv").uns["hifusion"]["mpp"])
    kind, _, pitch = args.grid.partition(":")
    with Slide.open(HER2ST / "images" / "C4.jpg", mpp=mpp) as slide:
        grid = grid_section(slide, kind=kind, pitch_um=float(pitch))
        result: dict[str, Any] = {"grid": args.grid, "grid_spots": grid.n_obs,
                                  "sharing": sharing(grid, ckpt.config, mpp)}
        if not args.skip_grid_fidelity:
            runs = paths(model, ckpt, grid, slide, "fp32", args.workers)
            (exact, t_exact), (dense, t_dense) = timed(runs["exact"]), timed(runs["dense"])
            result["fidelity"] = {"dense_vs_exact": agreement(dense, exact),
                                  "spots_per_s": {"exact": grid.n_obs / t_exact,
                                                  "dense": grid.n_obs / t_dense}}
        patch = nearest_centre(grid, args.max_spots)
        result["speed"] = speed(model, ckpt, patch, slide, args)
    return result


def nearest_centre(section: Any, n: int) -> Any:
    """The ``n`` spots nearest the median spot: a contiguous patch of the grid."""
    xy = np.asarray(section.obsm["spatial"])
    keep = np.sort(np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))[:n])
    return section[keep].copy()


def speed(model: Any, ckpt: Any, section: Any, slide: Slide,
          args: argparse.Namespace) -> dict[str, Any]:
    precisions = [p for p in args.precisions.split(",") if p != "bf16" or cpu_has_native_bf16()]
    out: dict[str, Any] = {"n_spots": section.n_obs,
                           "sharing": sharing(section, ckpt.config, slide.mpp)}
    reference = None
    for precision in precisions:
        runs = paths(model, ckpt, section, slide, precision, args.workers)
        rates: dict[str, list[float]] = {k: [] for k in runs}
        last: dict[str, np.ndarray] = {}
        os.environ.pop(PATH_ENV, None)
        if precision == "bf16" and args.cpu_path != "auto":
            os.environ[PATH_ENV] = args.cpu_path
        if precision == "int8" or PATH_ENV in os.environ:  # quantise or compile, untimed
            out[f"{precision}_setup_s"] = {name: timed(run)[1] for name, run in runs.items()}
        for _ in range(args.repeats):
            for name, run in runs.items():
                last[name], seconds = timed(run)
                rates[name].append(section.n_obs / seconds)
        if reference is None:  # the first precision's exact path
            reference = last["exact"]
        median = {k: statistics.median(v) for k, v in rates.items()}
        out[precision] = {"spots_per_s": median, "all_spots_per_s": rates,
                          "dense_over_exact": median["dense"] / median["exact"],
                          "dense_vs_exact_same_precision": agreement(last["dense"], last["exact"]),
                          "dense_vs_exact_fp32": agreement(last["dense"], reference)}
    os.environ.pop(PATH_ENV, None)
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "workers": args.workers, "model": args.model}


def print_table(r: dict[str, Any]) -> None:
    own = r.get("own_spots")
    if own:
        print(f"C4 own spots ({own['n_spots']}, sharing {own['sharing']:.2f}):")
        d, f = own["dense_vs_exact"], own["shift_floor"]
        print(f"  dense vs exact gene PCC  mean {d['gene_pcc_mean']:.4f}  min {d['gene_pcc_min']:.4f}")
        for name, d in own["int8_vs_exact_fp32"].items():
            print(f"  {name} int8 vs exact fp32  mean {d['gene_pcc_mean']:.4f}  "
                  f"min {d['gene_pcc_min']:.4f}")
        print(f"  exact moved {f['shift_um']:.1f} µm vs exact  mean {f['gene_pcc_mean']:.4f}  "
              f"min {f['gene_pcc_min']:.4f}")
        for name, a in own["accuracy"].items():
            print(f"  {name:>18}: gene PCC {a['gene_pcc']:+.4f}  ERBB2 {a['ERBB2']:+.4f}  "
                  f"MSE {a['mse']:+.4f}")
    grid = r.get("grid")
    if grid:
        print(f"{grid['grid']} grid over C4 ({grid['grid_spots']} spots, "
              f"sharing {grid['sharing']:.2f}):")
        if "fidelity" in grid:
            d, s = grid["fidelity"]["dense_vs_exact"], grid["fidelity"]["spots_per_s"]
            print(f"  dense vs exact gene PCC  mean {d['gene_pcc_mean']:.4f}  "
                  f"min {d['gene_pcc_min']:.4f}  (fp32 spots/s exact {s['exact']:.2f}, "
                  f"dense {s['dense']:.2f})")
        sp = grid["speed"]
        for precision in ("fp32", "bf16", "int8"):
            if precision in sp:
                p = sp[precision]
                print(f"  {precision} on {sp['n_spots']} spots: exact "
                      f"{p['spots_per_s']['exact']:.2f}, dense {p['spots_per_s']['dense']:.2f} "
                      f"spots/s: {p['dense_over_exact']:.2f}×; dense vs exact PCC "
                      f"{p['dense_vs_exact_same_precision']['gene_pcc_mean']:.4f}; dense vs "
                      f"exact fp32 {p['dense_vs_exact_fp32']['gene_pcc_mean']:.4f} / "
                      f"{p['dense_vs_exact_fp32']['gene_pcc_min']:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--grid", default="hex:100", help="KIND:PITCH_UM of the grid (default hex:100)")
    p.add_argument("--max-spots", type=int, default=300, help="grid spots timed (default 300)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per path and precision")
    p.add_argument("--workers", type=int, default=2, help="patch-reading threads")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip-own-spots", action="store_true")
    p.add_argument("--skip-grid-fidelity", action="store_true")
    p.add_argument("--cpu-path", choices=["auto", "eager", "compile"], default="auto",
                   help="HIFUSION_CPU_PATH for the bf16 runs (default auto)")
    p.add_argument("--precisions", default="fp32,bf16,int8",
                   help="precisions timed, the first the reference (default fp32,bf16,int8; "
                   "bf16 only where the CPU has it natively)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (HER2ST / "images" / "C4.jpg").is_file():
        print(f"needs the HER2ST data at {HER2ST}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.model, "cpu")
    results: dict[str, Any] = {"environment": environment(args)}
    if not args.skip_own_spots:
        results["own_spots"] = own_spots(model, ckpt, args)
    results["grid"] = grid_runs(model, ckpt, args)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
