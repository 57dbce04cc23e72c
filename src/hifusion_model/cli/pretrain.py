"""``hifusion pretrain SECTION.h5ad … --out TRUNK.pt``: self-supervised encoder weights.

The encoder learns from the tissue around the spots (no expression is read), so a training
run on a few hundred labelled spots starts from an encoder that already tells tissue apart:
``hifusion train … --spot-encoder-init TRUNK.pt`` (or ``--region-encoder-init`` for weights
pretrained with ``--encoder region``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..engine.pretrain import PretrainConfig, describe, pretrain_encoder
from ..io_utils import atomic_path
from ..models.config import ENCODERS
from ._options import (
    Reporter,
    add_command,
    add_device_options,
    add_overwrite_option,
    check_out,
)
from .train import load_model_config

EPILOG = """\
Two overlapping crops of the same place must find each other among the crops of every other
place in a batch (SimCLR). The budget is --minutes or --steps; the learning rate follows a
cosine over it. A JSON beside the weights (TRUNK.json) records what ran. Measured on HER2ST C2
(docs/experiments.md): 30 minutes on 2 CPU cores raised a spot-only network's gene PCC on the
held-out sections by about 0.02; the region encoder pretrained too (--encoder region, 800 steps)
added about 0.01 to HiFusion's (one seed).
"""


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, name,
        description="Self-supervised pretraining of HiFusion's spot or region encoder (SimCLR).",
        epilog=EPILOG,
    )
    p.add_argument("sections", nargs="+", type=Path, metavar="SECTION.h5ad",
                   help="sections whose tissue around the spots is used")
    p.add_argument("--out", required=True, type=Path, metavar="TRUNK.pt",
                   help="encoder weights to write (the trunk's state dict)")
    p.add_argument("--encoder", choices=ENCODERS, default="spot",
                   help="the spot patch's ResNet-18 (default) or the region's ResNet-10")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="train for this long")
    budget.add_argument("--steps", type=int, help="train for this many steps")
    defaults = PretrainConfig()
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"pairs of views per step (default: {defaults.batch_size})")
    p.add_argument("--crop-px", type=int, default=defaults.crop_px,
                   help=f"view size in px at the model's resolution (default: {defaults.crop_px})")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate (default: {defaults.lr})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: 0)")
    p.add_argument("--model-config", type=Path, metavar="FILE.json",
                   help="architecture (patch sizes, width) of the model to be trained")
    add_device_options(p, "autocast precision (default auto: bf16/fp16 on CUDA, fp32 elsewhere)",
                       precision_default="auto")
    add_overwrite_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_out(args, [args.sections, args.model_config], companions=[args.out.with_suffix(".json")])
    reporter = Reporter(unit="%")
    settings = PretrainConfig(crop_px=args.crop_px, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed)
    result = pretrain_encoder(
        args.sections, args.out, encoder=args.encoder, steps=args.steps, minutes=args.minutes,
        pretrain=settings,
        model_config=load_model_config(args.model_config) if args.model_config else None,
        device=args.device, precision=args.precision, progress=reporter.progress,
    )
    reporter.close()
    record = describe(result, settings, [str(s) for s in args.sections], args.encoder)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    print(f"{result.steps} steps in {result.seconds:.0f} s, loss {result.losses[0]:.3f} -> "
          f"{result.losses[-1]:.3f}; encoder weights: {args.out}")
    return 0
