"""``hifusion demo [--screenshot OUT.png]``: the napari demo (sample, predictions, truth for ERBB2).

The GUI lives in :mod:`napari_hifusion.demo`, imported only here and only when the command runs,
so the rest of the core never loads Qt. Without a display the command still does its job: it
re-runs itself under ``xvfb-run`` (a virtual X server) and saves a screenshot, by default
``hifusion-demo.png`` in the current folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Any

from ..errors import HiFusionError

#: Set in the re-executed child so it never tries xvfb-run again.
XVFB_GUARD = "HIFUSION_DEMO_UNDER_XVFB"
#: Where a headless run saves the window when no --screenshot is given.
HEADLESS_SCREENSHOT = "hifusion-demo.png"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Open napari with the HER2ST C4 sample slide and spots, predict with the "
                    "bundled model, and show predicted and measured ERBB2 side by side.",
    )
    p.add_argument("--screenshot", metavar="OUT.png",
                   help="save the window as a PNG once the prediction is shown, then exit")
    p.add_argument("--model", default="bundled", help="checkpoint to use (default: bundled)")
    p.add_argument("--gene", default="ERBB2", help="gene to show (default: ERBB2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=32)
    return p


def has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def rerun_under_xvfb(args: argparse.Namespace) -> int:
    """Run this same command inside ``xvfb-run -a`` and return its exit code."""
    argv = [sys.executable, "-m", "hifusion_model", "demo", "--screenshot", args.screenshot,
            "--model", args.model, "--gene", args.gene, "--device", args.device,
            "--batch-size", str(args.batch_size)]
    env = {**os.environ, XVFB_GUARD: "1"}
    return subprocess.call(["xvfb-run", "-a", *argv], env=env)


def run(args: argparse.Namespace) -> int:
    if not has_display():
        if args.screenshot is None:
            args.screenshot = HEADLESS_SCREENSHOT
            print(f"hifusion demo: no display; rendering on a virtual one and saving "
                  f"{args.screenshot}", file=sys.stderr)
        if os.environ.get(XVFB_GUARD) or shutil.which("xvfb-run") is None:
            raise HiFusionError("no display and no xvfb-run: install a virtual X server "
                                "(e.g. apt-get install xvfb libgl1 libegl1) or run on a desktop")
        return rerun_under_xvfb(args)
    from napari_hifusion.demo import main

    return main(args.screenshot, model=args.model, gene=args.gene, device=args.device,
                batch_size=args.batch_size)
