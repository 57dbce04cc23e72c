"""The networks by name, in the manner of timm's ``create_model``: one place that says which
architectures exist and how each is configured.

>>> sorted(available_models())
['hifusion', 'hifusion_tiny', 'spot_resnet18']
>>> model = create_model("hifusion_tiny", genes=["ERBB2", "KRT19"])
>>> model.config.n_genes, model.config.arch
(2, 'hifusion')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from .config import ModelConfig, tiny_config
from .hifusion import HiFusion
from .spot_only import SpotOnly, spot_only_config

#: ``ModelConfig.arch`` -> the network class it builds
_NETWORKS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "hifusion": HiFusion,
    "spot_resnet18": SpotOnly,
}

#: name -> (what it is, how to configure it for a gene panel)
_MODELS: dict[str, tuple[str, Callable[[list[str]], ModelConfig]]] = {}


def register_model(name: str, description: str):
    """Decorator: register ``fn(genes) -> ModelConfig`` under ``name``."""
    def add(fn: Callable[[list[str]], ModelConfig]) -> Callable[[list[str]], ModelConfig]:
        _MODELS[name] = (description, fn)
        return fn
    return add


@register_model("hifusion", "HiFusion as published: ResNet-18 spot encoder at three HISM levels, "
                "ResNet-10 region query, cross-attention (224-px spots, 448-px regions)")
def _hifusion(genes: list[str]) -> ModelConfig:
    return ModelConfig(genes=genes)


@register_model("hifusion_tiny", "HiFusion's structure at 1/8 of the channels and 56-px spots: "
                "for tests and smoke runs")
def _hifusion_tiny(genes: list[str]) -> ModelConfig:
    return tiny_config(genes)


@register_model("spot_resnet18", "spot-only ResNet-18 (ST-Net style): the spot patch, global "
                "pooling, one linear head; the baseline HiFusion must beat")
def _spot_resnet18(genes: list[str]) -> ModelConfig:
    return spot_only_config(ModelConfig(genes=genes))


def build_model(config: ModelConfig) -> nn.Module:
    """The network ``config.arch`` names: :class:`~.hifusion.HiFusion`, or the spot-only
    ResNet-18 baseline (:class:`~.spot_only.SpotOnly`).

    Every network takes ``(spot, region)`` and returns a :class:`~.hifusion.HiFusionOutput`.
    """
    return _NETWORKS[config.arch](config)


def available_models() -> dict[str, str]:
    """Name -> one-line description of every registered network."""
    return {name: description for name, (description, _) in _MODELS.items()}


def model_config(name: str, genes: Sequence[str], **overrides: Any) -> ModelConfig:
    """The :class:`~.config.ModelConfig` of the named network for ``genes``, with overrides."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}")
    if not genes:
        raise ConfigError("a model needs at least one gene to predict")
    config = _MODELS[name][1](list(genes))
    return config.replace(**overrides) if overrides else config


def create_model(name: str = "hifusion", *, genes: Sequence[str], **overrides: Any) -> nn.Module:
    """A freshly initialised network, e.g. ``create_model("hifusion", genes=panel)``; the keyword
    ``overrides`` are :class:`~.config.ModelConfig` fields (``width=32``, ``spot_um=150``)."""
    return build_model(model_config(name, genes, **overrides))


__all__ = ["available_models", "build_model", "create_model", "model_config", "register_model"]
