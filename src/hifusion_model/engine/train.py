"""Training: a recipe applied to sections, validated without leakage, resumable, multi-GPU.

:func:`train` runs in stages, each a :class:`~.trainer.Trainer` run:

* **Selection.** Validation never sees training data: either given sections (``val_sections``)
  or spatial blocks of the training sections (:mod:`hifusion_model.data.splits`). The kept
  checkpoint is the epoch with the best validation. With ``val_fraction`` 0 (and no validation
  sections) nothing is held out, the last epoch is kept and there is no further stage.
* **Refit** (``recipe.refit``): on a small section the held-out spots are data the model never
  learns from, so the validated run becomes ``OUT.selection.pt`` and ``OUT`` is retrained on
  every spot, on the same schedule, up to the epoch that run chose (twice the time).
* **Resume.** A stopped stage continues from its resume state (:mod:`.state`), with the recipe
  and model configuration stored there; a selection run that finished before its refit began
  starts the refit.

The weights a run starts from (fresh heads at the training mean, pretrained encoders, a
fine-tuned checkpoint) are :mod:`.starting_weights`'; the model card is :mod:`.card`'s.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import torch

from ..data.expression import select_top_genes
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError
from ..future.pseudo_labels import PseudoLabels
from ..inference.uncertainty import fit_on_sections
from ..io_utils import atomic_path
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..models.config import ModelConfig
from ..progress import Progress, ShouldStop
from .card import ModelCard, Refit
from .distributed import distributed, from_main
from .recipes import DEFAULT_RECIPE, TrainConfig, get_recipe
from .sources import (
    Data,
    Source,
    check_disjoint,
    check_pseudo_validation,
    open_sources,
    prepare_data,
    pseudo_sources,
)
from .starting_weights import load_init
from .state import check_same_sections, companion_paths, read_resume
from .trainer import Runtime, Stage, Trainer, TrainResult


def _model_config(recipe: TrainConfig, genes: int | Sequence[str] | None,
                  template: ModelConfig | None, sources: list[Source],
                  init: Checkpoint | None) -> ModelConfig:
    """The architecture to train: the init's or the template's, with genes and recipe overrides."""
    if genes is None and init is not None:
        chosen = list(init.genes)
    elif genes is None or isinstance(genes, int):
        chosen = select_top_genes([s.adata for s in sources],
                                  recipe.n_genes if genes is None else genes)
    else:
        chosen = [str(g) for g in genes]
    base = init.config if init else (template or ModelConfig(genes=chosen))
    changes: dict[str, Any] = {"genes": chosen}
    for key in ("head_dropout", "align_weight"):
        if getattr(recipe, key) is not None:
            changes[key] = getattr(recipe, key)
    if recipe.level_norm is not None and init is None:  # init keeps its buffers
        changes["level_norm"] = recipe.level_norm
    return base.replace(**changes)


def _stored_setup(state: dict[str, Any]) -> tuple[TrainConfig, ModelConfig]:
    """The recipe and architecture a resume state was written with."""
    return TrainConfig.from_dict(state["recipe"]), ModelConfig.from_dict(state["config"])


def _is_refit(path: Path) -> bool:
    """Whether ``path`` holds a finished refit (not the selection model it starts as)."""
    return path.is_file() and "refit" in load_checkpoint(path).card


@dataclass
class _Session:
    """Everything one call of :func:`train` shares between its stages (selection, refit)."""

    out: Path
    train_sources: list[Source]
    val_sources: list[Source] | None
    runtime: Runtime
    command: Sequence[str] | None
    #: starting weights of the encoders, by ``ENCODERS`` name (a fresh run)
    encoder_init: dict[str, Path] = field(default_factory=dict)
    #: (genes and spot scale, the fitted noise model's card entry), once fitted
    _noise: tuple[Any, dict[str, Any]] | None = field(default=None, init=False, repr=False)

    @property
    def every_source(self) -> list[Source]:
        return [*self.train_sources, *(self.val_sources or [])]

    def start(self, config: ModelConfig, recipe: TrainConfig, init: Checkpoint | None,
              state: dict[str, Any] | None = None) -> TrainResult:
        """Train with validation (a refit recipe writes it to ``OUT.selection.pt``), then refit.

        Without validation (``val_fraction`` 0, no ``--val``) there is no epoch to choose and
        nothing held out to refit on: one run trains every spot to the end of the schedule."""
        check_pseudo_validation(self.train_sources, self.val_sources, recipe)
        refit = recipe.refit and (bool(self.val_sources) or recipe.val_fraction > 0)
        target = companion_paths(self.out)["selection"] if refit else self.out
        data = prepare_data(self.train_sources, self.val_sources, config, recipe)
        card = ModelCard.from_dict(state["card"]) if state else self._card(recipe, config, data,
                                                                            init)
        result = self._fit(Stage(data, config, recipe, target, card, init), state)
        if not refit:
            return result
        if init is None and card.init:  # a resumed selection run: reload the init weights
            init = load_init(card.init)
        # only rank 0 validated: every rank must stop at its epoch
        epoch, validation = from_main([result.best_epoch, result.validation], self.runtime.info)
        stage = Refit(epoch, validation, str(target), data.split, card.command)
        return self.refit(config, recipe, init, stage)

    def refit(self, config: ModelConfig, recipe: TrainConfig, init: Checkpoint | None,
              refit: Refit, state: dict[str, Any] | None = None) -> TrainResult:
        """Retrain on every spot up to the chosen epoch; ``OUT`` holds the selection model
        till then."""
        if state is None and self.runtime.info.is_main:
            with atomic_path(self.out) as tmp:
                shutil.copyfile(refit.selection, tmp)
        data = prepare_data(self.every_source, None, config, recipe, refit=True)
        card = ModelCard.from_dict(state["card"]) if state else self._card(recipe, config, data,
                                                                            init)
        return self._fit(Stage(data, config, recipe, self.out, card, init, refit), state)

    def resume(self) -> TrainResult:
        """Continue where a stopped run left off: a plain run, the selection run, or the refit."""
        paths = companion_paths(self.out)
        selection = paths["selection"]
        if paths["resume"].is_file():  # a plain run, or the refit stage
            state = read_resume(paths["resume"])
            refit = state.get("refit")
            sources = self.every_source if refit else self.train_sources
            check_same_sections(paths["resume"], list(state["sections"]), sources,
                                state.get("fingerprints"))
            recipe, config = _stored_setup(state)
            self.encoder_init = ModelCard.from_dict(state["card"]).encoder_init
            if refit:
                return self.refit(config, recipe, None, Refit.from_dict(refit), state)
            return self.start(config, recipe, None, state)
        if companion_paths(selection)["resume"].is_file():  # the selection run of a refit
            state = read_resume(companion_paths(selection)["resume"])
            check_same_sections(selection, list(state["sections"]), self.train_sources,
                                state.get("fingerprints"))
            recipe, config = _stored_setup(state)
            self.encoder_init = ModelCard.from_dict(state["card"]).encoder_init
            return self.start(config, recipe, None, state)
        if selection.is_file() and not _is_refit(self.out):  # selected; the refit never began
            ckpt = load_checkpoint(selection)
            card = ModelCard.from_dict(ckpt.card)
            check_same_sections(selection, card.data, self.train_sources,
                                [s.get("fingerprint") if isinstance(s, dict) else None
                                 for s in card.sections])
            self.encoder_init = card.encoder_init
            chosen = card.outcome
            if chosen is None:
                raise CheckpointError(f"{selection} records no chosen epoch to refit to; start "
                                      "without --resume")
            refit = Refit(chosen.epoch, chosen.validation, str(selection), card.split,
                          card.command)
            return self.refit(ckpt.config, card.recipe.replace(refit=True),
                              load_init(card.init), refit)
        raise CheckpointError(
            f"nothing to resume: {paths['resume']} does not exist (the run finished, or never "
            "completed a step); start without --resume"
        )

    def _card(self, recipe: TrainConfig, config: ModelConfig, data: Data,
              init: Checkpoint | None) -> ModelCard:
        info = self.runtime.info
        return ModelCard.new(
            recipe=recipe, config=config, sections=data.sections, split=data.split,
            init=str(init.path) if init is not None else None, command=self.command,
            device=self.runtime.device, world_size=info.world, encoder_init=self.encoder_init,
            noise_model=self._noise_model(config))

    def _noise_model(self, config: ModelConfig) -> dict[str, Any]:
        """The per-spot uncertainty's library fit (:mod:`~.uncertainty`) on every measured
        spot; fitted once for both stages of a refit."""
        key = (tuple(config.genes), config.spot_um, config.spot_px)
        if self._noise is None or self._noise[0] != key:
            measured = [(s.adata, s.slide) for s in self.every_source if s.pseudo is None]
            self._noise = (key, fit_on_sections(measured, config).to_dict())
        return self._noise[1]

    def _fit(self, stage: Stage, state: dict[str, Any] | None) -> TrainResult:
        """Run ``stage`` from the encoder weights given, or on from ``state`` (its weights)."""
        if not state:
            stage = dataclasses.replace(stage, encoder_init=self.encoder_init)
        trainer = Trainer(stage, self.runtime)
        if state:
            trainer.load_state(state)
        return trainer.fit()


def train(
    sections: Sequence[str | os.PathLike | ad.AnnData],
    out: str | os.PathLike,
    *,
    recipe: TrainConfig | str = DEFAULT_RECIPE,
    model_config: ModelConfig | None = None,
    genes: int | Sequence[str] | None = None,
    val_sections: Sequence[str | os.PathLike | ad.AnnData] | None = None,
    pseudo_labels: Sequence[str | os.PathLike | PseudoLabels] | None = None,
    init: str | os.PathLike | None = None,
    spot_encoder_init: str | os.PathLike | None = None,
    region_encoder_init: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    workers: int = 0,
    command: Sequence[str] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train HiFusion on ``sections`` (``.h5ad`` paths or AnnData); the best model goes to ``out``.

    ``model_config`` is an architecture template (its genes are replaced by the chosen ones);
    ``genes`` is a count of top genes, a list, or ``None`` (the recipe's ``n_genes``, or the
    ``init`` model's genes). ``spot_encoder_init`` starts the spot encoder from a ResNet-18
    state dict (self-supervised weights from ``hifusion pretrain``, or torchvision's) instead of
    random weights; ``region_encoder_init`` the region encoder from a ResNet-10 state dict
    (``hifusion pretrain --encoder region``). With ``recipe.refit`` the validated run goes to
    ``OUT.selection.pt`` and ``out`` is then retrained on every spot (``val_sections``
    included) up to the epoch that run chose. ``pseudo_labels`` (files from ``hifusion
    pseudolabel``) add spots between the measured ones, trained on their teachers' predictions;
    they never validate and do not choose the genes, and need ``val_fraction`` 0 or
    ``val_sections``. ``resume`` continues from the resume state of
    whichever stage was stopped, with the recipe and model configuration stored there. Raises
    :class:`Cancelled` when ``should_stop()`` turns true, after writing a loadable model and the
    resume state.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if init is not None and model_config is not None:
        raise ConfigError(
            "give either an init checkpoint or a model configuration: fine-tuning keeps the "
            "checkpoint's architecture"
        )
    encoder_init = {encoder: Path(path) for encoder, path in
                    (("spot", spot_encoder_init), ("region", region_encoder_init))
                    if path is not None}
    if encoder_init and (init is not None or resume):
        raise ConfigError(
            "encoder weights start a new run: with an init checkpoint the checkpoint's "
            "encoder is used, and a resumed run continues with the weights it started from"
        )
    with distributed(str(device)) as info:
        measured = open_sources(sections, "training")
        train_sources = [*measured, *pseudo_sources(pseudo_labels or [], measured)]
        val_sources = open_sources(val_sections, "validation") if val_sections else None
        check_disjoint(train_sources, val_sources or [])
        runtime = Runtime(resolve_device(device, local_rank=info.local_rank), info, workers,
                          progress, should_stop, on_epoch)
        session = _Session(Path(out), train_sources, val_sources, runtime, command, encoder_init)
        if resume:
            return session.resume()
        init_ckpt = load_init(init)
        if isinstance(genes, int):
            recipe = recipe.replace(n_genes=genes)
        config = _model_config(recipe, genes, model_config, measured, init_ckpt)
        return session.start(config, recipe, init_ckpt)


__all__ = ["TrainResult", "train"]
