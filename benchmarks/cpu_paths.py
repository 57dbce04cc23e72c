"""Which fp32 inference path to run on a CPU without native bf16: every candidate, measured.

On a CPU with AVX-512 BF16 or AMX, bf16 autocast gives the speed; on an AVX2-only laptop or VM
the model runs fp32, and the question is which way of running it in fp32 is fastest. Each
candidate runs the bundled model (``--model``) on real H&E patches (the packaged HER2ST C4
sample, as ``speed.py`` reads them) in the same run as the yardstick
(``released_port.py``: eager fp32, NCHW, ``no_grad``), repetitions interleaved, medians taken:

* ``eager``: ours as ``predict_section`` runs it in fp32 (channels-last, ``inference_mode``,
  8-spot chunks);
* ``trace_freeze`` / ``trace_ofi``: ``torch.jit.trace`` + ``torch.jit.freeze`` (conv-BN
  folding), and with ``torch.jit.optimize_for_inference`` (oneDNN layouts and fusions);
* ``compile`` / ``compile_freeze``: ``torch.compile`` (inductor, fixed shapes), without and
  with inductor's freezing (weights folded and prepacked for oneDNN);
* ``ort`` / ``ort_batch``: the whole model exported to ONNX and run by ONNX Runtime's CPU
  provider, ``--chunk`` spots or whole batches per call (the shipped path,
  :mod:`hifusion_model.inference.fast_cpu`; needs ``onnxruntime``, ``onnx`` and ``onnxscript``);
* ``eager_bf16``: for scale, bf16 autocast (what a CPU with native bf16 runs);
* ``section_eager`` / ``section_ort``: end to end, ``predict_section`` on the whole packaged
  C4 section (184 spots, patch reading included) in fp32, eager or through ONNX Runtime (its
  export cached as a user's second run finds it); ``section_ort`` is checked against
  ``section_eager`` on all 184 spots.

Fixed-shape paths see every chunk at ``--chunk`` spots (a short last chunk is padded), so
nothing recompiles for the last partial batch. Each path's set-up (trace, compile or export
and the first call) is timed on its own; predictions are checked against the fp32
yardstick (per-gene PCC across spots; metric drift against the measured truth).

``--isa default,avx2`` runs everything once per instruction-set setting, each in its own
process: ``avx2`` sets ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's convolutions as on an AVX2-only
CPU) and ``ATEN_CPU_CAPABILITY=avx2`` (ATen's kernels and inductor's generated code too).
ONNX Runtime has no such switch: under ``avx2`` it still uses whatever the CPU has.

    python benchmarks/cpu_paths.py --model src/hifusion_model/weights/her2st_hifusion.pt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import (
    CL,
    Setup,
    agreement,
    batches_of,
    build_setup,
    counted,
    interleaved,
    median,
    our_inference,
    our_model,
    yardstick_inference,
    yardstick_model,
)

from hifusion_model.data.expression import section_targets
from hifusion_model.data.sections import section_slide
from hifusion_model.evaluation.metrics import evaluate_predictions, gene_pcc
from hifusion_model.inference.fast_cpu import PATH_ENV, OnnxModel
from hifusion_model.inference.predict import predict_section
from hifusion_model.samples import load_sample_section

ISA_ENV = {
    "default": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
PATHS = ("eager", "eager_bf16", "trace_freeze", "trace_ofi", "compile", "compile_freeze", "ort",
         "ort_batch", "section_eager", "section_ort")
Predict = Callable[[Tensor, Tensor], Tensor]  #: (spot, region) chunk → prediction (n, G)


# -- the candidates ---------------------------------------------------------------------------
class PredictionOnly(nn.Module):
    """The model's final prediction alone: what tracers and exporters can return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, spot: Tensor, region: Tensor) -> Tensor:
        return self.model(spot, region).prediction


def in_chunks(predict: Predict, chunk: int) -> Callable[[Tensor, Tensor], np.ndarray]:
    """Run ``predict`` on fixed ``chunk``-spot pieces, the last one padded with blank patches."""
    def run(spot: Tensor, region: Tensor) -> np.ndarray:
        parts = []
        for start in range(0, len(spot), chunk):
            s, r = spot[start:start + chunk], region[start:start + chunk]
            n = len(s)
            if n < chunk:
                s, r = (torch.cat([x, x.new_zeros((chunk - n, *x.shape[1:]))]) for x in (s, r))
            s, r = (x.contiguous(memory_format=CL) for x in (s, r))
            parts.append(predict(s, r)[:n].float().numpy())
        return np.concatenate(parts)
    return run


def build_trace(model: nn.Module, example: tuple[Tensor, Tensor], ofi: bool) -> Predict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python-side shape checks
        frozen = torch.jit.freeze(torch.jit.trace(PredictionOnly(model), example))
    return torch.jit.optimize_for_inference(frozen) if ofi else frozen


def build_compile(model: nn.Module, example: tuple[Tensor, Tensor], *, freezing: bool,
                  mode: str | None = None) -> Predict:
    return torch.compile(PredictionOnly(model), mode=mode, dynamic=False,
                         options={"freezing": freezing})


def build_ort(model: nn.Module, chunk: int) -> Predict:
    """The shipped path (:class:`~hifusion_model.inference.fast_cpu.OnnxModel`)."""
    runner = OnnxModel(model, chunk)
    return lambda spot, region: runner(spot, region).prediction


def build_path(name: str, setup: Setup, chunk: int) -> Callable[[Tensor, Tensor], np.ndarray]:
    model = our_model(setup).eval()
    p = batches_of(setup, "spot", "region")[0]
    example = tuple(x[:chunk].contiguous(memory_format=CL) for x in p)
    builders: dict[str, Callable[[], Predict]] = {
        "trace_freeze": lambda: build_trace(model, example, ofi=False),
        "trace_ofi": lambda: build_trace(model, example, ofi=True),
        "compile": lambda: build_compile(model, example, freezing=False),
        "compile_freeze": lambda: build_compile(model, example, freezing=True),
        "ort": lambda: build_ort(model, chunk),
        "ort_batch": lambda: build_ort(model, setup.batch_size),
    }
    return in_chunks(builders[name](), setup.batch_size if name == "ort_batch" else chunk)


def section_run(setup: Setup, path: str) -> Callable[[], np.ndarray]:
    """``predict_section`` on the packaged C4 sample in fp32, reading included, through ``path``."""
    section = load_sample_section()
    slide = section_slide(section)
    model = our_model(setup)

    def run() -> np.ndarray:
        os.environ[PATH_ENV] = path
        try:
            return predict_section(model, setup.config, section, slide, device="cpu",
                                   precision="fp32", batch_size=setup.batch_size, workers=2)
        finally:
            del os.environ[PATH_ENV]
    return run


def section_agreement(ours: np.ndarray, eager: np.ndarray, setup: Setup) -> dict[str, Any]:
    """ONNX Runtime against eager fp32 on every C4 spot: per-gene PCC and metric drift."""
    pcc = gene_pcc(ours, eager)
    truth = section_targets(load_sample_section(), setup.config.genes, setup.config.normalization)
    kw = {"genes": setup.config.genes, "train_mean": setup.train_mean}
    a, b = evaluate_predictions(ours, truth, **kw), evaluate_predictions(eager, truth, **kw)
    return {"n_spots": len(ours), "gene_pcc_min": float(np.nanmin(pcc)),
            "gene_pcc_median": float(np.nanmedian(pcc)),
            "max_abs_diff": float(np.abs(ours - eager).max()),
            "metric_drift": {k: abs(a[k] - b[k]) for k in ("mse", "mae", "gene_pcc", "spot_pcc")}}


# -- one process: one ISA setting -------------------------------------------------------------
def run_paths(args: argparse.Namespace) -> dict[str, Any]:
    setup = build_setup(argparse.Namespace(
        device="cpu", model=args.model, quick=False, batch_size=args.batch_size,
        batches=args.batches, repeats=args.repeats, workers=0, workdir=args.workdir))
    batches = batches_of(setup, "spot", "region")
    dev = setup.device
    variants: dict[str, Callable[[], np.ndarray]] = {
        "yardstick": yardstick_inference(yardstick_model(setup), batches)}
    setup_s: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name in args.paths:
        if name.startswith("eager"):
            dtype = torch.bfloat16 if name == "eager_bf16" else None
            variants[name] = our_inference(our_model(setup), batches, dev, dtype)
            continue
        start = time.perf_counter()
        try:
            if name.startswith("section"):
                variants[name] = section_run(setup, name.removeprefix("section_")
                                             .replace("ort", "onnx"))
                variants[name]()  # exports and caches: what a user's first run pays
                setup_s[name] = time.perf_counter() - start
                continue
            with torch.no_grad():  # inductor freezes weights only for graphs without grad
                run = build_path(name, setup, args.chunk)
                run(*batches[0])  # compiles / initialises: part of the set-up
        except Exception as e:  # noqa: BLE001 (a path that fails is a result too)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{name} failed: {failed[name]}", file=sys.stderr, flush=True)
            continue
        setup_s[name] = time.perf_counter() - start
        print(f"{name}: set-up {setup_s[name]:.1f} s", file=sys.stderr, flush=True)
        variants[name] = no_grad_batches(run, batches)
    preds: dict[str, np.ndarray] = {}
    runs = {name: counted(predict, preds, name) for name, predict in variants.items()}
    rates = interleaved(runs, setup.repeats, dev)
    spots_per_s = {k: median(v) for k, v in rates.items()}
    result = {
        "isa": args.isa,
        "env": ISA_ENV[args.isa[0]] if args.isa else {},
        "threads": torch.get_num_threads(),
        "n_spots": setup.n_spots,
        "chunk": args.chunk,
        "spots_per_s": spots_per_s,
        "all_spots_per_s": rates,
        "vs_yardstick": {k: v / spots_per_s["yardstick"] for k, v in spots_per_s.items()},
        "best_spots_per_s": {k: max(v) for k, v in rates.items()},
        "setup_s": setup_s,
        "failed": failed,
        "agreement": {k: agreement(v, preds["yardstick"], setup) for k, v in preds.items()
                      if k != "yardstick" and not k.startswith("section")},
    }
    if "section_ort" in preds and "section_eager" in preds:
        result["agreement"]["section_ort"] = section_agreement(
            preds["section_ort"], preds["section_eager"], setup)
    return result


def no_grad_batches(run: Callable[[Tensor, Tensor], np.ndarray],
                    batches: list[tuple[Tensor, ...]]) -> Callable[[], np.ndarray]:
    def predict() -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([run(s, r) for s, r in batches])
    return predict


# -- the driver: one child process per ISA setting --------------------------------------------
def child(args: argparse.Namespace, isa: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hifusion-cpu-paths-") as folder:
        out = Path(folder) / "result.json"
        env = {**os.environ, **ISA_ENV[isa]}
        env["HIFUSION_CACHE_DIR"] = str(Path(folder) / "hifusion")  # exports: not the user's
        if not args.warm_cache:  # a first run's compile time, as a user's first prediction sees
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")
        cmd = [sys.executable, __file__, "--child", "--isa", isa, "--json", str(out),
               "--paths", ",".join(args.paths), "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
               "--chunk", str(args.chunk)]
        if args.model:
            cmd += ["--model", str(args.model)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def print_table(results: list[dict[str, Any]]) -> None:
    print("| ISA | path | spots/s (median) | × yardstick | best × yardstick | set-up s | "
          "gene PCC min | max drift |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        isa = res["isa"][0]
        best = res["best_spots_per_s"]
        for name, rate in res["spots_per_s"].items():
            agree = res["agreement"].get(name, {})
            drift = max(agree.get("metric_drift", {}).values(), default=float("nan"))
            print(f"| {isa} | {name} | {rate:.2f} | {res['vs_yardstick'][name]:.2f} | "
                  f"{best[name] / best['yardstick']:.2f} | {res['setup_s'].get(name, 0):.0f} | "
                  f"{agree.get('gene_pcc_min', float('nan')):.4f} | {drift:.4f} |")
        for name, why in res["failed"].items():
            print(f"| {isa} | {name} | failed: {why} | | | | | |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="MODEL.pt", help="weights (default: a random initialisation)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"among {', '.join(PATHS)}")
    p.add_argument("--isa", default="default,avx2", help="default, avx2 or both")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=2, help="batches per timed repetition")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--chunk", type=int, default=8, help="spots per call of a fixed-shape path")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep inductor's cache between runs (default: a fresh one, cold)")
    p.add_argument("--json", type=Path, metavar="OUT")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    args.isa = [x for x in args.isa.split(",") if x]
    unknown = [x for x in args.paths if x not in PATHS] + [x for x in args.isa if x not in ISA_ENV]
    if unknown:
        p.error(f"unknown path or ISA: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory(prefix="hifusion-cpu-paths-") as folder:
            args.workdir = Path(folder)
            result = run_paths(args)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        return 0
    results = [child(args, isa) for isa in args.isa]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
