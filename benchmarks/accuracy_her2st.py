"""Accuracy on HER2ST: HiFusion (our recipe, the released one) against three baselines.

Experiments (only B4, C2, C3, C4 have H&E images in ``../shared/data/her2st``):

* ``3d-C``   the paper's 3-D protocol for patient C: train on C2 (the paper's C1 has no image
             here), test on C3 and C4;
* ``cross-B`` a cross-patient check: train on C2, C3, C4, test on B4.

Variants, all on the same genes (the 250 most expressed of the training sections), the same
normalisation and the same training spots; model selection (best epoch, ridge penalty) uses
spatial blocks of the training sections only, never the test sections:

* ``a``  HiFusion trained with our recipe (``hifusion``)
* ``b``  HiFusion trained with the released recipe as-is (``released``; ``--released-epochs``
         may cut its 50 epochs, and the epochs run are recorded)
* ``c``  a spot-only ResNet-18 (ST-Net style: spot patch → GAP → dropout → Linear), our recipe
* ``d``  ridge regression on colour and texture features of the patches
* ``e``  the constant training mean

Full runs take tens of minutes on a CPU, so the script runs in pieces: each variant's result is
merged into ``--out`` as soon as it is done, and every run prints the table of all results so
far. For example::

    python benchmarks/accuracy_her2st.py --variants d,e
    python benchmarks/accuracy_her2st.py --variants a --device cuda --bf16
    python benchmarks/accuracy_her2st.py --variants b --released-epochs 20

The encoders can start from self-supervised weights: ``--pretrain-spot`` / ``--pretrain-region``
pretrain them first on the tissue of each experiment's own training sections (never a test
section's), as ``hifusion pretrain`` does; the weights are kept in the work folder and reused::

    python benchmarks/accuracy_her2st.py --variants a,c --bf16 \\
        --pretrain-spot 1500 --pretrain-region 800
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hifusion_model.cli._options import add_set_option
from hifusion_model.cli.train import load_model_config
from hifusion_model.engine.curves import format_epoch
from hifusion_model.engine.pretrain import PretrainConfig, describe, encoder_patch, pretrain_encoder
from hifusion_model.engine.recipes import TrainConfig, get_recipe
from hifusion_model.errors import ConfigError, HiFusionError
from hifusion_model.evaluation.baselines import fit_constant, fit_ridge
from hifusion_model.evaluation.protocols import (
    Predictor,
    fit_network,
    fit_student,
    gene_panel,
    import_sections,
    predict_and_score,
    scan_her2st,
)
from hifusion_model.io_utils import atomic_path
from hifusion_model.models.config import ENCODERS, ModelConfig
from hifusion_model.models.spot_only import spot_only_config

FORMAT = "hifusion-accuracy-her2st/1"
DEFAULT_HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
MARKERS = ("ERBB2", "KRT19", "CD74")

#: name -> (training sections, test sections, description)
EXPERIMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "3d-C": (("C2",), ("C3", "C4"),
             "3-D protocol, patient C: train C2 (C1 has no image here), test C3, C4"),
    "cross-B": (("C2", "C3", "C4"), ("B4",),
                "cross-patient check: train on patient C (C2-C4), test B4"),
}
NETWORKS = ("a", "b", "c")  #: variants trained by the engine (the rest are fitted in closed form)
VARIANTS = {
    "a": "HiFusion, our recipe",
    "b": "HiFusion, released recipe",
    "c": "spot-only ResNet-18, our recipe",
    "d": "ridge, colour/texture features",
    "e": "constant training mean",
}


# -- arguments --------------------------------------------------------------------------------


def _choices(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="variants: " + "; ".join(f"{k} = {v}" for k, v in VARIANTS.items())
        + ". experiments: " + "; ".join(f"{k} = {e[2]}" for k, e in EXPERIMENTS.items()),
    )
    p.add_argument("--variants", default="a,b,c,d,e",
                   type=lambda v: _choices(v, list(VARIANTS), "variant"),
                   help="comma-separated variants to run (default: a,b,c,d,e)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   type=lambda v: _choices(v, list(EXPERIMENTS), "experiment"),
                   help=f"comma-separated experiments (default: {','.join(EXPERIMENTS)})")
    p.add_argument("--epochs", type=int, help="epochs of variants a and c (default: the recipe's 20)")
    p.add_argument("--released-epochs", type=int,
                   help="epochs of variant b (default: the released 50)")
    p.add_argument("--batch-size", type=int, help="spots per batch (default: the recipes' 32)")
    add_set_option(p)  # variants a and c only: b stays the released recipe as-is
    p.add_argument("--model-config", type=Path, metavar="FILE.json",
                   help="architecture template for a, b, c and the patch sizes of d "
                   "(default: the released architecture)")
    for encoder, users in (("spot", "a, b and c"), ("region", "a and b; c has none")):
        start = p.add_mutually_exclusive_group()
        start.add_argument(f"--{encoder}-encoder-init", type=Path, metavar="TRUNK.pt",
                           help=f"start the {encoder} encoder of {users} from these weights "
                           f"(hifusion pretrain --encoder {encoder})")
        start.add_argument(f"--pretrain-{encoder}", type=int, metavar="STEPS",
                           help=f"first pretrain the {encoder} encoder of {users} for STEPS "
                           "steps on the tissue of each experiment's training sections "
                           "(self-supervised, as hifusion pretrain; kept in WORK/EXPERIMENT/"
                           "pretrain and reused)")
    p.add_argument("--pretrain-batch-size", type=int, default=PretrainConfig.batch_size,
                   help="pairs of views per pretraining step (default: %(default)s); the views "
                   "are half the encoder's patch, at most 112 px")
    p.add_argument("--teachers", type=int, default=0, metavar="K",
                   help="self-training for a and c: K runs (seeds 0..K-1) label the gaps between "
                   "the training spots, then the scored model learns from both without "
                   "validation (default: 0, off)")
    p.add_argument("--n-genes", type=int, default=250, help="genes predicted (default: 250)")
    p.add_argument("--out", type=Path, default=Path("accuracy_her2st.json"),
                   help="results JSON, merged into when it exists (default: %(default)s)")
    p.add_argument("--work", type=Path,
                   help="imported sections and checkpoints (default: OUT without .json + _work)")
    p.add_argument("--her2st", type=Path, default=DEFAULT_HER2ST,
                   help="HER2ST folder (default: ../shared/data/her2st)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training and inference")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    p.add_argument("--max-spots", type=int, metavar="N",
                   help="quick checks only: keep N evenly spread spots per section")
    args = p.parse_args(argv)
    args.work = args.work or args.out.with_name(args.out.stem + "_work")
    return args


# -- variants ---------------------------------------------------------------------------------


def recipe_for(variant: str, args: argparse.Namespace) -> TrainConfig:
    """Our recipe (with ``--set``) for a, c, d, e (d and e use its validation split); the
    released one for b."""
    released = variant == "b"
    recipe = get_recipe("released" if released else "hifusion",
                        epochs=args.released_epochs if released else args.epochs,
                        batch_size=args.batch_size, n_genes=args.n_genes,
                        precision="bf16" if args.bf16 else None)
    return recipe if released else recipe.replace(**dict(args.recipe_set))


def fit_variant(
    variant: str,
    train: list[Any],
    genes: list[str],
    template: ModelConfig,
    out: Path,
    args: argparse.Namespace,
    inits: dict[str, Path | None],
) -> Predictor:
    recipe = recipe_for(variant, args)
    if variant in NETWORKS:
        config = spot_only_config(template) if variant == "c" else template
        starts = {f"{e}_encoder_init": p for e, p in used_encoders(variant, inits).items()}
        options = dict(model_config=config, device=args.device, workers=args.workers,
                       on_epoch=_epoch_line, **starts)
        if args.teachers and variant != "b":
            return fit_student(train, genes, out / "model.pt", recipe=recipe,
                               teachers=args.teachers, **options)
        return fit_network(train, genes, out / "model.pt", recipe=recipe, **options)
    if variant == "d":
        return fit_ridge(train, genes, template.replace(genes=genes), recipe=recipe)
    return fit_constant(train, genes, normalization=template.normalization, recipe=recipe)


def used_encoders(variant: str, per_encoder: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``per_encoder`` that ``variant`` has an encoder for (c: no region)."""
    if variant not in NETWORKS:
        return {}
    return {e: v for e, v in per_encoder.items() if variant != "c" or e == "spot"}


def encoder_inits(names: Sequence[str], train: list[Any], template: ModelConfig, work: Path,
                  args: argparse.Namespace) -> tuple[dict[str, Path | None], dict[str, Any]]:
    """The weights each encoder starts from (``--*-encoder-init``, or pretrained here on the
    tissue of ``train`` for ``--pretrain-*`` steps), and a record of the pretraining. Only the
    encoders that the variants to run have are pretrained."""
    inits = {e: getattr(args, f"{e}_encoder_init") for e in ENCODERS}
    record = {}
    used = {e for v in args.variants for e in used_encoders(v, inits)}
    for encoder in sorted(used):
        steps = getattr(args, f"pretrain_{encoder}")
        if steps is not None:
            inits[encoder] = work / "pretrain" / f"{encoder}_{steps}.pt"
            record[encoder] = pretrained_trunk(inits[encoder], encoder, steps, names, train,
                                               template, args)
    return inits, record


def pretrained_trunk(out: Path, encoder: str, steps: int, names: Sequence[str], train: list[Any],
                     template: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain ``encoder`` into ``out`` unless a run with the same sections, data cut, steps
    and settings already did; its record (``hifusion pretrain``'s JSON)."""
    crop = min(PretrainConfig.crop_px, encoder_patch(template, encoder)[0] // 2)
    settings = PretrainConfig(crop_px=crop, batch_size=args.pretrain_batch_size)
    wanted = {"sections": list(names), "max_spots": args.max_spots, "steps": steps,
              "settings": dataclasses.asdict(settings)}
    log = out.with_suffix(".json")
    if log.is_file() and out.is_file():
        done = json.loads(log.read_text())
        if all(done.get(k) == v for k, v in wanted.items()):
            _log(f"the {encoder} encoder was pretrained before: {out}")
            return done
    _log(f"pretraining the {encoder} encoder for {steps} steps -> {out}")
    result = pretrain_encoder(train, out, encoder=encoder, steps=steps, pretrain=settings,
                              model_config=template, device=args.device,
                              precision="bf16" if args.bf16 else "auto",
                              progress=_tenths(encoder))
    done = describe(result, settings, names, encoder) | {"max_spots": args.max_spots}
    with atomic_path(log) as tmp:
        tmp.write_text(json.dumps(done, indent=1))
    return done


# -- results file -----------------------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": FORMAT, "experiments": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); give another --out") from e
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a results file of this script; give another --out")
    return results


def merge_result(path: Path, experiment: dict[str, Any], variant: str, record: dict) -> dict:
    """Re-read ``path``, add one variant's record, write it back atomically.

    The data an experiment was run on (sections, genes, spot cut, normalisation) must match what
    is already stored, or the merged table would compare unlike things.
    """
    results = load_results(path)
    name = experiment["name"]
    stored = results["experiments"].setdefault(name, {**experiment, "variants": {}})
    for key in ("train", "test", "genes", "max_spots", "normalization"):
        if stored.get(key) != experiment[key]:
            raise ConfigError(
                f"{path}: experiment {name} was run with another {key} "
                f"({stored.get(key)!s:.60} vs {experiment[key]!s:.60}); give another --out"
            )
    stored["variants"][variant] = record
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Per test section (and over all of them): every variant run so far, in a..e order."""
    head = ["experiment", "test", "variant", "MSE", "MAE", "spot PCC", "gene PCC", *MARKERS,
            "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, exp in results["experiments"].items():
        for v in sorted(exp["variants"]):
            rec = exp["variants"][v]
            m = rec["metrics"]
            rows = list(m["per_section"].items())
            if len(rows) > 1:
                genes = {g: m["genes"].get(g) for g in MARKERS}
                rows.append(("all", {**m, "genes": genes}))
            for test, s in rows:
                markers = [_fmt(s["genes"].get(g), 3) for g in MARKERS]
                cells = [name, test, f"{v}: {rec['description']}", _fmt(s["mse"], 4),
                         _fmt(s["mae"], 4), _fmt(s["spot_pcc"], 3), _fmt(s["gene_pcc"], 3),
                         *markers, f"{rec['seconds']['total']:.0f}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- main -------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tenths(what: str) -> Callable[[int, int, str], None]:
    """A progress callback that logs each tenth of the way."""
    logged = set()

    def report(done: int, total: int, text: str) -> None:
        tenth = 10 * done // total
        if tenth not in logged:
            logged.add(tenth)
            _log(f"  {what}: {done}/{total} ({text})")
    return report


def _selection(variant: str, recipe: TrainConfig, teachers: int) -> str:
    if variant in NETWORKS and teachers and variant != "b":
        return (f"none: a student of {teachers} teachers (each chosen on spatial blocks of the "
                "training sections), trained on every spot and the gaps they labelled")
    return "spatial blocks of the training sections: " + (
        f"the epoch of the best validation {recipe.select_on}" if variant in NETWORKS else
        "ridge alpha" if variant == "d" else "none")


def _epoch_line(r: dict[str, Any]) -> None:
    _log("  " + format_epoch(r))


def run_experiment(name: str, files: dict, template: ModelConfig, args: argparse.Namespace,
                   argv: Sequence[str]) -> dict[str, Any]:
    train_names, test_names, description = EXPERIMENTS[name]
    sections = import_sections(files, [*train_names, *test_names], args.work,
                               max_spots=args.max_spots, log=_log)
    train = [sections[n] for n in train_names]
    test = {n: sections[n] for n in test_names}
    genes = gene_panel(train, list(test.values()), args.n_genes)
    experiment = {"name": name, "description": description, "train": list(train_names),
                  "test": list(test_names), "genes": genes, "max_spots": args.max_spots,
                  "normalization": template.normalization}
    inits, pretraining = encoder_inits(train_names, train, template, args.work / name, args)
    results: dict[str, Any] = {}
    for v in args.variants:
        _log(f"{name} / {v} ({VARIANTS[v]}): fitting on {', '.join(train_names)}")
        start = time.perf_counter()
        predictor = fit_variant(v, train, genes, template, args.work / name / v, args, inits)
        fitted = time.perf_counter()
        metrics = predict_and_score(predictor, test, normalization=template.normalization)
        done = time.perf_counter()
        recipe = recipe_for(v, args)
        record = {
            "description": VARIANTS[v],
            "recipe": recipe.to_dict() if v in NETWORKS else None,
            "epochs": recipe.epochs if v in NETWORKS else None,
            "selection": _selection(v, recipe, args.teachers),
            "info": predictor.info,
            "pretraining": used_encoders(v, pretraining),
            "seconds": {"fit": fitted - start, "predict": done - fitted, "total": done - start},
            "metrics": metrics,
            "device": args.device,
            "bf16": args.bf16,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "benchmarks/accuracy_her2st.py", *argv]),
        }
        results = merge_result(args.out, experiment, v, record)
        m = metrics
        _log(f"{name} / {v}: MSE {m['mse']:.4f} (mean {m['baseline']['mse']:.4f}), gene PCC "
             f"{m['gene_pcc']:.3f}, spot PCC {m['spot_pcc']:.3f}, {done - start:.0f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        template = (load_model_config(args.model_config) if args.model_config
                    else ModelConfig(genes=["placeholder"]))
        files = scan_her2st(args.her2st)
        for name in args.experiments:
            run_experiment(name, files, template, args, argv)
        results = load_results(args.out)
    except HiFusionError as e:
        print(f"accuracy_her2st: error: {e}", file=sys.stderr)
        return 2
    table = markdown_table(results)
    results["table_markdown"] = table
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    print(table)
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
