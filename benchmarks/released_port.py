"""The speed yardstick: a straightforward eager port of the released HiFusion structure.

It computes what :class:`hifusion_model.models.hifusion.HiFusion` computes, written the way the authors'
code is: one Python loop over the HISM levels, tiles cut with slicing loops and concatenated,
feature maps put back with ``torch.cat``, fp32, NCHW, no autocast, no channels-last. Parameter
names match ours, so the two load each other's state dicts and differ only in how they run.

Used by ``benchmarks/speed.py`` (spots/s ratios measured in the same run) and by
``tests/test_released_port.py`` (same weights → same predictions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hifusion_model.models.backbones import resnet10_trunk, resnet18_trunk, use_level
from hifusion_model.models.config import ModelConfig
from hifusion_model.models.hifusion import NORM_EPS, HiFusionOutput


def standardize(x: Tensor) -> Tensor:
    """Per image and channel z-score, as released."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + NORM_EPS)


def cut_tiles(x: Tensor, k: int) -> Tensor:
    """``k × k`` tiles of every image, tile-major: index ``(i·k + j)·B + b``."""
    t = x.shape[-1] // k
    tiles = [x[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(k) for j in range(k)]
    return torch.cat(tiles, dim=0)


def join_tiles(features: Tensor, k: int, batch: int) -> Tensor:
    """Inverse of :func:`cut_tiles` on the encoder's output maps."""
    tiles = features.split(batch, dim=0)
    rows = [torch.cat(tiles[i * k:(i + 1) * k], dim=3) for i in range(k)]
    return torch.cat(rows, dim=2)


class ReleasedHiFusion(nn.Module):
    """HiFusion as released, eager and fp32; ``forward(spot, region) -> HiFusionOutput``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.feature_dim
        norm_levels = len(config.levels) if config.level_norm == "per_level" else 1
        self.spot_encoder = resnet18_trunk(config.width, norm_levels)
        self.region_encoder = resnet10_trunk(config.region_width or config.width)
        self.level_head = nn.Linear(dim, config.n_genes)
        self.level_logits = nn.Parameter(torch.zeros(len(config.levels)))
        self.cross_attention = nn.MultiheadAttention(
            dim, config.heads, dropout=config.attn_dropout, batch_first=True
        )
        self.head = nn.Sequential(
            nn.Dropout(config.head_dropout), nn.LayerNorm(dim), nn.Linear(dim, config.n_genes)
        )

    def forward(self, spot: Tensor, region: Tensor) -> HiFusionOutput:
        if self.config.input_norm == "image":
            spot, region = standardize(spot), standardize(region)
        batch = spot.shape[0]

        maps = []
        for i, k in enumerate(self.config.levels):
            with use_level(self.spot_encoder, i):
                if k == 1:
                    maps.append(self.spot_encoder(spot))
                else:
                    maps.append(join_tiles(self.spot_encoder(cut_tiles(spot, k)), k, batch))
        size = maps[self.config.levels.index(1)].shape[-2:]
        features = []
        for f in maps:
            if f.shape[-2:] == size:
                features.append(f)
            elif f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
                features.append(F.adaptive_max_pool2d(f, size))
            else:
                features.append(F.interpolate(f, size=size, mode="bilinear", align_corners=False))

        level_predictions = [self.level_head(f.mean(dim=(2, 3))) for f in features]
        weights = torch.softmax(self.level_logits, dim=0)
        fused = features[0] * weights[0]
        for w, f in zip(weights[1:], features[1:]):
            fused = fused + w * f

        query = self.region_encoder(region).mean(dim=(2, 3)).unsqueeze(1)
        tokens = F.adaptive_avg_pool2d(fused, self.config.token_grid).flatten(2).transpose(1, 2)
        attended, attention = self.cross_attention(
            query, tokens, tokens, need_weights=True, average_attn_weights=False
        )
        prediction = self.head((attended + query).squeeze(1))
        return HiFusionOutput(prediction, level_predictions, features, weights, attention)


__all__ = ["ReleasedHiFusion", "cut_tiles", "join_tiles", "standardize"]
