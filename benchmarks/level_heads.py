"""What each of a HiFusion model's heads predicts: the final head against the per-level heads.

HiFusion's shared level head regresses expression from each HISM level's pooled features (the
auxiliary supervision). If those heads only predict the training mean, the level maps carry no
spot-to-spot signal; this script shows it, and how much the pooled level features vary across
spots (their across-spot std over their mean, averaged over channels), in eval mode::

    python benchmarks/level_heads.py MODEL.pt SECTION.h5ad [SECTION.h5ad ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hifusion_model.data.dataset import SpotDataset, as_unit_float
from hifusion_model.data.sections import read_section, section_name, section_slide
from hifusion_model.errors import HiFusionError
from hifusion_model.evaluation.baselines import section_targets
from hifusion_model.evaluation.metrics import gene_pcc, mse, spot_pcc
from hifusion_model.models.checkpoint import load_model


@torch.inference_mode()
def head_outputs(model: torch.nn.Module, dataset: SpotDataset, chunk: int = 8):
    """Final and per-level predictions ``(1 + L, n, G)`` and pooled level features ``(L, n, C)``."""
    preds, feats = [], []
    for start in range(0, len(dataset), chunk):
        items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
        spot, region = (as_unit_float(torch.stack([it[k] for it in items]))
                        for k in ("spot", "region"))
        out = model(spot, region)
        preds.append(torch.stack([out.prediction, *out.level_predictions]).float())
        feats.append(torch.stack([f.mean(dim=(-2, -1)) for f in out.level_features]).float())
    return torch.cat(preds, 1).numpy(), torch.cat(feats, 1).numpy()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a HiFusion checkpoint")
    p.add_argument("sections", nargs="+", type=Path, help="sections with measured expression")
    args = p.parse_args(argv)
    try:
        model, ckpt = load_model(args.model, device="cpu")
        config = ckpt.config
        if config.arch != "hifusion":
            raise HiFusionError(f"{args.model} is a {config.arch} model; it has no level heads")
        model.eval()
        heads = ["final", *(f"level {k}" for k in config.levels)]
        print("| section | head | MSE | spot PCC | gene PCC | pooled-feature CV |")
        print("|---|---|---|---|---|---|")
        for path in args.sections:
            section = read_section(path)
            dataset = SpotDataset(section, section_slide(section), config, raw=True)
            preds, feats = head_outputs(model, dataset)
            truth = section_targets(section, config.genes, config.normalization)
            cv = ["–", *(f"{(f.std(0) / np.abs(f.mean(0)).clip(1e-8)).mean():.3f}" for f in feats)]
            for name, pred, spread in zip(heads, preds, cv):
                print(f"| {section_name(section)} | {name} | {mse(pred, truth):.4f} | "
                      f"{spot_pcc(pred, truth):.3f} | {np.nanmean(gene_pcc(pred, truth)):.3f} | "
                      f"{spread} |")
    except HiFusionError as e:
        print(f"level_heads: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
