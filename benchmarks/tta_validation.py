"""Test-time augmentation measured on a model's own validation spots (never on test sections).

A checkpoint's card names its training sections and recipe, so the spatial validation blocks
the trainer held out can be drawn again exactly (``held_out.held_out_sections``). This script
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

from hifusion_model.evaluation.held_out import held_out_sections, validate
from hifusion_model.inference.views import MAX_TTA
from hifusion_model.models.checkpoint import load_model

MARKERS = ("ERBB2", "KRT19", "CD74")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a checkpoint trained with a spatial validation split")
    p.add_argument("--views", default="1,2,4,8", help="test-time view counts to compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()

    model, ckpt = load_model(args.model)
    held = held_out_sections(ckpt.card)
    results = {"model": str(args.model), "n_spots": sum(h.n_obs for h in held), "views": {}}
    for views in (int(v) for v in args.views.split(",")):
        if not 1 <= views <= MAX_TTA:
            p.error(f"views must be 1 to {MAX_TTA}")
        start = time.perf_counter()
        m = validate(model, ckpt, held, device=args.device, tta=views)
        seconds = time.perf_counter() - start
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
