"""Scoring a model on the held-out spots during training, sharded over the ranks of a run."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..devices import autocast
from ..evaluation.metrics import evaluate_predictions
from .distributed import DistInfo, gather_on_main
from .sources import Data


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A batch tensor on ``device``; images channels-last, as the trainer's model is."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.inference_mode()
def _predict_shard(model: nn.Module, data: Data, n_genes: int, *, batch_size: int, workers: int,
                   device: torch.device, dtype: torch.dtype | None,
                   info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets of this rank's contiguous shard of the validation spots."""
    shard = np.array_split(np.arange(len(data.val)), info.world)[info.rank]  # type: ignore[arg-type]
    loader = DataLoader(Subset(data.val, shard), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    preds, truths = [], []
    for batch in loader:
        with autocast(device, dtype):
            out = model(to_device(batch["spot"], device), to_device(batch["region"], device))
        preds.append(out.prediction.float().cpu().numpy())
        truths.append(batch["target"].numpy())
    empty = np.zeros((0, n_genes), np.float32)
    return (np.concatenate(preds) if preds else empty,
            np.concatenate(truths) if truths else empty)


def validate(model: nn.Module, data: Data, genes: list[str], *, batch_size: int, workers: int,
             device: torch.device, dtype: torch.dtype | None,
             info: DistInfo) -> dict[str, Any] | None:
    """``model``'s metrics (in eval mode) on ``data.val``: on rank 0, ``None`` on the others.

    Every rank predicts its shard; rank 0 gathers them in order and scores them, as plain str
    and float values (no numpy scalars: the resume state loads with ``weights_only``).
    """
    part = _predict_shard(model.eval(), data, len(genes), batch_size=batch_size,
                          workers=workers, device=device, dtype=dtype, info=info)
    parts = gather_on_main(part, info)
    if parts is None:
        return None
    metrics = evaluate_predictions(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
        sections=data.val_labels, genes=genes, train_mean=data.train_mean)
    return json.loads(json.dumps(metrics))


__all__ = ["to_device", "validate"]
