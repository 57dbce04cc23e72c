"""Test-time augmentation measured on a model's own validation spots (never on test sections).

A checkpoint's card names its training sections and recipe, so the spatial validation blocks
the trainer held out can be drawn again exactly (``baselines.validation_masks``). This script
predicts those spots with 1, 2, 4 and 8 test-time views (``inference.predict_section(tta=n)``:
the symmetries of the square, averaged) and prints the validation metrics and the time of each,
so the choice of a default rests on validation data only::

    python benchmarks/tta_validation.py runs/bundled/her2st_hifusion.pt --json runs/tta.json

A refit model trained on every spot has no held-out spots left: give its selection run
(``MODEL.selection.pt``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hifusion_model.baselines import section_targets, validation_masks
from hifusion_model.checkpoint import load_model
from hifusion_model.errors import HiFusionError
from hifusion_model.inference import MAX_TTA, predict_section
from hifusion_model.metrics import evaluate_predictions
from hifusion_model.recipes import TrainConfig
from hifusion_model.sections import read_section, section_slide

MARKERS = ("ERBB2", "KRT19", "CD74")


def held_out_sections(card: dict) -> list:
    """The validation spots of every training section named in the card, as AnnData subsets."""
    if card.get("refit"):
        raise HiFusionError("a refit model has trained on its validation spots; give "
                            f"its selection run, {card['refit'].get('selection')}")
    if not str(card.get("validation_split", "")).startswith("spatial blocks"):
        raise HiFusionError("the card holds no spatial validation split (validated on "
                            f"{card.get('validation_split')!r}); nothing to re-draw")
    sections = [read_section(s["path"]) for s in card["sections"]]
    masks = validation_masks(sections, TrainConfig.from_dict(card["recipe"]))
    return [s[m].copy() for s, m in zip(sections, masks, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a checkpoint trained with a spatial validation split")
    p.add_argument("--views", default="1,2,4,8", help="test-time view counts to compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()

    model, ckpt = load_model(args.model)
    held = held_out_sections(ckpt.card)
    genes = ckpt.genes
    truth = np.concatenate([section_targets(s, genes, ckpt.config.normalization) for s in held])
    labels = np.concatenate([[f"section{i}"] * s.n_obs for i, s in enumerate(held)])
    results = {"model": str(args.model), "n_spots": int(len(truth)), "views": {}}
    for views in (int(v) for v in args.views.split(",")):
        if not 1 <= views <= MAX_TTA:
            p.error(f"views must be 1 to {MAX_TTA}")
        start = time.perf_counter()
        pred = np.concatenate([
            predict_section(model, ckpt, s, section_slide(s), device=args.device, tta=views)
            for s in held
        ])
        seconds = time.perf_counter() - start
        m = evaluate_predictions(pred, truth, sections=labels, genes=genes,
                                 train_mean=ckpt.train_mean.numpy())
        row = {"mse": m["mse"], "gene_pcc": m["gene_pcc"], "spot_pcc": m["spot_pcc"],
               **{g: m["genes"].get(g) for g in MARKERS}, "seconds": seconds}
        results["views"][views] = row
        print(f"views {views}: MSE {row['mse']:.4f}  gene PCC {row['gene_pcc']:.3f}  "
              f"spot PCC {row['spot_pcc']:.3f}  "
              + "  ".join(f"{g} {row[g]:.3f}" for g in MARKERS if row[g] is not None)
              + f"  {seconds:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
