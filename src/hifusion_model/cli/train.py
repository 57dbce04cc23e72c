"""``hifusion train SECTION.h5ad … --out MODEL.pt``: train (or fine-tune, or resume) a model.

Runs on one device, or on many under torchrun::

    torchrun --nproc-per-node 4 -m hifusion_model train sections/*.h5ad --out model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from ..engine.recipes import (
    DEFAULT_RECIPE,
    RECIPE_ORIGINS,
    RECIPES,
    describe_recipe,
    get_recipe,
)
from ..engine.sources import read_gene_list
from ..engine.state import companion_paths
from ..engine.train import train
from ..errors import ConfigError, HiFusionError
from ..evaluation.metrics import MetricInputError
from ..models.config import ModelConfig
from ._options import (
    Reporter,
    add_command,
    add_device_options,
    add_overwrite_option,
    add_recipe_options,
    check_out,
    command_line,
    recipe_from_args,
)


def _recipes_help() -> str:
    """The named recipes, each in words read from its own fields."""
    rows = []
    for name, recipe in RECIPES.items():
        origin = RECIPE_ORIGINS.get(name, "")
        if name == DEFAULT_RECIPE:
            origin += " (default)"
        rows.append(textwrap.fill(f"{origin}: {describe_recipe(recipe)}", width=95,
                                  initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13))
    rows.append("  FILE.json  a recipe written by TrainConfig.to_json (e.g. from a checkpoint's "
                "card)")
    return "recipes:\n" + "\n".join(rows)


_D = get_recipe()
EPILOG = _recipes_help() + f"""

validation: --val sections, else {_D.val_grid}x{_D.val_grid} spatial blocks per training section \
with >= {_D.val_fraction:.0%} of
the spots held out (neighbouring spots share tissue, so a random split would leak). MODEL.pt is
the epoch with the highest mean per-gene validation PCC (recipe released, or --set select_on=mse:
the lowest validation MSE); MODEL.curves.json/.csv hold per-epoch curves; MODEL.resume.pt lets
--resume continue a stopped run (Ctrl-C is safe). --set data_seed=N changes only the data order,
augmentation and dropout (same start and split).
With refit (recipe hifusion; --set refit=false turns it off) the validated run is written to
MODEL.selection.pt, then MODEL.pt is retrained on every spot (validation spots and --val
sections included) for the same schedule, up to the epoch the selection run chose; its card
keeps the selection run's validation. --set val_fraction=0 (without --val) holds nothing out:
one run trains every spot for the whole schedule and keeps the last epoch (half the time of a
refit; the card then has no validation metrics).

--pseudo PSEUDO.h5ad adds spots between the measured ones, labelled by teacher models (hifusion
pseudolabel SECTION.h5ad --model T1.pt T2.pt T3.pt --out PSEUDO.h5ad): self-training on tissue
no spot covers. Their teachers saw every spot of the section, so give --set val_fraction=0
(or --val sections they never saw); pseudo-labels never validate nor choose the genes.

--set KEY=VALUE changes any other recipe field (repeatable), e.g. --set ema_decay=0.98
(validate and save a moving average of the weights), --set hed_jitter=0.05 (stain jitter)
or --set pretrained_lr=0.3 (encoders started from --*-encoder-init or --init weights learn
at 0.3x the rate); the checkpoint's card records the full recipe.

--model-config FILE.json sets the architecture (any ModelConfig field: width, spot_px,
region_px, spot_um, region_um, levels, ...); its "genes" are ignored, they come from the data.
--init starts from a checkpoint's weights and architecture; with --genes a new gene list is
chosen and the output heads are re-initialised.
"""


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, name,
        description="Train HiFusion on one or more section .h5ad files.",
        epilog=EPILOG,
    )
    p.add_argument(
        "sections", nargs="+", type=Path, metavar="SECTION.h5ad", help="training sections"
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="MODEL.pt", help="checkpoint to write"
    )
    add_recipe_options(p)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, help="random seed (default: the recipe's, 0)")
    p.add_argument(
        "--genes",
        metavar="N|FILE",
        help="the N most expressed genes of the training sections (default 250), or a "
        "file with one gene per line",
    )
    p.add_argument(
        "--val",
        nargs="+",
        type=Path,
        metavar="SECTION.h5ad",
        help="validation sections (default: spatial blocks of the training sections)",
    )
    p.add_argument(
        "--pseudo",
        nargs="+",
        type=Path,
        metavar="PSEUDO.h5ad",
        help="also train on these pseudo-labelled spots (from hifusion pseudolabel); needs "
        "--set val_fraction=0 or --val",
    )
    p.add_argument("--init", metavar="MODEL.pt|bundled", help="fine-tune from this checkpoint")
    p.add_argument(
        "--spot-encoder-init",
        type=Path,
        metavar="TRUNK.pt",
        help="start the spot encoder from these ResNet-18 weights (from hifusion pretrain, or "
        "a torchvision state dict) instead of random ones",
    )
    p.add_argument(
        "--region-encoder-init",
        type=Path,
        metavar="TRUNK.pt",
        help="start the region encoder from these ResNet-10 weights (from hifusion pretrain "
        "--encoder region) instead of random ones",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped run of --out (its stored recipe and genes are used)",
    )
    add_device_options(p, "autocast precision (default auto: bf16/fp16 on CUDA, fp32 elsewhere)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    add_overwrite_option(p)
    return p


def load_model_config(path: Path) -> ModelConfig:
    """A ModelConfig template from JSON; ``genes`` may be absent (the data chooses them)."""
    if not path.is_file():
        raise ConfigError(f"model configuration {path} not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object of ModelConfig fields")
    try:
        return ModelConfig.from_dict({**d, "genes": d.get("genes") or ["placeholder"]})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _genes(value: str | None) -> int | list[str] | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else read_gene_list(value)


def check_resume_flags(args: argparse.Namespace) -> None:
    """``--resume`` continues the stored recipe, genes and architecture: a flag that would change
    them was silently ignored, so it is refused."""
    if not args.resume:
        return
    given = [flag for flag, value in (
        ("--lr", args.lr), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
        ("--seed", args.seed), ("--genes", args.genes), ("--model-config", args.model_config),
        ("--set", args.recipe_set or None),
        ("--recipe", None if args.recipe == DEFAULT_RECIPE else args.recipe),
    ) if value is not None]
    if given:
        raise ConfigError(
            f"--resume continues the stopped run with its stored recipe, genes and architecture, "
            f"so {', '.join(given)} would be ignored; drop {'them' if len(given) > 1 else 'it'}, "
            "or start a new run (add --overwrite to replace the old one)"
        )


def run(args: argparse.Namespace) -> int:
    check_resume_flags(args)
    genes_file = args.genes if args.genes is not None and not args.genes.isdigit() else None
    check_out(args, [args.sections, args.val, args.pseudo, args.init, args.spot_encoder_init,
                     args.region_encoder_init, args.model_config, genes_file],
              companions=companion_paths(args.out).values(), existing_ok=args.resume)
    recipe = recipe_from_args(args, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              seed=args.seed, precision=args.precision)
    reporter = Reporter()
    try:
        result = train(
            args.sections,
            args.out,
            recipe=recipe,
            model_config=load_model_config(args.model_config) if args.model_config else None,
            genes=_genes(args.genes),
            val_sections=args.val,
            pseudo_labels=args.pseudo,
            init=args.init,
            spot_encoder_init=args.spot_encoder_init,
            region_encoder_init=args.region_encoder_init,
            resume=args.resume,
            device=args.device,
            workers=args.workers,
            command=command_line("train"),
            progress=reporter.progress,
            on_epoch=reporter.epoch,
        )
    except MetricInputError as e:  # validation predictions of a diverged model
        raise HiFusionError(
            "training diverged: the model's validation predictions became NaN or infinite; "
            f"lower the learning rate (--lr, {recipe.lr:g} now) or add --set grad_clip=1"
        ) from e
    except KeyboardInterrupt:
        reporter.close()
        print(
            f"hifusion train: interrupted; the best model so far is in {args.out}, continue with "
            f"--resume ({companion_paths(args.out)['resume']})",
            file=sys.stderr,
        )
        return 130
    finally:
        reporter.close()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result.validation:
        v = result.validation
        print(
            f"best epoch {result.best_epoch}: validation MSE {v['mse']:.4f} (constant mean "
            f"{v['baseline']['mse']:.4f}), gene PCC {v['gene_pcc']:.3f}, "
            f"spot PCC {v['spot_pcc']:.3f}"
        )
    else:
        print(f"epoch {result.best_epoch}: every spot trained, no validation")
    print(f"model: {result.checkpoint}\ncurves: {result.curves_path}")
    return 0
