"""The weights a run starts from: fresh, a fine-tuned checkpoint's, or pretrained encoders.

* **Fresh heads start at the training mean** (their biases), so the first step already predicts
  the constant baseline and training learns the deviations from it.
* **Pretrained encoders** (``spot_encoder_init`` / ``region_encoder_init``) start the spot
  encoder (ResNet-18) / region encoder (ResNet-10) from a trunk state dict (``hifusion
  pretrain``'s self-supervised weights) instead of random weights.
* **Fine-tuning** (``init``) starts from a checkpoint's weights and architecture. When a
  different gene list is asked for, every gene-dependent weight (the output heads) is
  re-initialised and the rest is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.backbones import load_torchvision_resnet18
from ..models.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path
from ..models.config import ModelConfig
from ..models.registry import build_model


def load_init(init: str | os.PathLike | None) -> Checkpoint | None:
    """The checkpoint to fine-tune (a path or ``"bundled"``), if any."""
    return None if init is None else load_checkpoint(resolve_checkpoint_path(init))


def gene_dependent_keys(config: ModelConfig) -> set[str]:
    """Weights whose shape depends on the number of genes (the heads), found by a meta build."""
    with torch.device("meta"):
        ref = build_model(config).state_dict()
        probe = build_model(config.replace(genes=[*config.genes, "__probe__"])).state_dict()
    return {k for k in ref if ref[k].shape != probe[k].shape}


def _apply_init(model: nn.Module, ckpt: Checkpoint) -> list[str]:
    """Copy ``ckpt``'s weights into ``model``; heads stay fresh if the genes differ (returned)."""
    fresh = set() if ckpt.genes == model.config.genes else gene_dependent_keys(model.config)
    own = model.state_dict()
    state = {k: v for k, v in ckpt.state_dict.items() if k not in fresh}
    bad = [k for k in own if k not in fresh and (k not in state or state[k].shape != own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{ckpt.path}: its weights do not fit the model to fine-tune (e.g. {bad[0]}); "
            "fine-tuning keeps the checkpoint's architecture, so drop --model-config"
        )
    model.load_state_dict(state, strict=False)
    return sorted(fresh)


def start_heads_at_mean(model: nn.Module, keys: Iterable[str], train_mean: np.ndarray) -> None:
    """Set the biases of fresh heads to the training mean: training starts at the constant baseline.

    Targets are log-relative (around -5), far from a fresh head's ~0 output; starting at the
    mean spares the first epochs of learning the offset and lets the loss measure what matters,
    the deviations from the mean.
    """
    state = model.state_dict()
    mean = torch.as_tensor(train_mean, dtype=torch.float32)
    with torch.no_grad():
        for k in keys:
            if state[k].ndim == 1:
                state[k].copy_(mean)


def _encoder_trunk(model: nn.Module, encoder: str) -> nn.Module:
    """The network's ``spot`` or ``region`` encoder, for pretrained weights to go into."""
    trunk = getattr(model, f"{encoder}_encoder", None)
    if trunk is None:
        raise ConfigError(f"the {type(model).__name__} network has no {encoder} encoder to "
                          "start from pretrained weights")
    return trunk


def initial_model(config: ModelConfig, init: Checkpoint | None,
                  encoder_init: Mapping[str, Path], train_mean: np.ndarray,
                  ) -> tuple[nn.Module, list[str]]:
    """The network to train, and the weights of ``init`` it re-initialised (new genes).

    Random weights come from the global generators: seed them first for a reproducible start.
    """
    model = build_model(config)
    for encoder, path in encoder_init.items():
        load_torchvision_resnet18(_encoder_trunk(model, encoder), path)
    reinitialised = _apply_init(model, init) if init is not None else []
    fresh = reinitialised if init is not None else gene_dependent_keys(config)
    start_heads_at_mean(model, fresh, train_mean)
    return model, reinitialised


__all__ = ["gene_dependent_keys", "initial_model", "load_init", "start_heads_at_mean"]
