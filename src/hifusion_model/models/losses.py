"""HiFusion's training objective: main regression + per-level auxiliary regression + alignment.

``total = MSE(prediction, y) + aux_weight · Σ_levels MSE(level_prediction, y)
+ align_weight · Σ_{levels ≠ 1} mean|f_1 − f_level|``, with ``f`` the level feature maps after
size alignment (released: aux_weight = 1/3, align_weight = 0.5). The alignment term pulls tile
features towards the whole-spot features so the scales stay semantically comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .config import ModelConfig
from .hifusion import HiFusionOutput


@dataclass
class LossTerms:
    """The weighted ``total`` to back-propagate and its unweighted parts, for logging."""

    total: Tensor
    main: Tensor  #: MSE of the final prediction
    aux: Tensor  #: Σ over levels of the level predictions' MSE (before aux_weight)
    align: Tensor  #: Σ over levels ≠ 1 of the L1 distance to level 1 (before align_weight)

    def item(self) -> dict[str, float]:
        """Plain floats (one device sync) for logs and progress bars."""
        return {"total": self.total.item(), "main": self.main.item(), "aux": self.aux.item(),
                "align": self.align.item()}


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error, each gene's column scaled by ``weights`` ``(G,)`` when given."""
    if weights is None:
        return F.mse_loss(prediction, target)
    return ((prediction - target).square() * weights).mean()


def hifusion_loss(output: HiFusionOutput, target: Tensor, config: ModelConfig,
                  gene_weights: Tensor | None = None) -> LossTerms:
    """The released HiFusion loss for ``target`` of shape ``(B, G)``, computed in float32.

    ``gene_weights`` (``(G,)``, mean 1) re-weights the genes in the regression terms.
    """
    if target.shape != output.prediction.shape:
        raise ConfigError(
            f"targets have shape {tuple(target.shape)} but the model predicts "
            f"{tuple(output.prediction.shape)}; the genes of the data and the model must match"
        )
    target = target.float()
    main = weighted_mse(output.prediction.float(), target, gene_weights)
    aux = sum(weighted_mse(p.float(), target, gene_weights) for p in output.level_predictions)
    whole = output.level_features[config.levels.index(1)].float()
    align = sum(
        (whole - f.float()).abs().mean()
        for k, f in zip(config.levels, output.level_features)
        if k != 1
    )
    align = align if isinstance(align, Tensor) else main.new_zeros(())  # levels == (1,)
    total = main + config.effective_aux_weight * aux + config.align_weight * align
    return LossTerms(total=total, main=main, aux=aux, align=align)


__all__ = ["LossTerms", "hifusion_loss", "weighted_mse"]
