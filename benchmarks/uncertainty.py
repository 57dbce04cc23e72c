"""Which per-spot spread tells where a model errs? Candidate uncertainties against the error.

For each model and left-out section it predicts every spot under the eight symmetries of the
square and keeps, per view, the final prediction and each HISM level head's. Candidates:

* ``levels``  SD over the final and the level heads' predictions, plain view only (free: one pass)
* ``views``   SD over the eight views of the final prediction (eight passes)
* ``both``    SD over every view and every head
* ``noise``   what the project ships (:mod:`hifusion_model.inference.uncertainty`): the Poisson noise of
              the target at the library size the model's noise model reads from the stain
* ``library`` the same with the spot's true library size (an oracle: the ceiling of ``noise``)

Each is scored by Spearman's rank correlation with the absolute error of the reported
prediction (the mean over views for ``views``/``both``, the plain view for ``levels``):
``per_gene`` across the spots of one gene, averaged over genes (where in *this* map not to
trust it: the question a pathologist asks), ``per_spot`` on the spot means over genes, and
``pooled`` over all spot × gene pairs (inflated by genes that simply vary more).

    python benchmarks/uncertainty.py --model bundled --section C4.h5ad
    python benchmarks/uncertainty.py --model runs/loso/loso/B4/hifusion-seed0/model.pt \\
        --section runs/loso/sections/B4.h5ad --out runs/unc_B4.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from hifusion_model.data.dataset import SpotDataset, as_unit_float
from hifusion_model.data.expression import section_targets
from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.devices import autocast, autocast_dtype, resolve_device
from hifusion_model.inference.predict import prefetch_batches
from hifusion_model.inference.uncertainty import (
    NoiseModel,
    library_sizes,
    poisson_log_sd,
    section_stain_features,
)
from hifusion_model.inference.views import MAX_TTA, dihedral
from hifusion_model.models.checkpoint import load_model


@torch.inference_mode()
def heads_by_view(model, ckpt, section, slide, device="cpu", precision="auto"):
    """``(views, heads, n, G)``: head 0 is the final prediction, then the level heads."""
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    dataset = SpotDataset(section, slide, ckpt.config, raw=True)
    out = []
    for batch in prefetch_batches(dataset, 8, workers=2):
        spot, region = (as_unit_float(batch[k].to(dev)) for k in ("spot", "region"))
        views = []
        for k in range(MAX_TTA):
            with autocast(dev, dtype):
                o = model(*(dihedral(x, k).contiguous(memory_format=torch.channels_last)
                            for x in (spot, region)))
            views.append(torch.stack([o.prediction.float(),
                                      *(p.float() for p in o.level_predictions)]))
        out.append(torch.stack(views).cpu().numpy())
    return np.concatenate(out, axis=2)


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def score(spread: np.ndarray, error: np.ndarray) -> dict[str, float]:
    per_gene = [_rho(spread[:, g], error[:, g]) for g in range(error.shape[1])]
    return {
        "per_gene": float(np.nanmean(per_gene)),
        "per_spot": _rho(spread.mean(1), error.mean(1)),
        "pooled": _rho(spread.ravel(), error.ravel()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint, or 'bundled'")
    p.add_argument("--section", type=Path, required=True, help="section .h5ad with counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, help="write the scores here as JSON")
    args = p.parse_args(argv)
    model, ckpt = load_model(args.model)
    section = read_section(args.section)
    slide = section_slide(section)
    start = time.perf_counter()
    try:
        heads = heads_by_view(model, ckpt, section, slide, args.device, args.precision)
        stain = section_stain_features(section, slide, ckpt.config)
    finally:
        slide.close()
    truth = section_targets(section, ckpt.config.genes, ckpt.config.normalization)
    plain = heads[0, 0]
    candidates = {
        "levels": (plain, heads[0].std(0)),
        "views": (heads[:, 0].mean(0), heads[:, 0].std(0)),
        "both": (heads[:, 0].mean(0), heads.reshape(-1, *heads.shape[2:]).std(0)),
    }
    noise = NoiseModel.from_card(ckpt.card)
    if noise is not None:
        candidates["noise"] = (plain, noise.uncertainty(plain, stain))
    library = library_sizes(section, ckpt.config.genes)[:, None]
    candidates["library"] = (plain, poisson_log_sd(np.maximum(np.exp(plain) * library - 1, 0)))
    result = {"model": args.model, "section": str(args.section), "n_spots": int(section.n_obs),
              "n_heads": int(heads.shape[1]), "seconds": time.perf_counter() - start}
    for name, (pred, spread) in candidates.items():
        result[name] = score(spread, np.abs(pred - truth))
        r = result[name]
        print(f"{name:<7} Spearman with |error|: per gene {r['per_gene']:.3f}, per spot "
              f"{r['per_spot']:.3f}, pooled {r['pooled']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
