"""Speed and memory benchmark: our HiFusion against an eager port of the released structure.

Sections (``--sections 1,2,3,4,5``, all by default):

1. model-only inference, spots/s at ``--batch-size``: yardstick (fp32, NCHW, ``no_grad``) vs ours
   (as :func:`~hifusion_model.inference.predict.predict_section` runs it: channels-last,
   ``inference_mode``, bf16 autocast where native, 8-spot chunks on the CPU), plus ours in fp32
   and ours on whole batches (where the gain and the chunking's cost come from); ours'
   predictions checked against the fp32 yardstick's (per-gene PCC, metrics);
2. training spots/s, one optimiser step per batch, yardstick vs ours (as the trainer steps:
   fp32 on the CPU by default), and ours with ``--bf16`` where the CPU has native bf16;
3. end to end on a real section (patch reading + model, through ``predict_section`` and through
   the ``hifusion predict`` command) against model-only time on the same spots;
4. peak resident memory of a ``hifusion predict`` process on a generated 50,000 × 50,000 px
   pyramidal OME-TIFF with a dense hex grid;
5. napari: time to recolour a 50,000-spot layer on a gene switch (needs a display:
   ``xvfb-run -a python benchmarks/speed.py --sections 5``).

Repetitions are interleaved (yardstick, ours, yardstick, ours …) and medians reported, so that
a noisy machine slows both alike; every ratio compares numbers measured in the same run.
Patches are real H&E (the packaged HER2ST C4 sample) so that the precision check means something.
``--quick`` shrinks everything (tiny model, few batches, small slide) for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch  # before any QApplication exists (section 5)
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from released_port import ReleasedHiFusion

from hifusion_model.cli._options import reading_threads
from hifusion_model.data.dataset import SpotDataset
from hifusion_model.data.expression import section_targets, select_top_genes
from hifusion_model.data.sections import new_section, section_slide, write_section
from hifusion_model.devices import autocast, autocast_dtype, cpu_has_native_bf16, resolve_device
from hifusion_model.engine.optim import build_optimizer
from hifusion_model.engine.recipes import get_recipe
from hifusion_model.evaluation.metrics import evaluate_predictions, gene_pcc
from hifusion_model.inference.fast_cpu import (
    PATH_ENV,
    CompiledModel,
    OnnxModel,
    choose_path,
    export_path,
)
from hifusion_model.inference.predict import (
    CPU_CHUNK,
    predict_batch,
    predict_section,
    prefetch_batches,
)
from hifusion_model.models.checkpoint import load_checkpoint, save_checkpoint
from hifusion_model.models.config import ModelConfig, tiny_config
from hifusion_model.models.hifusion import HiFusion
from hifusion_model.models.losses import hifusion_loss
from hifusion_model.samples import load_sample_section

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
CL = torch.channels_last
Batches = list[tuple[Tensor, ...]]  #: batches of tensors already on the device


# -- settings -------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What every section shares: device, model weights, sizes and the real patches."""

    device: torch.device
    config: ModelConfig
    state_dict: dict[str, Tensor]
    train_mean: np.ndarray
    trained: bool  #: weights from --model (else random: PCC checks are then only numerical)
    batch_size: int
    batches: int
    repeats: int
    workers: int
    quick: bool
    workdir: Path
    args: argparse.Namespace
    patches: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return self.batch_size * self.batches


def build_setup(args: argparse.Namespace) -> Setup:
    """Weights from ``--model`` or a random initialisation on the sample's most expressed genes."""
    device = resolve_device(args.device)
    sample = load_sample_section()
    if args.model:
        ckpt = load_checkpoint(args.model)
        config, state, mean = ckpt.config, ckpt.state_dict, ckpt.train_mean.numpy()
    else:
        genes = select_top_genes([sample], 250)
        config = tiny_config(genes) if args.quick else ModelConfig(genes=genes)
        torch.manual_seed(0)
        state = HiFusion(config).state_dict()
        mean = section_targets(sample, genes, config.normalization).mean(axis=0)
    return Setup(device, config, state, np.asarray(mean, np.float32), bool(args.model),
                 args.batch_size, args.batches, args.repeats, args.workers, args.quick,
                 Path(args.workdir), args)


def real_patches(setup: Setup) -> dict[str, Tensor]:
    """``n_spots`` spot/region patches (+ targets when the sample measures the genes), cycled."""
    if setup.patches:
        return setup.patches
    section = load_sample_section()
    genes = setup.config.genes if all(g in section.var_names for g in setup.config.genes) else None
    dataset = SpotDataset(section, section_slide(section), setup.config, genes)
    items = [dataset[i % len(dataset)] for i in range(setup.n_spots)]
    setup.patches = {k: torch.stack([it[k] for it in items]) for k in ("spot", "region")}
    if genes is not None:
        setup.patches["target"] = torch.stack([it["target"] for it in items])
    return setup.patches


# -- models ---------------------------------------------------------------------------------------
def yardstick_model(setup: Setup) -> ReleasedHiFusion:
    model = ReleasedHiFusion(setup.config)
    model.load_state_dict(setup.state_dict)
    return model.to(setup.device)


def our_model(setup: Setup) -> HiFusion:
    model = HiFusion(setup.config)
    model.load_state_dict(setup.state_dict)
    return model.to(setup.device, memory_format=CL)


def batches_of(setup: Setup, *keys: str) -> Batches:
    """The real patches cut into batches, already on the device (model-only timing)."""
    p = real_patches(setup)
    b = setup.batch_size
    return [tuple(p[k][i:i + b].to(setup.device) for k in keys) for i in range(0, setup.n_spots, b)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ---------------------------------------------------------------------------------------
def interleaved(runs: dict[str, Callable[[], int]], repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Items/s of every run, repetitions interleaved across runs; each run warmed up once."""
    for run in runs.values():
        run()
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            n = run()
            sync(device)
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def yardstick_inference(model: nn.Module, batches: Batches) -> Callable[[], np.ndarray]:
    """fp32, NCHW, ``no_grad``: how the released code predicts."""
    model.eval()

    def run() -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(s, r).prediction for s, r in batches]).cpu().numpy()
    return run


def our_inference(model: nn.Module, batches: Batches, device: torch.device,
                  dtype: torch.dtype | None, chunk: int | None = None,
                  path: str = "eager") -> Callable[[], np.ndarray]:
    """The model path of ``predict_section`` (:func:`predict_batch`), ``chunk`` spots per call;
    ``path`` ``compile`` (through TorchInductor, as large bf16 jobs run) or ``int8`` (int8
    convolutions through ONNX Runtime, as large CPU jobs run by default): set up here (compiled
    or quantised and cached, untimed)."""
    model = model.to(memory_format=CL).eval()
    runner = {"eager": lambda: model,
              "compile": lambda: CompiledModel(model, CPU_CHUNK, dtype),
              "int8": lambda: OnnxModel(model, CPU_CHUNK, export_path(model, CPU_CHUNK, True),
                                        int8=True)}[path]()

    def run() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([
                predict_batch(runner, {"spot": s, "region": r}, device, dtype, chunk)
                for s, r in batches])
    return run


def compiles(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Large bf16 jobs here run compiled (a CPU with native bf16 and a C++ compiler)."""
    return choose_path(device, dtype, 10**9) == "compile"


def counted(predict: Callable[[], np.ndarray], sink: dict[str, np.ndarray],
            name: str) -> Callable[[], int]:
    """A timing run that keeps its last predictions in ``sink[name]`` and returns the spot count."""
    def run() -> int:
        sink[name] = predict()
        return len(sink[name])
    return run


# -- 1. model-only inference ----------------------------------------------------------------------
def bench_inference(setup: Setup) -> dict[str, Any]:
    dev = setup.device
    dtype = autocast_dtype(dev, "auto")
    batches = batches_of(setup, "spot", "region")
    preds: dict[str, np.ndarray] = {}
    variants = {
        "yardstick": yardstick_inference(yardstick_model(setup), batches),
        "ours": our_inference(our_model(setup), batches, dev, dtype),
    }
    if dtype is not None:
        variants["ours_fp32"] = our_inference(our_model(setup), batches, dev, None)
    if dev.type == "cpu":  # is the CPU chunking free? the same model on whole batches
        variants["ours_whole_batch"] = our_inference(our_model(setup), batches, dev, dtype,
                                                     chunk=setup.batch_size)
    if compiles(dev, dtype):
        variants["ours_compiled"] = our_inference(our_model(setup), batches, dev, dtype,
                                                  path="compile")
    if dev.type == "cpu":  # large CPU jobs: the convolutions in int8
        variants["ours_int8"] = our_inference(our_model(setup), batches, dev, None, path="int8")
    runs = {name: counted(predict, preds, name) for name, predict in variants.items()}
    rates = interleaved(runs, setup.repeats, dev)
    result: dict[str, Any] = {
        "precision": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "spots_per_s": {k: median(v) for k, v in rates.items()},
        "all_spots_per_s": rates,
        "n_spots": setup.n_spots,
        "agreement": agreement(preds["ours"], preds["yardstick"], setup),
    }
    speed = result["spots_per_s"]
    result["speedup"] = speed["ours"] / speed["yardstick"]
    for path in ("compiled", "int8"):
        if f"ours_{path}" in preds:
            result[f"agreement_{path}"] = agreement(preds[f"ours_{path}"], preds["yardstick"],
                                                    setup)
            result[f"speedup_{path}"] = speed[f"ours_{path}"] / speed["yardstick"]
    return result


def agreement(ours: np.ndarray, reference: np.ndarray, setup: Setup) -> dict[str, Any]:
    """Ours against the fp32 yardstick: per-gene PCC across spots, and metric drift vs truth."""
    pcc = gene_pcc(ours, reference)
    out: dict[str, Any] = {
        "gene_pcc_min": float(np.nanmin(pcc)),
        "gene_pcc_median": float(np.nanmedian(pcc)),
        "constant_genes": int(np.isnan(pcc).sum()),
        "max_abs_diff": float(np.abs(ours - reference).max()),
        "trained_weights": setup.trained,
    }
    truth = real_patches(setup).get("target")
    if truth is not None:
        kw = {"genes": setup.config.genes, "train_mean": setup.train_mean}
        a = evaluate_predictions(ours, truth.numpy(), **kw)
        b = evaluate_predictions(reference, truth.numpy(), **kw)
        out["metric_drift"] = {k: abs(a[k] - b[k]) for k in ("mse", "mae", "gene_pcc", "spot_pcc")}
    return out


# -- 2. training ----------------------------------------------------------------------------------
def training_step(model: nn.Module, config: ModelConfig, optimizer: torch.optim.Optimizer,
                  dtype: torch.dtype | None, device: torch.device, channels_last: bool) -> Callable:
    """One optimiser step as the trainer takes it (the yardstick: fp32 NCHW, no autocast)."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def step(spot: Tensor, region: Tensor, target: Tensor) -> None:
        if channels_last:
            spot, region = spot.contiguous(memory_format=CL), region.contiguous(memory_format=CL)
        with autocast(device, dtype):
            output = model(spot, region)
        loss = hifusion_loss(output, target, config).total
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_training(setup: Setup) -> dict[str, Any]:
    dev, recipe = setup.device, get_recipe()
    dtype = autocast_dtype(dev, recipe.precision, training=True)
    p = real_patches(setup)
    if "target" not in p:
        g = torch.Generator().manual_seed(0)
        p["target"] = torch.randn(setup.n_spots, setup.config.n_genes, generator=g)
    batches = batches_of(setup, "spot", "region", "target")[: setup.args.train_batches]
    n_spots = sum(len(b[0]) for b in batches)
    models = {"yardstick": yardstick_model(setup).train(), "ours": our_model(setup).train()}
    steps = {
        "yardstick": training_step(models["yardstick"], setup.config,
                                   build_optimizer(models["yardstick"], recipe), None, dev, False),
        "ours": training_step(models["ours"], setup.config,
                              build_optimizer(models["ours"], recipe), dtype, dev, True),
    }
    if dtype is None and dev.type == "cpu" and cpu_has_native_bf16():  # `hifusion train --bf16`
        models["ours_bf16"] = our_model(setup).train()
        steps["ours_bf16"] = training_step(models["ours_bf16"], setup.config,
                                           build_optimizer(models["ours_bf16"], recipe),
                                           torch.bfloat16, dev, True)

    def epoch(step: Callable) -> Callable[[], int]:
        def run() -> int:
            for batch in batches:
                step(*batch)
            return n_spots
        return run

    rates = interleaved({k: epoch(s) for k, s in steps.items()}, setup.repeats, dev)
    result = {
        "precision": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "optimizer": recipe.optimizer,
        "spots_per_s": {k: median(v) for k, v in rates.items()},
        "all_spots_per_s": rates,
    }
    result["speedup"] = result["spots_per_s"]["ours"] / result["spots_per_s"]["yardstick"]
    if "ours_bf16" in rates:
        result["speedup_bf16"] = (result["spots_per_s"]["ours_bf16"]
                                  / result["spots_per_s"]["yardstick"])
    return result


# -- 3. end to end --------------------------------------------------------------------------------
def real_section(setup: Setup) -> tuple[Any, str]:
    """HER2ST C4 as OME-TIFF where the real data is (not with --quick), else the sample."""
    if setup.quick or not (HER2ST / "images" / "C4.jpg").is_file():
        return load_sample_section(), "packaged sample (HER2ST C4 crop)"
    from hifusion_model.data.importers import import_her2st
    from hifusion_model.data.convert import convert_to_ome_tiff

    raw = import_her2st(HER2ST / "images" / "C4.jpg", HER2ST / "counts" / "C4.tsv.gz",
                        HER2ST / "spots" / "C4_selection.tsv")
    meta = raw.uns["hifusion"]
    tiff = convert_to_ome_tiff(HER2ST / "images" / "C4.jpg", setup.workdir / "C4.ome.tif",
                               mpp=float(meta["mpp"]))
    section = new_section(raw.obsm["spatial"], slide=tiff, mpp=float(meta["mpp"]),
                          spot_diameter_um=float(meta["spot_diameter_um"]), name="C4",
                          source="her2st", obs_names=list(raw.obs_names), counts=raw.X,
                          genes=list(raw.var_names))
    return section, "HER2ST C4 (full JPEG converted to OME-TIFF)"


def bench_end_to_end(setup: Setup) -> dict[str, Any]:
    dev = setup.device
    dtype = autocast_dtype(dev, "auto")
    section, source = real_section(setup)
    if setup.quick:
        section = section[: setup.n_spots].copy()
    slide = section_slide(section)
    model = our_model(setup)
    n, b = section.n_obs, setup.batch_size

    dataset = SpotDataset(section, slide, setup.config)
    items = [dataset[i] for i in range(n)]
    batches = [tuple(torch.stack([it[k] for it in items[i:i + b]]).to(dev)
                     for k in ("spot", "region")) for i in range(0, n, b)]
    model_only = our_inference(model, batches, dev, dtype)

    def end_to_end() -> int:
        return len(predict_section(model, setup.config, section, slide, batch_size=b, device=dev,
                                   workers=setup.workers))

    def reading_only() -> int:
        return sum(len(x["spot"]) for x in prefetch_batches(dataset, b, workers=setup.workers))

    def end_to_end_compiled() -> int:  # as a bf16 job of 2,000+ spots runs; compiled in the warm-up
        os.environ[PATH_ENV] = "compile"
        try:
            return end_to_end()
        finally:
            del os.environ[PATH_ENV]

    def end_to_end_int8() -> int:  # as a CPU job of 200+ spots runs; quantised in the warm-up
        return len(predict_section(model, setup.config, section, slide, batch_size=b, device=dev,
                                   workers=setup.workers, precision="int8"))

    runs = {"end_to_end": end_to_end, "model_only": lambda: len(model_only()),
            "reading_only": reading_only}
    if compiles(dev, dtype):
        runs["end_to_end_compiled"] = end_to_end_compiled
    if dev.type == "cpu":
        runs["end_to_end_int8"] = end_to_end_int8
    rates = interleaved(runs, setup.repeats, dev)
    seconds = {k: n / median(v) for k, v in rates.items()}
    return {
        "section": source,
        "n_spots": n,
        "workers": setup.workers,
        "seconds": seconds,
        "all_spots_per_s": rates,
        "ratio": seconds["end_to_end"] / seconds["model_only"],
        "cli": cli_predict(setup, section, model),
    }


def cli_predict(setup: Setup, section: Any, model: HiFusion) -> dict[str, Any]:
    """``hifusion predict SECTION.h5ad`` as a user runs it: wall time incl. start-up and writing."""
    folder = setup.workdir / "e2e"
    folder.mkdir(exist_ok=True)
    path = write_section(section, folder / "section.h5ad")
    ckpt = save_checkpoint(folder / "model.pt", model, train_mean=setup.train_mean)
    cmd = [sys.executable, "-m", "hifusion_model", "predict", str(path), "--model", str(ckpt),
           "--out", str(folder / "pred.h5ad"), "--device", str(setup.device),
           "--batch-size", str(setup.batch_size), "--workers", str(setup.workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    said = re.search(r"in ([\d.]+) s \((\d+) spots/s\)", done.stdout)
    return {"command": " ".join(cmd[1:]), "wall_s": wall,
            "predict_s": float(said.group(1)) if said else None, "stdout": done.stdout.strip()}


# -- 4. peak memory on a huge slide ---------------------------------------------------------------
def texture_bank(n: int, tile: int, seed: int = 0) -> list[np.ndarray]:
    """H&E-like tiles: pink stroma with soft purple nuclei, smooth enough to JPEG well."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    bank = []
    for _ in range(n):
        seeds = np.zeros((tile, tile))
        seeds.flat[rng.choice(tile * tile, tile * tile // 300, replace=False)] = 1.0
        nuclei = np.clip(gaussian(seeds, 2.5) * 60, 0, 1)[..., None]
        stroma = gaussian(rng.normal(0, 1, (tile, tile)), 6)[..., None] * 40
        pink = np.array([232, 150, 196]) + stroma
        purple = np.array([110, 60, 150])
        bank.append(np.clip(pink * (1 - nuclei) + purple * nuclei, 0, 255).astype(np.uint8))
    return bank


def tissue_inside(y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Mostly tissue: a large ellipse with a few round holes (level-0 pixel coordinates)."""
    u, v = (x - size / 2) / (0.47 * size), (y - size / 2) / (0.45 * size)
    inside = u**2 + v**2 < 1
    for cy, cx, r in ((0.3, 0.35, 0.06), (0.62, 0.7, 0.05), (0.7, 0.3, 0.04)):
        inside &= (y - cy * size) ** 2 + (x - cx * size) ** 2 > (r * size) ** 2
    return inside


def level_tiles(size: int, level: int, tile: int, bank: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Row-major tiles of one pyramid level, made on the fly (nothing holds the level)."""
    from skimage.transform import rescale

    d = 2**level
    h = w = size // d
    small = [np.tile(rescale(t, 1 / d, channel_axis=2, preserve_range=True, anti_aliasing=True)
                     .astype(np.uint8), (d, d, 1))[:tile, :tile] for t in bank]
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            yy, xx = np.ogrid[r0:r0 + tile, c0:c0 + tile]
            inside = tissue_inside(yy * d, xx * d, size)[..., None]
            texture = small[(r0 // tile * 7 + c0 // tile * 3) % len(small)]
            yield np.where(inside, texture, np.uint8(243))


def write_big_slide(path: Path, size: int, mpp: float = 0.5, tile: int = 512) -> Path:
    """A ``size × size`` px pyramidal JPEG OME-TIFF with its µm/px, written tile by tile."""
    import tifffile

    bank = texture_bank(8, tile)
    levels = 1
    while size // 2**(levels - 1) > tile:
        levels += 1
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        for k in range(levels):
            n = size // 2**k
            um = mpp * 2**k
            extra: dict[str, Any] = {"subfiletype": 1} if k else {
                "subifds": levels - 1,
                "metadata": {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                             "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}}
            writer.write(level_tiles(size, k, tile, bank), shape=(n, n, 3), dtype=np.uint8,
                         tile=(tile, tile), photometric="rgb", compression="jpeg",
                         compressionargs={"level": 85}, resolution=(1e4 / um, 1e4 / um),
                         resolutionunit="CENTIMETER", **extra)
    return path


def high_water_mb(pid: int) -> float | None:
    """Peak RSS so far of process ``pid`` (Linux ``VmHWM``; it starts afresh at ``exec``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else None


def peak_rss(cmd: list[str], limit_s: float | None, log: Path) -> dict[str, Any]:
    """Run ``cmd``, polling its peak RSS; stop it with SIGTERM after ``limit_s``.

    Not ``getrusage``: on Linux a child's ``ru_maxrss`` inherits the parent's at ``fork``, so
    it would report this (model-holding) benchmark process instead of the command.
    """
    start = time.perf_counter()
    peak, stopped = 0.0, False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, high_water_mb(proc.pid) or 0.0)
            if limit_s is not None and time.perf_counter() - start > limit_s and not stopped:
                proc.send_signal(signal.SIGTERM)
                stopped = True
            time.sleep(0.05)
    text = log.read_text(errors="replace")
    if proc.returncode and not stopped:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    progress = re.findall(r"(\d+)/(\d+) \[", text)  # tqdm's "done/total [" on stderr
    return {"command": " ".join(cmd[1:]), "peak_rss_mb": peak,
            "seconds": time.perf_counter() - start, "finished": not stopped,
            "spots_done": "/".join(progress[-1]) if progress else None,
            "last_output": text.strip().splitlines()[-1][-300:] if text.strip() else ""}


def bench_memory(setup: Setup) -> dict[str, Any]:
    from hifusion_model.data.slide import Slide
    from hifusion_model.inference.predict import grid_section

    a = setup.args
    size = 6144 if setup.quick else a.slide_px
    folder = setup.workdir / "big"
    folder.mkdir(exist_ok=True)
    start = time.perf_counter()
    slide_path = write_big_slide(folder / f"synthetic_{size}.ome.tif", size)
    written = {"seconds": time.perf_counter() - start, "mb": slide_path.stat().st_size / 2**20}
    with Slide.open(slide_path) as slide:
        grid = grid_section(slide, kind="hex", pitch_um=100)
    n_grid = grid.n_obs
    keep = np.linspace(0, n_grid - 1, min(a.max_spots, n_grid)).round().astype(int)
    csv = folder / "spots.csv"
    xy = grid.obsm["spatial"][np.unique(keep)]
    np.savetxt(csv, xy, delimiter=",", header="x,y", comments="", fmt="%.2f")

    model = our_model(setup)
    ckpt = save_checkpoint(folder / "model.pt", model, train_mean=setup.train_mean)
    base = [sys.executable, "-m", "hifusion_model", "predict", str(slide_path),
            "--model", str(ckpt),
            "--device", str(setup.device), "--batch-size", str(setup.batch_size),
            "--workers", str(setup.workers), "--precision", a.precision,
            "--overwrite"]  # a kept --workdir reruns
    spread = peak_rss([*base, "--spots", str(csv), "--out", str(folder / "spots.h5ad")], None,
                      folder / "spots.log")
    full_grid = peak_rss([*base, "--grid", "hex:100", "--out", str(folder / "grid.h5ad")],
                         a.grid_seconds or None, folder / "grid.log")
    return {"slide_px": size, "slide_mb": written["mb"], "write_s": written["seconds"],
            "grid_spots": n_grid, "spread_spots": len(xy), "spread_run": spread,
            "full_grid_run": full_grid}


# -- 5. napari recolour ---------------------------------------------------------------------------
def bench_recolour(setup: Setup) -> dict[str, Any]:
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return {"skipped": "no display: run `xvfb-run -a python benchmarks/speed.py --sections 5`"}
    import napari
    import pandas as pd
    from qtpy.QtWidgets import QApplication

    from napari_hifusion._layers import (
        PREDICTION,
        SPOT_ID,
        color_points,
        points_layer_data,
        robust_limits,
    )
    from napari_hifusion._widgets._common import ModelState
    from napari_hifusion._widgets._genes import GenesPanel

    n_spots, n_genes, mpp = 50_000, 250, 0.5
    side = math.ceil(math.sqrt(n_spots))
    rows, cols = np.divmod(np.arange(n_spots), side)
    xy = np.column_stack([cols, rows]).astype(float) * (100 / mpp) + 500
    section = new_section(xy, slide=setup.workdir / "none.ome.tif", mpp=mpp, spot_diameter_um=55,
                          name="bench", source="synthetic")
    rng = np.random.default_rng(0)
    genes = [f"GENE{i:03d}" for i in range(n_genes)]
    features = pd.concat([pd.DataFrame({SPOT_ID: np.asarray(section.obs_names, dtype=object)}),
                          pd.DataFrame(rng.normal(-6, 1, (n_spots, n_genes)).astype(np.float32),
                                       columns=genes)], axis=1)
    viewer = napari.Viewer(show=False)
    try:
        data, kwargs, _ = points_layer_data(section, name="prediction", layer_kind=PREDICTION,
                                            features=features)
        layer = viewer.add_points(data, **kwargs)
        panel = GenesPanel(viewer, ModelState())
        app = QApplication.instance()
        switches = 5 if setup.quick else 25
        order = [genes[(7 * i + 1) % n_genes] for i in range(switches)]

        def timed(fn: Callable[[str], None]) -> list[float]:
            out = []
            for gene in order:
                start = time.perf_counter()
                fn(gene)
                out.append(1e3 * (time.perf_counter() - start))
                app.processEvents()
            return out

        panel_ms = timed(panel.set_gene)
        def recolour_layer(gene: str) -> None:
            color_points(layer, gene, robust_limits([layer.features[gene]]), "viridis")

        layer_ms = timed(recolour_layer)

        def switch_and_draw(gene: str) -> None:
            panel.set_gene(gene)
            viewer.screenshot(canvas_only=True, flash=False)

        draw_ms = timed(lambda g: viewer.screenshot(canvas_only=True, flash=False))
        both_ms = timed(switch_and_draw)
        return {"n_spots": n_spots, "n_genes": n_genes, "switches": switches,
                "panel_set_gene_ms": median(panel_ms), "color_points_ms": median(layer_ms),
                "render_only_ms": median(draw_ms), "switch_and_render_ms": median(both_ms),
                "all_panel_set_gene_ms": panel_ms}
    finally:
        viewer.close()


# -- report ---------------------------------------------------------------------------------------
SECTIONS: dict[int, tuple[str, Callable[[Setup], dict[str, Any]]]] = {
    1: ("inference", bench_inference),
    2: ("training", bench_training),
    3: ("end_to_end", bench_end_to_end),
    4: ("memory", bench_memory),
    5: ("recolour", bench_recolour),
}


Row = tuple[str, str, "bool | None"]  #: (what was measured, target, target met)


def inference_rows(r: dict[str, Any]) -> list[Row]:
    s, ag = r["spots_per_s"], r["agreement"]
    fp32 = f", ours fp32 {s['ours_fp32']:.1f}" if "ours_fp32" in s else ""
    if "ours_whole_batch" in s:
        fp32 += f", ours unchunked {s['ours_whole_batch']:.1f}"
    speed = (f"spots/s yardstick {s['yardstick']:.1f}, ours {s['ours']:.1f} ({r['precision']})"
             f"{fp32} → {r['speedup']:.2f}×")
    weights = "" if ag["trained_weights"] else " (random weights)"
    pcc = (f"per-gene PCC vs fp32 yardstick: min {ag['gene_pcc_min']:.4f}, "
           f"median {ag['gene_pcc_median']:.4f}{weights}")
    rows = [(speed, "≥ 2×", r["speedup"] >= 2), (pcc, "≥ 0.995", ag["gene_pcc_min"] >= 0.995)]
    for path, what in (("compiled", "compiled (large bf16 jobs)"),
                       ("int8", "int8 (large CPU jobs)")):
        if f"speedup_{path}" in r:
            c = r[f"agreement_{path}"]
            rows += [(f"spots/s ours {what} {s[f'ours_{path}']:.1f} → "
                      f"{r[f'speedup_{path}']:.2f}×", "≥ 3×", r[f"speedup_{path}"] >= 3),
                     (f"{path}: per-gene PCC vs fp32 yardstick min {c['gene_pcc_min']:.4f}",
                      "≥ 0.995", c["gene_pcc_min"] >= 0.995)]
    if "metric_drift" in ag:
        drift = ", ".join(f"{k} {v:.4f}" for k, v in ag["metric_drift"].items())
        rows.append((f"metric drift vs fp32: {drift}", "≤ 0.005",
                     max(ag["metric_drift"].values()) <= 0.005))
    return rows


def training_rows(r: dict[str, Any]) -> list[Row]:
    s = r["spots_per_s"]
    text = (f"spots/s yardstick {s['yardstick']:.1f}, ours {s['ours']:.1f} "
            f"({r['precision']}, {r['optimizer']}) → {r['speedup']:.2f}×")
    rows = [(text, "≥ 1.5×", r["speedup"] >= 1.5)]
    if "speedup_bf16" in r:
        rows.append((f"spots/s ours with --bf16 {s['ours_bf16']:.1f} → {r['speedup_bf16']:.2f}×",
                     "≥ 1.5×", r["speedup_bf16"] >= 1.5))
    return rows


def end_to_end_rows(r: dict[str, Any]) -> list[Row]:
    s, cli = r["seconds"], r["cli"]
    text = (f"{r['n_spots']} spots: predict_section {s['end_to_end']:.2f} s, model only "
            f"{s['model_only']:.2f} s, reading only {s['reading_only']:.2f} s → {r['ratio']:.2f}×")
    command = f"`hifusion predict` wall {cli['wall_s']:.1f} s (its own count: {cli['predict_s']} s)"
    rows = [(text, "≤ 1.15×", r["ratio"] <= 1.15), (command, "", None)]
    for path, what in (("compiled", "compiled (large bf16 jobs)"),
                       ("int8", "int8 (large CPU jobs)")):
        if f"end_to_end_{path}" in s:
            t = s[f"end_to_end_{path}"]
            rows.append((f"predict_section {what} {t:.2f} s → {s['end_to_end'] / t:.2f}× eager",
                         "", None))
    return rows


def memory_rows(r: dict[str, Any]) -> list[Row]:
    a, b = r["spread_run"], r["full_grid_run"]
    spread = (f"{r['slide_px']}² px slide ({r['slide_mb']:.0f} MB, {r['grid_spots']} grid spots): "
              f"--spots {r['spread_spots']} spread over it, peak RSS {a['peak_rss_mb']:.0f} MB")
    state = "finished" if b["finished"] else f"stopped at {b['spots_done']} spots"
    grid = (f"--grid hex:100 ({state} after {b['seconds']:.0f} s), "
            f"peak RSS {b['peak_rss_mb']:.0f} MB")
    return [(spread, "< 2048 MB", a["peak_rss_mb"] < 2048),
            (grid, "< 2048 MB", b["peak_rss_mb"] < 2048)]


def recolour_rows(r: dict[str, Any]) -> list[Row]:
    switch = (f"{r['n_spots']} spots, {r['n_genes']} genes: gene switch (Genes panel) "
              f"{r['panel_set_gene_ms']:.1f} ms, color_points {r['color_points_ms']:.1f} ms")
    render = (f"switch + canvas render {r['switch_and_render_ms']:.1f} ms "
              f"(render alone {r['render_only_ms']:.1f} ms)")
    return [(switch, "< 100 ms", r["panel_set_gene_ms"] < 100), (render, "", None)]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "inference": inference_rows, "training": training_rows, "end_to_end": end_to_end_rows,
    "memory": memory_rows, "recolour": recolour_rows,
}


def rows_for(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(section, measured, target, met) lines of the summary table."""
    rows = [(r["skipped"], "", None)] if "skipped" in r else ROWS[name](r)
    return [(name, *row) for row in rows]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    lines = [row for name, r in results.items() for row in rows_for(name, r)]
    width = max(len(m) for _, m, _, _ in lines)
    for name, measured, target, met in lines:
        mark = {True: "ok", False: "MISSED", None: ""}[met]
        print(f"{name:<11} {measured:<{width}}  {target:<9} {mark}")


def environment(setup: Setup) -> dict[str, Any]:
    c = setup.config
    return {
        "device": str(setup.device),
        "gpu": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": setup.batch_size, "batches": setup.batches, "repeats": setup.repeats,
        "quick": setup.quick, "model": setup.args.model or "random init",
        "config": {"genes": c.n_genes, "width": c.width, "spot_px": c.spot_px,
                   "region_px": c.region_px, "levels": list(c.levels), "level_norm": c.level_norm},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="1,2,3,4,5",
                   help="comma-separated, e.g. 1,2 (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, few batches, small slide")
    p.add_argument("--model", metavar="MODEL.pt",
                   help="checkpoint to benchmark (default: random init)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, help="batches per timed repetition (default 8; quick 2)")
    p.add_argument("--train-batches", type=int, help="section 2: optimiser steps per timed "
                   "repetition (default 4; quick 1; at most --batches)")
    p.add_argument("--repeats", type=int, help="interleaved repetitions (default 3; quick 2)")
    p.add_argument("--workers", type=int, default=reading_threads(),
                   help="patch-reading threads (default: the CLI's, one per usable core up to 4)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--slide-px", type=int, default=50_000, help="side of the section-4 slide")
    p.add_argument("--max-spots", type=int, help="section 4: grid spots spread over the slide "
                   "(default 2000; quick 96)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="section 4: the CLI's --precision (default auto: int8 on the CPU; bf16 "
                   "or fp32 time the other CPU paths)")
    p.add_argument("--grid-seconds", type=float, help="section 4: stop the full --grid run after "
                   "this long (default 300; 0 or quick: run to the end)")
    p.add_argument("--workdir", type=Path,
                   help="scratch folder (default: a temporary one, deleted)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all results as JSON")
    args = p.parse_args(argv)
    quick = args.quick
    args.batches = args.batches or (2 if quick else 8)
    args.repeats = args.repeats or (2 if quick else 3)
    args.train_batches = args.train_batches or (1 if quick else 4)
    args.max_spots = args.max_spots or (96 if quick else 2000)
    if args.grid_seconds is None and not quick:
        args.grid_seconds = 300.0
    try:
        args.sections = sorted({int(s) for s in args.sections.split(",")})
    except ValueError:
        p.error(f"--sections must be numbers 1-5 separated by commas, got {args.sections!r}")
    if not set(args.sections) <= set(SECTIONS):
        p.error(f"--sections must be among 1-5, got {args.sections}")
    if args.batch_size < 2 or min(args.batches, args.train_batches, args.repeats) < 1:
        p.error("--batch-size must be ≥ 2 (batch norm); --batches, --train-batches, --repeats ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            scratch = tempfile.TemporaryDirectory(prefix="hifusion-bench-")
            args.workdir = Path(stack.enter_context(scratch))
        args.workdir.mkdir(parents=True, exist_ok=True)
        setup = build_setup(args)
        report: dict[str, Any] = {"environment": environment(setup), "results": {}}
        print(json.dumps(report["environment"]), flush=True)
        for number in args.sections:
            name, bench = SECTIONS[number]
            start = time.perf_counter()
            report["results"][name] = result = bench(setup)
            print(f"[{number}] {name}: {time.perf_counter() - start:.0f} s", flush=True)
            print_table({name: result})
    print()
    print_table(report["results"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
