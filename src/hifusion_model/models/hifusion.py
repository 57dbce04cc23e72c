"""The HiFusion network: hierarchical intra-spot modelling (HISM) + cross-scale fusion (CCF).

HISM encodes a spot at several grid sizes with one shared ResNet-18: at level ``k`` the spot is
cut into ``k × k`` tiles, all tiles go through the encoder as one batch, and their feature maps
are put back where the tiles came from. Each level's map is aligned to the whole-spot (level 1)
map, predicts expression on its own (auxiliary supervision), and the maps are mixed with
learnable softmax weights. CCF lets a ResNet-10 summary of the surrounding region query the
fused spot map through cross-attention.

With ``level_norm="per_level"`` the shared encoder keeps BatchNorm running statistics per
level: 224-px spots and 32-px tiles differ too much for one set to serve both in eval mode.

Under autocast only the encoders run in reduced precision; everything after them (level heads,
fusion, attention, LayerNorm head) is fp32: it is cheap, and in bf16 it made the worst gene's
predictions correlate only 0.989 with fp32 (0.9998 now; BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .backbones import resnet10_trunk, resnet18_trunk, use_level
from .config import ModelConfig

#: Added to the std when z-scoring: keeps flat (blank) patches near 0 instead of amplifying
#: float rounding; 1e-4 is 1/40 of an 8-bit grey level, far below any real tissue contrast.
NORM_EPS = 1e-4


@dataclass
class HiFusionOutput:
    """Everything one forward pass produces; the loss and the viewers pick what they need."""

    prediction: Tensor  #: (B, G) final expression
    level_predictions: list[Tensor]  #: one (B, G) per level, through the shared level head
    level_features: list[Tensor]  #: one (B, C, h, w) per level, aligned to level 1's map
    fusion_weights: Tensor  #: (L,) softmax weights over levels
    attention: Tensor  #: (B, heads, 1, T) per-head attention of the region query over T tokens


# -- HISM tiling -----------------------------------------------------------------------------
def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def hism_tiles(x: Tensor, k: int) -> Tensor:
    """Cut ``(B, C, H, W)`` into ``k × k`` tiles → ``(B·k², C, H/k, W/k)``, row-major per image.

    Tile ``(i, j)`` of image ``b`` is at index ``b·k² + i·k + j``; the memory format is kept.
    """
    b, c, h, w = x.shape
    if h % k or w % k:
        raise ConfigError(f"a {h}×{w} image cannot be cut into {k}×{k} equal tiles")
    tiles = x.reshape(b, c, k, h // k, k, w // k).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(b * k * k, c, h // k, w // k).contiguous(memory_format=_memory_format(x))


def assemble_tiles(features: Tensor, k: int) -> Tensor:
    """Inverse layout of :func:`hism_tiles`: ``(B·k², C, h, w)`` → ``(B, C, k·h, k·w)``."""
    n, c, h, w = features.shape
    if n % (k * k):
        raise ConfigError(f"{n} tile features are not a whole number of {k}×{k} grids")
    b = n // (k * k)
    grid = features.reshape(b, k, k, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, k * h, k * w).contiguous(memory_format=_memory_format(features))


def align_to(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a level map to the level-1 size: adaptive max pool when larger, else bilinear."""
    h, w = features.shape[-2:]
    if (h, w) == tuple(size):
        return features
    if h >= size[0] and w >= size[1]:
        return F.adaptive_max_pool2d(features, size)
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def encode_level(encoder: nn.Module, spot: Tensor, k: int) -> Tensor:
    """Encode all ``k × k`` tiles of a batch of spots in one call and re-assemble the map."""
    if k == 1:
        return encoder(spot)
    features = assemble_tiles(encoder(hism_tiles(spot, k)), k)
    return features.contiguous(memory_format=_memory_format(spot))  # 1×1 tiles lose the format


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Suspend autocast: the layers after the encoders cost little and lose most in bf16."""
    return torch.autocast(device_type=device.type, enabled=False)


def zscore_per_channel(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Standardise each image and channel to mean 0, std 1 (as released; no ImageNet stats)."""
    x32 = x.float()  # statistics in float32 even for half inputs
    var, mean = torch.var_mean(x32, dim=(-2, -1), keepdim=True, correction=0)
    return ((x32 - mean) / (var.sqrt() + eps)).to(x.dtype)


# -- the network -----------------------------------------------------------------------------
class HiFusion(nn.Module):
    """HiFusion for ``config.n_genes`` genes; ``forward(spot, region) -> HiFusionOutput``.

    ``spot`` is ``(B, 3, spot_px, spot_px)`` and ``region`` ``(B, 3, region_px, region_px)``,
    float in ``[0, 1]`` (uint8 / 255), the region centred on the spot.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.feature_dim
        norm_levels = len(config.levels) if config.level_norm == "per_level" else 1
        self.spot_encoder = resnet18_trunk(config.width, norm_levels)
        self.region_encoder = resnet10_trunk(config.region_width or config.width)
        self.level_head = nn.Linear(dim, config.n_genes)  # shared by all levels
        self.level_logits = nn.Parameter(torch.zeros(len(config.levels)))  # equal weights
        self.cross_attention = nn.MultiheadAttention(
            dim, config.heads, dropout=config.attn_dropout, batch_first=True
        )
        self.head = nn.Sequential(
            nn.Dropout(config.head_dropout), nn.LayerNorm(dim), nn.Linear(dim, config.n_genes)
        )

    def forward(self, spot: Tensor, region: Tensor) -> HiFusionOutput:
        self._check_inputs(spot, region)
        spot, region = self._normalize(spot), self._normalize(region)

        features = self.encode_spot(spot)
        region_map = self.region_encoder(region)
        with full_precision(spot.device):  # the cheap tail: bf16 here costs accuracy, not time
            features = [f.float() for f in features]
            level_predictions = [self.level_head(f.mean(dim=(-2, -1))) for f in features]
            fusion_weights = self.level_logits.softmax(dim=0)
            fused = sum(w * f for w, f in zip(fusion_weights, features))
            query = region_map.float().mean(dim=(-2, -1)).unsqueeze(1)  # (B, 1, C)
            tokens = F.adaptive_avg_pool2d(fused, self.config.token_grid)
            tokens = tokens.flatten(2).transpose(1, 2)
            attended, attention = self.cross_attention(
                query, tokens, tokens, need_weights=True, average_attn_weights=False
            )
            prediction = self.head((attended + query).squeeze(1))
        return HiFusionOutput(prediction, level_predictions, features, fusion_weights, attention)

    def encode_spot(self, spot: Tensor) -> list[Tensor]:
        """HISM: one feature map per level, each aligned to the level-1 map's size.

        Level ``config.levels[i]`` uses BatchNorm statistics ``i`` (all the same when shared).
        """
        maps = {}
        for i, k in enumerate(self.config.levels):
            with use_level(self.spot_encoder, i):
                maps[k] = encode_level(self.spot_encoder, spot, k)
        size = tuple(maps[1].shape[-2:])
        return [align_to(maps[k], size) for k in self.config.levels]

    def _normalize(self, x: Tensor) -> Tensor:
        return zscore_per_channel(x) if self.config.input_norm == "image" else x

    def _check_inputs(self, spot: Tensor, region: Tensor) -> None:
        c = self.config
        for name, x, px in (("spot", spot, c.spot_px), ("region", region, c.region_px)):
            expected = f"(B, 3, {px}, {px}) float in [0, 1]"
            if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, px, px):
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ConfigError(f"HiFusion {name} must be {expected}, got {got}")
            if not x.is_floating_point():
                raise ConfigError(
                    f"HiFusion {name} must be {expected}, got {x.dtype}; divide uint8 by 255"
                )
        if spot.shape[0] != region.shape[0]:
            raise ConfigError(
                f"HiFusion got {spot.shape[0]} spots but {region.shape[0]} regions; "
                "pass one region per spot"
            )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "HiFusion",
    "HiFusionOutput",
    "hism_tiles",
    "assemble_tiles",
    "align_to",
    "encode_level",
    "zscore_per_channel",
    "full_precision",
    "count_parameters",
]
