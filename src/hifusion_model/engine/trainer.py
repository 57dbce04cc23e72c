"""The epoch loop of one training run: steps, validation, the kept model and its resume state.

The kept checkpoint is the epoch with the best validation (the recipe's ``select_on``: highest
mean per-gene PCC, or lowest MSE); in a refit, the epoch its selection run chose; without
validation, the last. Under ``torchrun`` the model is wrapped in DistributedDataParallel, each
rank trains on its share (``DistributedSampler``), validation is predicted in shards and
gathered on rank 0, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data.splits import mixed_seed
from ..devices import autocast, autocast_dtype
from ..errors import Cancelled, HiFusionError, SectionError
from ..models.checkpoint import Checkpoint, save_checkpoint
from ..models.config import ModelConfig
from ..models.losses import hifusion_loss
from ..progress import Progress, ShouldStop
from .card import ModelCard, Outcome, Refit
from .curves import LossTally, validation_fields, write_curves
from .distributed import DistInfo, any_rank
from .optim import build_optimizer, gene_weights, lr_factor, pretrained_encoders, weight_average
from .recipes import TrainConfig
from .sources import Data, EpochAugmented, SkipSampler
from .starting_weights import initial_model
from .state import companion_paths, rng_state, seed_everything, set_rng_state, write_resume
from .validation import to_device, validate


@dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoint: Path  #: the best model on validation
    curves_path: Path  #: per-epoch curves (JSON; a CSV lies beside it)
    best_epoch: int  #: 1-based
    validation: dict[str, Any]  #: ``evaluate_predictions`` of the best epoch
    curves: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Runtime:
    """Where and how runs execute, and who listens: the same for every stage of a ``train()``."""

    device: torch.device
    info: DistInfo
    workers: int = 0
    progress: Progress | None = None
    should_stop: ShouldStop | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class Stage:
    """What one run trains, on what, and where its model goes."""

    data: Data
    config: ModelConfig
    recipe: TrainConfig
    out: Path
    card: ModelCard
    init: Checkpoint | None = None
    refit: Refit | None = None
    #: encoder weights to start from (empty when resuming: the state holds the weights)
    encoder_init: Mapping[str, Path] = field(default_factory=dict)


class Trainer:
    """One training run: owns the model, optimiser, loaders, curves and the files it writes."""

    def __init__(self, stage: Stage, runtime: Runtime) -> None:
        self.stage, self.run = stage, runtime
        self.data, self.config, self.recipe, self.out = (stage.data, stage.config, stage.recipe,
                                                         stage.out)
        self.device, self.info = runtime.device, runtime.info
        self.last_epoch = stage.refit.epoch if stage.refit else self.recipe.epochs
        #: whether epochs are validated (not in a refit, nor when no spot is held out)
        self.validates = stage.refit is None and self.data.val is not None
        self.paths = companion_paths(self.out)
        self.dtype = autocast_dtype(self.device, self.recipe.precision, training=True)

        seed_everything(self.recipe.seed)  # identical initial weights on every rank
        model, self.reinitialised = initial_model(self.config, stage.init, stage.encoder_init,
                                                  self.data.train_mean)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.ema = weight_average(self.model, self.recipe.ema_decay)
        self.gene_weights = gene_weights(self.recipe, self.data.train_var, self.device)
        self.ddp = (nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.info.active else self.model)

        self.loader_generator = torch.Generator()
        self.sampler = SkipSampler(DistributedSampler(
            self.data.train, num_replicas=self.info.world, rank=self.info.rank, shuffle=True,
            seed=self.recipe.order_seed))
        per_rank, batch = len(self.sampler.base), self.recipe.batch_size
        if per_rank < batch:
            raise SectionError(f"only {per_rank} training spots per process, fewer than one batch "
                               f"of {batch}; lower --batch-size or add sections")
        self.steps_per_epoch = per_rank // batch  # drop_last: batch norm hates 1-spot batches
        self.optimizer = build_optimizer(self.model, self.recipe, pretrained_encoders(
            model, init=stage.card.init, encoder_init=stage.card.encoder_init))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.recipe, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)

        self.epoch, self.step = 0, 0
        self.curves: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "val_mse": math.inf, "val_gene_pcc": -math.inf}
        self.best_written = stage.refit is not None  # a refit starts from the selection's copy
        self.loss = LossTally()

    # -- resume state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(self.loader_generator),
            "curves": self.curves, "best": self.best,
            "loss_sum": self.loss.total, "loss_parts": self.loss.parts.tolist(),
            "recipe": self.recipe.to_dict(), "config": self.config.to_dict(),
            "sections": [s["name"] for s in self.data.sections],
            "fingerprints": [s.get("fingerprint") for s in self.data.sections],
            "card": self.stage.card.to_dict(),
            "refit": self.stage.refit.to_dict() if self.stage.refit else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.curves, self.best = list(state["curves"]), dict(state["best"])
        self.loss = LossTally(state["loss_sum"], state["loss_parts"])
        self.best_written = self.out.is_file()
        if self.step:  # mid-epoch: continue the generators exactly where they stopped
            set_rng_state(state["rng"], self.loader_generator)

    def save_state(self) -> None:
        if self.info.is_main:
            write_resume(self.paths["resume"], self.state())

    # -- loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            while self.epoch < self.last_epoch:
                self._run_epoch()
        except KeyboardInterrupt:
            self._stop_here()
            raise
        if self.info.is_main:
            self.paths["resume"].unlink(missing_ok=True)  # finished: nothing left to resume
        return TrainResult(self.out, self.paths["curves_json"], int(self.best["epoch"]),
                           self.best.get("validation") or {}, [dict(r) for r in self.curves])

    def _run_epoch(self) -> None:
        start = time.perf_counter()
        seed = self.recipe.order_seed
        if self.step == 0:
            seed_everything(mixed_seed(seed, self.epoch, self.info.rank))
            self.loader_generator.manual_seed(mixed_seed(seed, self.epoch, 1_000_003))
            self.loss = LossTally()
        self.sampler.base.set_epoch(self.epoch)
        if isinstance(self.data.train, EpochAugmented):
            self.data.train.epoch = self.epoch
        self.sampler.skip = self.step * self.recipe.batch_size
        loader = DataLoader(self.data.train, batch_size=self.recipe.batch_size,
                            sampler=self.sampler, drop_last=True, num_workers=self.run.workers,
                            generator=self.loader_generator,
                            pin_memory=self.device.type == "cuda")
        self.ddp.train()
        batches = iter(loader)
        while self.step < self.steps_per_epoch:
            if self.run.should_stop is not None and any_rank(
                    bool(self.run.should_stop()), self.info, self.device):
                self._stop_here()
                raise Cancelled(
                    f"training stopped at epoch {self.epoch + 1}, step {self.step}; the best "
                    f"model so far is in {self.out}; continue with --resume"
                )
            self._train_step(next(batches))
        del batches
        self._end_epoch(time.perf_counter() - start)

    def _train_step(self, batch: dict[str, Tensor]) -> None:
        spot, region, target = (to_device(batch[k], self.device)
                                for k in ("spot", "region", "target"))
        with autocast(self.device, self.dtype):
            output = self.ddp(spot, region)
        terms = hifusion_loss(output, target, self.config, self.gene_weights)
        if not torch.isfinite(terms.total) and not self.scaler.is_enabled():
            raise HiFusionError(
                f"training diverged at epoch {self.epoch + 1}, step {self.step + 1} (loss is "
                f"{terms.total.item()}); lower the learning rate (--lr) or use --precision fp32"
            )
        self.scaler.scale(terms.total).backward()
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.recipe.lr_step == "step":
            self.scheduler.step()
        self.step += 1
        parts = terms.item()
        self.loss.add(parts)
        if self.run.progress and self.info.is_main:
            stage = "refit epoch" if self.stage.refit else "epoch"
            self.run.progress(self.epoch * self.steps_per_epoch + self.step,
                              self.last_epoch * self.steps_per_epoch,
                              f"{stage} {self.epoch + 1}/{self.last_epoch} "
                              f"loss {parts['total']:.4f}")

    def _end_epoch(self, seconds: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        if self.recipe.lr_step == "epoch":
            self.scheduler.step()
        metrics = self.validate() if self.validates else None
        record = None
        if self.info.is_main:
            record = {"epoch": self.epoch + 1, **self.loss.means(self.step),
                      **validation_fields(metrics), "lr": lr, "seconds": seconds,
                      "refit": self.stage.refit is not None}
            record["best"] = self._is_best(record)
            self.curves.append(record)
            if record["best"]:
                self.best = {"epoch": self.epoch + 1, "val_mse": record["val_mse"],
                             "val_gene_pcc": record["val_gene_pcc"],
                             "validation": self.stage.refit.validation if self.stage.refit
                             else metrics}
                self._save_model()
            write_curves(self.curves, self.paths["curves_json"], self.paths["curves_csv"])
        self.epoch, self.step = self.epoch + 1, 0
        if self.epoch < self.last_epoch:
            self.save_state()
        if record is not None and self.run.on_epoch:
            self.run.on_epoch(dict(record))

    def _is_best(self, record: dict[str, Any]) -> bool:
        """The best validation so far (see the module docstring)."""
        if not self.validates:
            return record["epoch"] == self.last_epoch
        if self.recipe.select_on == "gene_pcc":
            return record["val_gene_pcc"] > self.best.get("val_gene_pcc", -math.inf)
        return record["val_mse"] < self.best["val_mse"]

    def _stop_here(self) -> None:
        """Leave a loadable model (the current one if none is saved yet) and a resume state."""
        if not self.info.is_main:
            return
        if not self.best_written:
            self._save_model(stopped=True)
        self.save_state()

    # -- validation --------------------------------------------------------------------------
    @property
    def shipped_model(self) -> nn.Module:
        """What is validated and saved: the weight average when the recipe keeps one."""
        return self.model if self.ema is None else self.ema.module

    def validate(self) -> dict[str, Any] | None:
        """The shipped model's metrics on the validation spots (on rank 0; None elsewhere)."""
        metrics = validate(self.shipped_model, self.data, self.config.genes,
                           batch_size=2 * self.recipe.batch_size, workers=self.run.workers,
                           device=self.device, dtype=self.dtype, info=self.info)
        self.ddp.train()
        return metrics

    def _save_model(self, stopped: bool = False) -> None:
        notes = None
        if stopped:
            notes = (f"stopped during epoch {self.epoch + 1}"
                     + (" before any validation" if self.validates else "")
                     + "; these are the weights at that moment")
        outcome = Outcome(self.best["epoch"], self.epoch + (0 if stopped else 1),
                          self.best.get("validation"), self.reinitialised, self.stage.refit,
                          notes)
        save_checkpoint(self.out, self.shipped_model, train_mean=self.data.train_mean,
                        card=self.stage.card.with_outcome(outcome).to_dict())
        self.best_written = True


__all__ = ["Runtime", "Stage", "TrainResult", "Trainer"]
