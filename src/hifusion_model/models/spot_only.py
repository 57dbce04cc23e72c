"""The spot-only ResNet-18 regressor (ST-Net style): the baseline HiFusion must beat.

It sees only the spot patch (no HISM levels, no region context), so what it reaches tells how
much HiFusion's additions bring. It is configured by a :class:`~.config.ModelConfig` with
``arch="spot_resnet18"`` (:func:`spot_only_config`) and trained by the same engine and recipe
as HiFusion.

>>> from hifusion_model.models.config import tiny_config
>>> net = SpotOnly(spot_only_config(tiny_config(["ERBB2", "KRT19"])))
>>> net.config.levels, net.config.region_px == net.config.spot_px
((1,), True)
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from .backbones import resnet18_trunk
from .config import ModelConfig
from .hifusion import HiFusionOutput, full_precision, zscore_per_channel


def spot_only_config(config: ModelConfig) -> ModelConfig:
    """``config`` turned into the spot-only ResNet-18: same spot patch, genes and targets.

    The region patch is shrunk to the spot (the network ignores it; this only spares reading
    it) and the HISM loss terms vanish, so the engine's loss is the plain MSE.
    """
    return config.replace(
        arch="spot_resnet18",
        levels=(1,),
        aux_weight=0.0,
        align_weight=0.0,
        region_px=config.spot_px,
        region_um=config.spot_um,
        level_norm="shared",
    )


class SpotOnly(nn.Module):
    """ResNet-18 on the spot patch → global average pool → dropout → ``Linear(8·width, G)``.

    ``forward(spot, region)`` takes and ignores ``region`` so that training, inference and
    checkpoints treat it like :class:`~hifusion_model.models.hifusion.HiFusion`; it returns a
    :class:`~hifusion_model.models.hifusion.HiFusionOutput` with one level and no attention tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if config.arch != "spot_resnet18":
            raise ConfigError(f"SpotOnly needs arch 'spot_resnet18', got {config.arch!r}")
        self.config = config
        self.spot_encoder = resnet18_trunk(config.width)
        self.head = nn.Sequential(
            nn.Dropout(config.head_dropout), nn.Linear(config.feature_dim, config.n_genes)
        )

    def forward(self, spot: Tensor, region: Tensor | None = None) -> HiFusionOutput:
        px = self.config.spot_px
        if spot.ndim != 4 or tuple(spot.shape[1:]) != (3, px, px) or not spot.is_floating_point():
            raise ConfigError(
                f"SpotOnly spot must be (B, 3, {px}, {px}) float in [0, 1], "
                f"got {tuple(spot.shape)} {spot.dtype}"
            )
        x = zscore_per_channel(spot) if self.config.input_norm == "image" else spot
        features = self.spot_encoder(x)
        with full_precision(spot.device):  # as in HiFusion: the head in fp32 under autocast
            features = features.float()
            prediction = self.head(features.mean(dim=(-2, -1)))
        return HiFusionOutput(
            prediction=prediction,
            level_predictions=[prediction],
            level_features=[features],
            fusion_weights=prediction.new_ones(1),
            attention=prediction.new_zeros(len(spot), 0, 1, 0),
        )


__all__ = ["SpotOnly", "spot_only_config"]
