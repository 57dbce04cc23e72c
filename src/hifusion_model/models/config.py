"""Model configuration: one dataclass that travels inside every checkpoint.

Sizes are given twice on purpose: in pixels (what the network sees) and in micrometres (what
those pixels cover on the tissue). A slide scanned at another resolution is resampled so that a
``spot_px`` patch always covers ``spot_um`` µm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.expression import NORMALIZATIONS
from ..errors import ConfigError
from ..serialization import JsonDataclass

#: How images are standardised before the encoders.
INPUT_NORMS = ("image", "none")
#: BatchNorm running statistics of the spot encoder: one set for all HISM levels (as released)
#: or one per level (eval mode then normalises 32-px tiles with 32-px tile statistics).
LEVEL_NORMS = ("shared", "per_level")
#: Network families: HiFusion, or the spot-only ResNet-18 regressor (ST-Net style) that the
#: accuracy benchmark trains as a baseline (:class:`hifusion_model.models.spot_only.SpotOnly`).
ARCHS = ("hifusion", "spot_resnet18")

# HER2ST (patients B-H) is scanned at ~0.69 µm/px; the released model sees 224 px spots and
# 448 px regions of the raw image, i.e. ~154 µm and ~308 µm of tissue.
HER2ST_MPP = 0.6875
#: The encoders that can start from pretrained weights: the spot patch's ResNet-18 and the
#: region's ResNet-10 (``model.spot_encoder``, ``model.region_encoder``).
ENCODERS = ("spot", "region")


@dataclass
class ModelConfig(JsonDataclass):
    """Architecture and data contract of a HiFusion model.

    ``levels`` are HISM grid sizes: 1 = the whole spot, 2 = 2×2 tiles, 7 = 7×7 tiles.
    ``width`` is the first ResNet stage's channel count (64 as released; the feature
    dimension is ``8 * width``); tiny values make fast test models. ``level_norm`` is
    ``"shared"`` (as released) or ``"per_level"`` (see :data:`LEVEL_NORMS`). ``arch`` picks
    the network (:data:`ARCHS`); ``model.build_model(config)`` builds whichever it names.
    """

    _what = "model configuration"
    _required = ("genes",)

    genes: list[str]
    levels: tuple[int, ...] = (1, 2, 7)
    spot_px: int = 224
    region_px: int = 448
    spot_um: float = 224 * HER2ST_MPP
    region_um: float = 448 * HER2ST_MPP
    width: int = 64
    region_width: int | None = None  # defaults to ``width``
    token_grid: int = 2
    heads: int = 8
    attn_dropout: float = 0.1
    head_dropout: float = 0.0
    aux_weight: float | None = None  # None: 1 / len(levels), as released
    align_weight: float = 0.5
    normalization: str = "log_relative"
    input_norm: str = "image"
    level_norm: str = "shared"
    arch: str = "hifusion"

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.levels = tuple(int(k) for k in self.levels)
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def feature_dim(self) -> int:
        return 8 * self.width

    @property
    def region_feature_dim(self) -> int:
        return 8 * (self.region_width or self.width)

    @property
    def mpp(self) -> float:
        """µm per pixel at which the model sees tissue."""
        return self.spot_um / self.spot_px

    @property
    def effective_aux_weight(self) -> float:
        return 1.0 / len(self.levels) if self.aux_weight is None else self.aux_weight

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        if not self.genes:
            problems.append("genes is empty")
        if len(set(self.genes)) != len(self.genes):
            problems.append("genes has duplicates")
        if not self.levels or any(k < 1 for k in self.levels):
            problems.append(f"levels must be positive grid sizes, got {self.levels}")
        for k in self.levels:
            if self.spot_px % k:
                problems.append(f"spot_px={self.spot_px} is not divisible by level {k}")
        if 1 not in self.levels:
            problems.append("levels must include 1 (the whole spot)")
        if self.width < 1 or (self.region_width is not None and self.region_width < 1):
            problems.append("width must be positive")
        if self.feature_dim % self.heads:
            problems.append(f"feature_dim={self.feature_dim} not divisible by heads={self.heads}")
        if self.region_feature_dim != self.feature_dim:
            problems.append("region_width must give the same feature dimension as width")
        if self.spot_um <= 0 or self.region_um <= 0 or self.spot_px <= 0 or self.region_px <= 0:
            problems.append("patch sizes must be positive")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
        if self.input_norm not in INPUT_NORMS:
            problems.append(f"input_norm must be one of {INPUT_NORMS}")
        if self.level_norm not in LEVEL_NORMS:
            problems.append(f"level_norm must be one of {LEVEL_NORMS}, got {self.level_norm!r}")
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "spot_resnet18" and self.levels != (1,):
            problems.append(f"arch spot_resnet18 sees the whole spot only: levels must be (1,), "
                            f"got {self.levels}")
        if problems:
            raise ConfigError("invalid model configuration: " + "; ".join(problems))


def tiny_config(genes: list[str] | int = 8, **overrides: Any) -> ModelConfig:
    """A small, fast configuration for tests and smoke runs (same structure, fewer channels)."""
    if isinstance(genes, int):
        genes = [f"G{i}" for i in range(genes)]
    base = dict(
        genes=genes, spot_px=56, region_px=112, width=8, heads=2, spot_um=56 * 2.75,
        region_um=112 * 2.75,
    )
    base.update(overrides)
    return ModelConfig(**base)


__all__ = [
    "ModelConfig", "tiny_config", "NORMALIZATIONS", "INPUT_NORMS", "LEVEL_NORMS", "ARCHS",
    "HER2ST_MPP", "ENCODERS",
]
