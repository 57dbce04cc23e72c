"""Several trained models of one variant, their predictions averaged (a deep ensemble).

Seeds of the same recipe make different errors; the mean of their predictions is a cheap
measure of how much of the gap to a target is seed noise. Give the checkpoints that
``accuracy_her2st.py`` wrote for one experiment (``WORK/EXPERIMENT/VARIANT/model.pt``, one run
per seed) and the test sections it imported; each model and their mean are scored with the
same :func:`hifusion_model.evaluation.protocols.score` as the accuracy table::

    python benchmarks/ensemble_her2st.py runs/s0/3d-C/a/model.pt runs/s1/3d-C/a/model.pt \\
        --sections runs/s0/sections --test C3,C4 --bf16 --json runs/ensemble_a.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np

from hifusion_model.data.sections import read_section
from hifusion_model.errors import HiFusionError
from hifusion_model.evaluation.protocols import NetworkPredictor, score
from hifusion_model.inference.views import check_tta
from hifusion_model.io_utils import atomic_path
from hifusion_model.models.checkpoint import load_model

COLUMNS = ("mse", "mae", "spot_pcc", "gene_pcc")
MARKERS = ("ERBB2", "KRT19", "CD74")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL.pt",
                   help="checkpoints trained on the same sections and genes")
    p.add_argument("--sections", type=Path, required=True,
                   help="folder of imported sections (accuracy_her2st.py's WORK/sections)")
    p.add_argument("--test", default="C3,C4", help="test sections (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in inference")
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time views averaged per spot (1-8, as `hifusion predict --tta`)")
    p.add_argument("--json", type=Path, help="write every score here")
    return p.parse_args(argv)


def read_tests(folder: Path, names: Sequence[str]) -> dict[str, ad.AnnData]:
    return {n: read_section(folder / f"{n}.h5ad") for n in names}


def load_predictors(paths: Sequence[Path], precision: str,
                    tta: int = 1) -> list[NetworkPredictor]:
    """The models, refused unless they predict the same genes in the same order."""
    check_tta(tta)
    predictors = []
    for path in paths:
        model, ckpt = load_model(path, device="cpu")
        predictors.append(NetworkPredictor(model, ckpt, "auto", precision, workers=1, tta=tta))
    first = predictors[0]
    for path, p in zip(paths[1:], predictors[1:]):
        if p.genes != first.genes:
            raise HiFusionError(f"{path} predicts other genes than {paths[0]}; an ensemble "
                                "needs the same")
    return predictors


def row(name: str, result: dict, sections: Sequence[str]) -> str:
    cells = []
    for s in sections:
        m = result["per_section"][s]
        cells += [f"{m[k]:.4f}" for k in COLUMNS]
        cells += [f"{m['genes'][g]:.3f}" if g in m["genes"] else "–" for g in MARKERS]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.test.split(",") if n]
    try:
        tests = read_tests(args.sections, names)
        predictors = load_predictors(args.models, "bf16" if args.bf16 else "auto", args.tta)
    except HiFusionError as e:
        print(f"ensemble_her2st: error: {e}", file=sys.stderr)
        return 2
    # the constant compared with: the training mean over every model's training spots
    genes, mean = predictors[0].genes, np.mean([p.train_mean for p in predictors], axis=0)
    predictions = [{n: p.predict(s) for n, s in tests.items()} for p in predictors]
    averaged = {n: np.mean([pr[n] for pr in predictions], axis=0) for n in tests}
    scores = {str(m): score(pr, tests, genes, mean) for m, pr in zip(args.models, predictions)}
    scores["ensemble"] = score(averaged, tests, genes, mean)
    print("| model | " + " | ".join(f"{s} {k}" for s in names for k in (*COLUMNS, *MARKERS))
          + " |")
    for name, result in scores.items():
        print(row(name, result, names))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"models": [str(m) for m in args.models],
                                       "test": names, "tta": args.tta, "scores": scores},
                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
