"""Self-supervised pretraining of the spot encoder on the unlabelled tissue of training slides.

Does SimCLR (contrastive pairs of views; the other pairs of the batch are the negatives)
give the ResNet-18 a better start than random weights when only one section's ~190 spots are
labelled? This script answers it within a fixed CPU budget: it reads a window of three spot
widths around every spot of the training sections (tissue between and around the spots,
no labels used), trains the trunk on pairs of random native-resolution crops of a window
until ``--minutes`` run out (pairs of overlapping crops of one window are the positives), and saves the trunk's weights for ``spot_probe.py --init``.

    python benchmarks/ssl_pretrain.py --sections runs/accuracy/accuracy_her2st_work/sections \\
        --train C2 --minutes 25 --out runs/s6/ssl_C2.pt

Crops are ``--crop`` px at the slide's native resolution (112 px: a quarter of a spot patch's
pixels, so four times the pairs per second of 224-px crops, at the same scale as the patches).
Augmentation: flips, quarter turns, a random colour mixing near the identity, per-channel gamma
and occasional greyscale; the model standardises each image per channel, which already undoes
any per-channel gain and bias, so the colour changes here are ones it cannot undo.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hifusion_model.backbones import resnet18_trunk
from hifusion_model.model import zscore_per_channel
from hifusion_model.sections import read_section, section_slide


def read_windows(folder: Path, names: Sequence[str], size: int, cache: Path) -> np.ndarray:
    """``(N, 3, size, size)`` uint8 windows centred on every spot of the sections ``names``."""
    if cache.exists():
        return np.load(cache)
    windows = []
    for n in names:
        section = read_section(folder / f"{n}.h5ad")
        with section_slide(section) as slide:
            for x, y in np.asarray(section.obsm["spatial"], np.float64):
                windows.append(slide.read_region_px((x, y), size, size).transpose(2, 0, 1))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, np.stack(windows))
    return np.load(cache)


def crop_pairs(windows: torch.Tensor, crop: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Two overlapping ``crop``-px crops of each window: the second is shifted from the first by
    up to half a crop, so a pair shares tissue without being the same pixels."""
    n, _, size, _ = windows.shape
    margin = size // 6  # the central two thirds, mostly tissue near the spot
    first = torch.randint(margin, size - margin - crop + 1, (n, 2), generator=gen)
    shift = torch.randint(-crop // 2, crop // 2 + 1, (n, 2), generator=gen)
    second = (first + shift).clamp(0, size - crop)
    def cut(offsets: torch.Tensor) -> torch.Tensor:
        return torch.stack([w[:, r:r + crop, c:c + crop] for w, (r, c) in zip(windows, offsets)])
    return cut(first), cut(second)


def augment(views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip, quarter turn and colour changes of uint8 views, as float in [0, 1]."""
    n = len(views)
    views = views.float() / 255
    if torch.rand((), generator=gen) < 0.5:
        views = views.flip(-1)
    views = torch.rot90(views, int(torch.randint(4, (), generator=gen)), (-2, -1))
    mixing = torch.eye(3) + 0.08 * torch.randn(n, 3, 3, generator=gen)
    views = torch.einsum("nij,njhw->nihw", mixing, views).clamp(1e-4, 1)
    views = views ** torch.exp(0.15 * torch.randn(n, 3, 1, 1, generator=gen))
    grey = torch.rand(n, 1, 1, 1, generator=gen) < 0.15
    return torch.where(grey, views.mean(1, keepdim=True).expand_as(views), views)


class Contrastive(nn.Module):
    """The spot trunk with SimCLR's projection head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = resnet18_trunk()
        self.projector = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True),
                                       nn.Linear(512, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(zscore_per_channel(x)).mean(dim=(-2, -1))
        return F.normalize(self.projector(features).float(), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner out of the other 2N − 2 views."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partner)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=Path, required=True, help="folder of imported SECTION.h5ad")
    p.add_argument("--train", default="C2", help="sections whose tissue is used (no labels)")
    p.add_argument("--window", type=int, default=672, help="window read around each spot (px)")
    p.add_argument("--crop", type=int, default=112, help="view size (native px)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--minutes", type=float, default=25.0, help="training budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="trunk weights (state dict)")
    args = p.parse_args(argv)
    train = args.train.split(",")
    cache = Path("runs/ssl") / f"{'-'.join(train)}-{args.window}.npy"
    windows = torch.from_numpy(read_windows(args.sections, train, args.window, cache))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = Contrastive()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    start, step, log = time.perf_counter(), 0, []
    budget = 60 * args.minutes
    while time.perf_counter() - start < budget:
        # the learning rate follows a cosine over the time budget, not over a step count
        frac = (time.perf_counter() - start) / budget
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * frac))
        # without replacement: a window drawn twice would make its own views negatives
        idx = torch.randperm(len(windows), generator=gen)[:args.batch_size]
        first, second = crop_pairs(windows[idx], args.crop, gen)
        with torch.autocast("cpu", torch.bfloat16):
            loss = nt_xent(net(augment(first, gen)), net(augment(second, gen)), args.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            log.append({"step": step, "loss": loss.item(), "s": time.perf_counter() - start})
            print(f"step {step}: loss {loss.item():.3f}, {log[-1]['s']:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.trunk.state_dict(), args.out)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "steps": step,
         "windows": len(windows), "log": log}, indent=1))
    print(f"{step} steps; trunk weights: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
