"""Self-supervised pretraining of HiFusion's encoders on the unlabelled tissue of slides (SimCLR).

A HER2ST section has ~200 labelled spots: far too few to teach a ResNet what tissue looks like
from random weights. The slide around and between the spots costs no labels, so an encoder
first learns to tell tissue apart: two overlapping crops of the same place must find each other
among the crops of every other place in the batch (SimCLR's NT-Xent loss). The trunk's weights
then start ``train(..., spot_encoder_init=...)`` (the spot patch's ResNet-18) or
``region_encoder_init=...`` (the neighbourhood's ResNet-10).

* **Physical units.** Windows three spot patches wide are read around every spot, resampled to
  the µm/px at which the encoder sees tissue (``spot_um / spot_px`` or ``region_um /
  region_px``), so the crops show tissue at the scale the network will see in training and
  prediction.
* **Colour changes the model cannot undo.** The model standardises each image per channel,
  which removes any per-channel gain and bias; the views therefore differ by a random colour
  mixing near the identity, per-channel gamma and occasional greyscale.
* **A budget, not a schedule.** ``minutes`` or ``steps`` bound the run; the learning rate
  follows a cosine over whichever budget is given, so a short run still ends annealed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sections import read_section, section_name, section_slide
from ..devices import autocast, autocast_dtype, resolve_device
from ..errors import Cancelled, ConfigError, SectionError
from ..io_utils import atomic_path
from ..models.backbones import ResNetTrunk, resnet10_trunk, resnet18_trunk
from ..models.config import ENCODERS, ModelConfig
from ..models.hifusion import zscore_per_channel
from ..progress import Progress, ShouldStop
from .state import seed_everything


@dataclass(frozen=True)
class PretrainConfig:
    """How the encoder is pretrained; the defaults are the settings measured in BENCHMARKS.md."""

    crop_px: int = 112  #: view size, px at the model's resolution (half a spot patch's side)
    windows_per_spot: int = 3  #: the window read around a spot, in spot-patch sides
    batch_size: int = 128  #: pairs per step; the other pairs of a batch are the negatives
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    warmup_steps: int = 20
    seed: int = 0

    def check(self, patch_px: int) -> None:
        problems = []
        if not 8 <= self.crop_px <= patch_px:
            problems.append(f"crop_px must be between 8 and the encoder's {patch_px} px patch, "
                            f"got {self.crop_px}")
        if self.windows_per_spot < 2:
            problems.append(f"windows_per_spot must be >= 2, got {self.windows_per_spot}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (the other pairs are the negatives), "
                            f"got {self.batch_size}")
        if not (self.lr > 0 and self.temperature > 0 and self.weight_decay >= 0):
            problems.append("lr and temperature must be > 0, weight_decay >= 0")
        if problems:
            raise ConfigError("pretraining: " + "; ".join(problems))


def encoder_patch(config: ModelConfig, encoder: str) -> tuple[int, float]:
    """The ``encoder``'s input side in px and the µm it covers."""
    if encoder not in ENCODERS:
        raise ConfigError(f"no encoder {encoder!r} to pretrain; choose from {', '.join(ENCODERS)}")
    if encoder == "region":
        return config.region_px, config.region_um
    return config.spot_px, config.spot_um


def encoder_trunk(config: ModelConfig, encoder: str) -> ResNetTrunk:
    """A fresh trunk shaped like ``config``'s spot (ResNet-18) or region (ResNet-10) encoder."""
    encoder_patch(config, encoder)  # a known name
    if encoder == "region":
        return resnet10_trunk(config.region_width or config.width)
    return resnet18_trunk(config.width)


def tissue_windows(sections: Sequence[ad.AnnData], mpp: float, size_px: int) -> np.ndarray:
    """``(N, 3, S, S)`` uint8 windows of ``size_px`` centred on every spot, at ``mpp`` µm/px."""
    size_um = size_px * mpp
    windows = []
    for section in sections:
        with section_slide(section) as slide:
            size = size_um / slide.require_mpp()  # in the slide's full-resolution pixels
            for x, y in np.asarray(section.obsm["spatial"], np.float64):
                windows.append(slide.read_region_px((x, y), size, size_px))
    # channels first, contiguous once here rather than a strided copy at every step
    return np.ascontiguousarray(np.stack(windows).transpose(0, 3, 1, 2))


def crop_pairs(windows: Tensor | Sequence[Tensor], crop: int,
               gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two overlapping ``crop``-px crops of each ``(3, S, S)`` window: the second is shifted from
    the first by up to half a crop, so a pair shares tissue without being the same pixels."""
    n, size = len(windows), windows[0].shape[-1]
    margin = size // 6  # the central two thirds, mostly tissue near the spot
    first = torch.randint(margin, size - margin - crop + 1, (n, 2), generator=gen)
    shift = torch.randint(-(crop // 2), crop // 2 + 1, (n, 2), generator=gen)
    second = (first + shift).clamp(0, size - crop)

    def cut(offsets: Tensor) -> Tensor:
        return torch.stack([w[:, r:r + crop, c:c + crop] for w, (r, c) in zip(windows, offsets)])

    return cut(first), cut(second)


def augment_views(views: Tensor, gen: torch.Generator) -> Tensor:
    """Flip, quarter turn and colour changes of uint8 views, as float in [0, 1]. The draws come
    from ``gen`` on the CPU (the same on every device); the arithmetic runs where ``views`` are,
    so a GPU is not left waiting for the CPU."""
    n, device = len(views), views.device
    flip = bool(torch.rand((), generator=gen) < 0.5)
    turns = int(torch.randint(4, (), generator=gen))
    mixing = torch.eye(3) + 0.08 * torch.randn(n, 3, 3, generator=gen)
    gamma = torch.exp(0.15 * torch.randn(n, 3, 1, 1, generator=gen))
    grey = torch.rand(n, 1, 1, 1, generator=gen) < 0.15
    views = views.float() / 255
    if flip:
        views = views.flip(-1)
    views = torch.rot90(views, turns, (-2, -1))
    views = torch.einsum("nij,njhw->nihw", mixing.to(device), views).clamp(1e-4, 1)
    views = views ** gamma.to(device)
    grey = grey.to(device)
    return torch.where(grey, views.mean(1, keepdim=True).expand_as(views), views)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss for unit vectors: each view must pick its partner out of the other 2N − 2."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


class ContrastiveEncoder(nn.Module):
    """A trunk (as in HiFusion: per-image standardisation first) with SimCLR's projector."""

    def __init__(self, trunk: ResNetTrunk) -> None:
        super().__init__()
        self.trunk = trunk
        self.projector = nn.Sequential(nn.Linear(8 * trunk.width, 512), nn.ReLU(inplace=True),
                                       nn.Linear(512, 128))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(zscore_per_channel(x)).mean(dim=(-2, -1))
        return F.normalize(self.projector(features).float(), dim=1)


@dataclass
class PretrainResult:
    path: Path  #: the trunk's state dict
    steps: int
    seconds: float
    losses: list[float]  #: one per step


def pretrain_encoder(
    sections: Sequence[str | os.PathLike | ad.AnnData],
    out: str | os.PathLike,
    *,
    encoder: str = "spot",
    steps: int | None = None,
    minutes: float | None = None,
    pretrain: PretrainConfig = PretrainConfig(),
    model_config: ModelConfig | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> PretrainResult:
    """Pretrain an ``encoder`` (``spot`` or ``region``) on the tissue around the spots of
    ``sections``; write the trunk's state dict to ``out`` atomically.

    Exactly one of ``steps`` and ``minutes`` bounds the run. ``model_config`` gives the patch
    geometry and width (default: the released architecture). Raises :class:`Cancelled` when
    ``should_stop()`` turns true; nothing is written then.
    """
    if (steps is None) == (minutes is None):
        raise ConfigError("give the pretraining budget as steps or as minutes (one of them)")
    budget = f"steps={steps}" if steps is not None else f"minutes={minutes}"
    if (steps is not None and steps < 1) or (minutes is not None and not minutes > 0):
        raise ConfigError(f"the pretraining budget must be positive, got {budget}")
    config = model_config or ModelConfig(genes=["placeholder"])
    patch_px, patch_um = encoder_patch(config, encoder)
    pretrain.check(patch_px)
    adatas = [s if isinstance(s, ad.AnnData) else read_section(s) for s in sections]
    if not adatas:
        raise ConfigError("pretraining needs at least one section")
    n_spots = sum(a.n_obs for a in adatas)
    if n_spots < pretrain.batch_size:
        raise SectionError(
            f"the sections {', '.join(section_name(a) for a in adatas)} have {n_spots} spots, "
            f"fewer than one batch of {pretrain.batch_size} windows; lower the batch size"
        )
    windows = torch.from_numpy(tissue_windows(
        adatas, patch_um / patch_px, pretrain.windows_per_spot * config.spot_px))
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision, training=True)
    seed_everything(pretrain.seed)
    gen = torch.Generator().manual_seed(pretrain.seed)
    net = ContrastiveEncoder(encoder_trunk(config, encoder)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=pretrain.lr, weight_decay=pretrain.weight_decay)
    start, losses = time.perf_counter(), []
    while True:
        done = _fraction_done(len(losses), steps, time.perf_counter() - start, minutes)
        if done >= 1:
            break
        if should_stop is not None and should_stop():
            raise Cancelled("pretraining stopped; no weights were written")
        warmup = min(1.0, (len(losses) + 1) / max(pretrain.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = pretrain.lr * warmup * 0.5 * (1 + math.cos(math.pi * done))
        losses.append(_step(net, opt, windows, pretrain, gen, dev, dtype))
        if progress is not None:  # in per cent of the budget: a time budget has no step count
            done = _fraction_done(len(losses), steps, time.perf_counter() - start, minutes)
            progress(min(100, int(100 * done)), 100, f"step {len(losses)}: loss {losses[-1]:.3f}")
    with atomic_path(out) as tmp:
        torch.save(net.trunk.state_dict(), tmp)
    return PretrainResult(Path(out), len(losses), time.perf_counter() - start, losses)


def _fraction_done(step: int, steps: int | None, seconds: float, minutes: float | None) -> float:
    return step / steps if steps is not None else seconds / (60 * minutes)


def _step(net: ContrastiveEncoder, opt: torch.optim.Optimizer, windows: Tensor,
          pretrain: PretrainConfig, gen: torch.Generator, device: torch.device,
          dtype: torch.dtype | None) -> float:
    # without replacement: a window drawn twice would make its own views negatives
    idx = torch.randperm(len(windows), generator=gen)[:pretrain.batch_size]
    # views of the chosen windows: gathering whole windows first would copy ~1 MB each
    first, second = crop_pairs([windows[i] for i in idx.tolist()], pretrain.crop_px, gen)
    views = [augment_views(v.to(device, non_blocking=True), gen) for v in (first, second)]
    with autocast(device, dtype):
        loss = nt_xent(net(views[0]), net(views[1]), pretrain.temperature)
    if not torch.isfinite(loss):
        raise ConfigError("pretraining diverged (the loss is not finite); lower the learning rate")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def describe(result: PretrainResult, pretrain: PretrainConfig, sections: Sequence[str],
             encoder: str = "spot") -> dict[str, Any]:
    """What a pretraining run did, for a JSON beside the weights."""
    return {"weights": str(result.path), "encoder": encoder, "sections": list(sections),
            "steps": result.steps, "seconds": round(result.seconds, 1),
            "settings": dataclasses.asdict(pretrain),
            "loss_first": result.losses[0], "loss_last": result.losses[-1]}


__all__ = [
    "ContrastiveEncoder",
    "PretrainConfig",
    "PretrainResult",
    "augment_views",
    "crop_pairs",
    "encoder_patch",
    "encoder_trunk",
    "nt_xent",
    "pretrain_encoder",
    "tissue_windows",
]
