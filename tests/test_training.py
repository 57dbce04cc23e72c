"""Training engine: recipes, the leak-free validation split, schedules, resume, cancel, fine-tuning.

The end-to-end tests train a tiny model (``tiny_config``: 56 px spots, width 8) on 40 neighbouring
spots of a synthetic ST array (``spot_array``: HER2ST's geometry, the image cropped around them);
one ``her2st`` test trains on a real HER2ST section cut the same way (``her2st_crop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch

from hifusion_model.cli._options import recipe_setting
from hifusion_model.cli.info import format_card
from hifusion_model.data.expression import select_top_genes
from hifusion_model.data.importers import import_her2st
from hifusion_model.data.sections import new_section, read_section, write_section
from hifusion_model.data.splits import mixed_seed, spatial_block_split
from hifusion_model.engine.curves import format_epoch
from hifusion_model.engine.optim import gene_weights, lr_factor, weight_average
from hifusion_model.engine.recipes import RECIPES, TrainConfig, get_recipe
from hifusion_model.engine.sources import open_sources, prepare_data, read_gene_list
from hifusion_model.engine.starting_weights import gene_dependent_keys
from hifusion_model.engine.state import companion_paths
from hifusion_model.engine.train import train
from hifusion_model.errors import Cancelled, CheckpointError, ConfigError, SectionError
from hifusion_model.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion

N_GENES = 12



def her2st_crop(
    her2st_dir: Path, folder: Path, *, name: str = "B4", n_spots: int = 40, margin_px: int = 260
) -> Path:
    """Write ``folder/<name>.h5ad``: ``n_spots`` neighbouring spots of a section, image cropped."""
    adata = import_her2st(
        her2st_dir / "images" / f"{name}.jpg",
        her2st_dir / "counts" / f"{name}.tsv.gz",
        her2st_dir / "spots" / f"{name}_selection.tsv",
    )
    xy = adata.obsm["spatial"]
    centre = xy[np.argmin(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))]
    keep = np.sort(np.argsort(np.linalg.norm(xy - centre, axis=1))[:n_spots])
    sub = adata[keep].copy()
    image = imagecodecs.imread(her2st_dir / "images" / f"{name}.jpg")
    x0, y0 = np.maximum(np.floor(sub.obsm["spatial"].min(axis=0)) - margin_px, 0).astype(int)
    x1, y1 = np.ceil(sub.obsm["spatial"].max(axis=0)).astype(int) + margin_px
    tif = folder / f"{name}_crop.tif"
    tifffile.imwrite(tif, image[y0:y1, x0:x1], photometric="rgb")
    meta = sub.uns["hifusion"]
    section = new_section(
        sub.obsm["spatial"] - [x0, y0],
        slide=tif,
        mpp=meta["mpp"],
        spot_diameter_um=meta["spot_diameter_um"],
        name=name,
        source="her2st",
        obs_names=sub.obs_names,
        counts=sub.X,
        genes=sub.var_names,
        array_row=sub.obs["array_row"],
        array_col=sub.obs["array_col"],
    )
    return write_section(section, folder / f"{name}.h5ad")


def tiny_recipe(**changes) -> TrainConfig:
    """Our recipe, cut to seconds; without its refit unless a test asks for one."""
    return get_recipe("hifusion", **{"epochs": 2, "batch_size": 8, "warmup_epochs": 0.5,
                                     "refit": False, **changes})


@pytest.fixture(scope="module")
def section(spot_array: Path) -> Path:
    return spot_array


def _train(section: Path, out: Path, **kwargs):
    kwargs.setdefault("recipe", tiny_recipe())
    return train([section], out, model_config=tiny_config(1), genes=N_GENES, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def full_run(section: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted 2-epoch run, shared by the tests that inspect or reproduce it."""
    epochs: list[dict] = []
    out = tmp_path_factory.mktemp("full") / "m.pt"
    result = _train(section, out, on_epoch=epochs.append, command=["hifusion", "train"])
    return result, epochs


# -- recipes ----------------------------------------------------------------------------------
def test_released_recipe_is_the_papers() -> None:
    r = RECIPES["released"]
    assert (r.optimizer, r.lr, r.betas, r.weight_decay, r.min_lr) == (
        "adam",
        1e-3,
        (0.9, 0.999),
        1e-5,
        1e-6,
    )
    assert (r.epochs, r.batch_size, r.lr_step, r.warmup_epochs) == (50, 32, "epoch", 0.0)
    assert (r.flips, r.rotations, r.color_jitter, r.hed_jitter, r.head_dropout) == (
        True,
        True,
        0.0,
        0.0,
        0.0,
    )


def test_recipe_json_round_trip_and_errors() -> None:
    r = get_recipe("hifusion", lr=1e-4, epochs=3)
    assert TrainConfig.from_json(r.to_json()) == r
    assert get_recipe("hifusion", lr=None).lr == RECIPES["hifusion"].lr  # None means "keep"
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        get_recipe("fast")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="unknown training recipe keys"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_a_removed_field_reads_when_off_and_is_refused_when_on() -> None:
    """Old cards record every field of their day: the removed spot shift, off, still loads."""
    old = {**RECIPES["hifusion"].to_dict(), "shift_um": 0.0, "target_smoothing": 0.0}
    assert TrainConfig.from_dict(old) == RECIPES["hifusion"]
    with pytest.raises(ConfigError, match=r"sets shift_um=16: removed .* drop the key"):
        TrainConfig.from_dict({**old, "shift_um": 16})


def test_every_declared_range_and_choice_is_enforced() -> None:
    """One generic check reads the fields' declarations: a value past any of them is refused."""
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        limit, choices = f.metadata.get("limit"), f.metadata.get("choices")
        if choices:
            bad = "nonsense"
        elif limit:
            bad = limit.low - 1 if limit.high is None else limit.high + 1
            bad = (bad, bad) if str(f.type).startswith("tuple") else bad
        else:
            continue
        with pytest.raises(ConfigError, match=rf"^invalid training recipe: {f.name} must be "):
            TrainConfig(**{f.name: bad})
        checked += 1
    assert checked >= 20
    with pytest.raises(ConfigError, match="need min_lr <= lr, got lr=0.001, min_lr=0.01"):
        TrainConfig(lr=1e-3, min_lr=1e-2)


def test_switches_must_be_true_or_false() -> None:
    """``--set refit=yes`` reads as a string, which must not silently switch refit on."""
    with pytest.raises(ConfigError, match="refit must be true or false, got 'yes'"):
        get_recipe("hifusion", refit="yes")
    assert get_recipe("hifusion", refit=True, flips=False).refit is True


def test_released_schedule_is_cosine_annealing_per_epoch() -> None:
    recipe = RECIPES["released"]
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=recipe.epochs, eta_min=recipe.min_lr
    )
    factor = lr_factor(recipe, steps_per_epoch=123)
    for epoch in range(recipe.epochs):
        assert math.isclose(recipe.lr * factor(epoch), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        reference.step()


def test_warmup_then_cosine_to_min_lr() -> None:
    recipe = get_recipe("hifusion", epochs=4, warmup_epochs=1.0)
    f = [lr_factor(recipe, 10)(t) for t in range(40)]
    assert f[:10] == sorted(f[:10]) and f[9] < 1.0  # rising during warm-up
    assert math.isclose(max(f), 1.0) and f[10:] == sorted(f[10:], reverse=True)
    assert f[-1] > recipe.min_lr / recipe.lr
    assert math.isclose(lr_factor(recipe, 10)(40), recipe.min_lr / recipe.lr)


# -- validation split -------------------------------------------------------------------------
def test_spatial_block_split_holds_out_whole_blocks() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(500, 2))
    held = spatial_block_split(xy, fraction=0.15, grid=4, seed=3)
    assert 0.15 <= held.mean() < 0.5
    block = (np.minimum(xy // 250, 3) @ [1, 4]).astype(int)
    for b in np.unique(block):  # every block lies entirely on one side
        assert len(set(held[block == b])) == 1
    assert np.array_equal(held, spatial_block_split(xy, fraction=0.15, grid=4, seed=3))
    assert not np.array_equal(held, spatial_block_split(xy, fraction=0.15, grid=4, seed=4))


def test_spatial_block_split_keeps_training_spots() -> None:
    xy = np.array([[0, 0], [1, 0], [100, 100], [101, 100]], float)
    held = spatial_block_split(xy, fraction=0.9, grid=2)
    assert held.any() and not held.all()
    with pytest.raises(SectionError, match="--val"):
        spatial_block_split(np.zeros((5, 2)), grid=4)


# -- fine-tuning ------------------------------------------------------------------------------
def test_gene_dependent_weights_are_the_heads() -> None:
    keys = gene_dependent_keys(tiny_config(5))
    assert keys == {"level_head.weight", "level_head.bias", "head.2.weight", "head.2.bias"}


# -- end to end ------------------------------------------------------------------------------
def test_train_writes_best_model_curves_and_card(full_run) -> None:
    _check_full_run(*full_run)


@pytest.mark.her2st
@pytest.mark.slow
def test_train_on_a_real_her2st_crop(her2st_dir: Path, tmp_path: Path) -> None:
    """The same run and checks on 40 spots of a real HER2ST section (B4)."""
    epochs: list[dict] = []
    section = her2st_crop(her2st_dir, tmp_path)
    result = _train(section, tmp_path / "m.pt", on_epoch=epochs.append,
                    command=["hifusion", "train"])
    _check_full_run(result, epochs)


def test_the_curves_of_a_run_plot_with_axes_lines_and_the_kept_epoch(full_run, tmp_path,
                                                                       capsys) -> None:
    from PIL import Image

    from hifusion_model.cli import main
    from hifusion_model.evaluation.figures import curve_figure

    result, epochs = full_run
    curves = companion_paths(result.checkpoint)["curves_json"]
    fig = curve_figure(epochs)
    loss_ax, pcc_ax = fig.axes
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert {"train loss", "val mse", "val gene pcc"} <= set(labels)
    kept = [line for line in loss_ax.get_lines() if line.get_label().startswith("_")]
    assert [float(line.get_xdata()[0]) for line in kept] == [result.best_epoch]
    assert (loss_ax.get_xlabel(), pcc_ax.get_ylabel()) == ("epoch", "gene PCC")
    out = tmp_path / "curve.png"
    assert main(["plot", str(curves), "--out", str(out)]) == 0
    assert "the curves of 2 epochs" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 300
    bad = tmp_path / "bad.curves.json"
    bad.write_text('{"epoch": 1}')
    assert main(["plot", str(bad), "--out", str(tmp_path / "b.png")]) == 2
    assert "not the curves of a training run" in capsys.readouterr().err


def _check_full_run(result, epochs: list[dict]) -> None:
    model, ckpt = load_model(result.checkpoint)
    assert ckpt.config.n_genes == N_GENES and ckpt.config.head_dropout == 0.2
    assert [e["epoch"] for e in epochs] == [1, 2]
    best = max(epochs, key=lambda e: e["val_gene_pcc"])  # the recipe's select_on
    assert result.best_epoch == best["epoch"] == ckpt.card["epoch"]
    assert ckpt.card["validation"]["mse"] == pytest.approx(best["val_mse"])
    assert set(ckpt.card["validation"]["gene_pcc_all"]) == set(ckpt.genes)
    data = ckpt.card["sections"][0]
    assert data["name"] == "B4" and data["n_spots"] == 40 and 0 < data["n_val"] < 20
    assert data["n_train"] + data["n_val"] == 40
    assert ckpt.card["command"] == "hifusion train" and ckpt.card["recipe"]["name"] == "hifusion"
    assert ckpt.card["normalization"] == "log_relative" and ckpt.card["spot_um"] == pytest.approx(
        154
    )
    # the baseline is the training mean of the normalised targets: log-relative values are < 0
    assert ckpt.train_mean.shape == (N_GENES,) and (ckpt.train_mean < 0).all()
    curves = json.loads(companion_paths(result.checkpoint)["curves_json"].read_text())
    assert [c["epoch"] for c in curves] == [1, 2] and all(c["seconds"] > 0 for c in curves)
    csv_lines = companion_paths(result.checkpoint)["curves_csv"].read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 3
    assert not companion_paths(result.checkpoint)["resume"].exists()  # finished: nothing to resume


def test_select_on_mse_keeps_the_epoch_of_the_lowest_validation_mse(
    section: Path, tmp_path: Path
) -> None:
    epochs: list[dict] = []
    result = _train(section, tmp_path / "g.pt", on_epoch=epochs.append,
                    recipe=tiny_recipe(epochs=4, select_on="mse"))
    best = min(epochs, key=lambda e: e["val_mse"])
    ckpt = load_checkpoint(result.checkpoint)
    assert result.best_epoch == best["epoch"] == ckpt.card["epoch"]
    assert ckpt.card["validation"]["mse"] == pytest.approx(best["val_mse"])
    with pytest.raises(ConfigError, match="select_on"):
        tiny_recipe(select_on="spot_pcc")


def test_resume_after_interruption_matches_uninterrupted_run(
    section: Path, tmp_path: Path, full_run
) -> None:
    full, _ = full_run
    calls = iter(range(10**6))
    stop_at = 5  # 4 steps per epoch: stops in the middle of epoch 2
    with pytest.raises(Cancelled, match="--resume"):
        _train(section, tmp_path / "cut.pt", should_stop=lambda: next(calls) >= stop_at)
    assert companion_paths(tmp_path / "cut.pt")["resume"].exists()
    resumed = _train(section, tmp_path / "cut.pt", resume=True)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.card["epoch"] == b.card["epoch"]
    for k, v in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[k], v, atol=1e-6, rtol=0, msg=k)
    assert [c["train_loss"] for c in resumed.curves] == pytest.approx(
        [c["train_loss"] for c in full.curves]
    )


def test_cancelled_first_epoch_leaves_loadable_checkpoint(section: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    calls = iter(range(10**6))
    with pytest.raises(Cancelled):
        _train(section, out, should_stop=lambda: next(calls) >= 2)
    model, ckpt = load_model(out)
    assert "before any validation" in ckpt.card["notes"]
    state = torch.load(companion_paths(out)["resume"], weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)


def test_ctrl_c_saves_a_resume_state(section: Path, tmp_path: Path) -> None:
    calls = iter(range(10**6))

    def interrupt() -> bool:
        if next(calls) >= 5:
            raise KeyboardInterrupt
        return False

    out = tmp_path / "m.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(section, out, should_stop=interrupt)
    state = torch.load(companion_paths(out)["resume"], weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1) and load_checkpoint(out).card["epoch"] == 1


def test_validation_sections_replace_the_spatial_split(section: Path, tmp_path: Path) -> None:
    other = read_section(section)
    other.uns["hifusion"]["name"] = "B4-copy"
    result = _train(section, tmp_path / "m.pt", val_sections=[other], recipe=tiny_recipe(epochs=1))
    card = load_checkpoint(result.checkpoint).card
    assert card["sections"][0]["n_val"] == 0 and card["validation"]["n_spots"] == 40
    assert card["validation_split"] == "sections B4-copy"
    assert card["split"] == {"kind": "sections", "sections": ["B4-copy"]}
    with pytest.raises(ConfigError, match="both training and validation"):
        _train(section, tmp_path / "x.pt", val_sections=[section])


def test_gene_list_file(tmp_path: Path) -> None:
    (tmp_path / "genes.txt").write_text("# markers\nERBB2\n\nKRT19  # luminal\n")
    assert read_gene_list(tmp_path / "genes.txt") == ["ERBB2", "KRT19"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no gene names"):
        read_gene_list(tmp_path / "empty.txt")


def test_fine_tune_with_new_genes_keeps_the_trunk(section: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = HiFusion(tiny_config(["ERBB2", "KRT19"]))
    save_checkpoint(tmp_path / "base.pt", base, train_mean=np.zeros(2))
    result = train(
        [section],
        tmp_path / "ft.pt",
        recipe=tiny_recipe(epochs=1, lr=1e-12, min_lr=0.0),
        genes=4,
        init=tmp_path / "base.pt",
        device="cpu",
    )
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config.n_genes == 4 and ckpt.card["reinitialised"] == sorted(
        gene_dependent_keys(ckpt.config)
    )
    trunk = "spot_encoder.conv1.weight"  # moved by at most lr-sized steps
    torch.testing.assert_close(ckpt.state_dict[trunk], base.state_dict()[trunk], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="architecture"):
        train([section], tmp_path / "x.pt", init=tmp_path / "base.pt", model_config=tiny_config(2))


def test_bad_inputs_raise_clear_errors(section: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _train(section, tmp_path / "never.pt", resume=True)
    with pytest.raises(SectionError, match="--batch-size"):
        _train(section, tmp_path / "m.pt", recipe=tiny_recipe(batch_size=64))
    with pytest.raises(SectionError, match="section file not found"):
        _train(tmp_path / "missing.h5ad", tmp_path / "m.pt")


def test_recipes_choose_the_hism_batchnorm_statistics() -> None:
    """Ours keeps per-level statistics (eval matches training); the released recipe shares them."""
    assert get_recipe("hifusion").level_norm == "per_level"
    assert get_recipe("released").level_norm == "shared"
    # ours drops the level alignment (it collapsed the level maps) and ships a weight average
    ours, released = get_recipe("hifusion"), get_recipe("released")
    assert (ours.align_weight, ours.ema_decay) == (0.0, 0.98)
    assert (released.align_weight, released.ema_decay) == (None, 0.0)  # the model's 0.5, as is


def test_set_reads_json_values_and_falls_back_to_strings() -> None:
    assert recipe_setting("ema_decay=0.99") == ("ema_decay", 0.99)
    assert recipe_setting("grad_clip=null") == ("grad_clip", None)
    assert recipe_setting(" optimizer=adam") == ("optimizer", "adam")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        recipe_setting("ema_decay")
    with pytest.raises(ConfigError, match="unknown training recipe keys"):
        get_recipe("hifusion").replace(ema=0.9)


def test_inverse_variance_gene_weights_have_mean_one_and_a_floor() -> None:
    var = np.array([1.0, 0.25, 1e-9, 4.0])
    assert gene_weights(get_recipe("hifusion"), var, torch.device("cpu")) is None
    w = gene_weights(get_recipe("hifusion", gene_weights="inverse_variance"), var,
                     torch.device("cpu")).numpy()
    assert w.mean() == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx(4.0) and w[0] / w[3] == pytest.approx(4.0)
    assert w[2] / w[0] == pytest.approx(1 / (0.01 * 0.625))  # floored at 1 % of the median
    with pytest.raises(ConfigError, match="gene_weights must be one of"):
        get_recipe("hifusion", gene_weights="by_magic")


def test_weight_average_ramps_up_and_averages_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = weight_average(net, 0.9)
    assert weight_average(net, 0.0) is None
    start = net[0].weight.detach().clone()
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net(torch.randn(8, 3))  # moves the running statistics and the step counter
    ema.update_parameters(net)  # second update: decay min(0.9, 2/11)
    keep = 2 / 11
    torch.testing.assert_close(ema.module[0].weight, keep * start + (1 - keep) * net[0].weight)
    torch.testing.assert_close(
        ema.module[1].running_mean, (1 - keep) * net[1].running_mean, rtol=1e-6, atol=1e-6
    )
    assert ema.module[1].num_batches_tracked.item() == 1


def test_ema_recipe_saves_the_averaged_weights(section: Path, tmp_path: Path) -> None:
    """Also trains with stain jitter, inverse-variance gene weights and the recipe's alignment
    weight."""
    recipe = tiny_recipe(epochs=1, hed_jitter=0.05, gene_weights="inverse_variance",
                         align_weight=0.1)
    result = _train(section, tmp_path / "m.pt", recipe=recipe.replace(ema_decay=0.5))
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.card["recipe"]["ema_decay"] == 0.5 and ckpt.card["recipe"]["hed_jitter"] == 0.05
    assert ckpt.config.align_weight == 0.1  # the recipe's, not the model configuration's 0.5
    raw = _train(section, tmp_path / "raw.pt", recipe=recipe.replace(ema_decay=0.0))
    plain = load_checkpoint(raw.checkpoint).state_dict  # same seed and data, no average
    differs = [k for k, v in ckpt.state_dict.items() if v.is_floating_point()
               and not torch.equal(v, plain[k])]
    assert differs, "the saved weights should be the average, not the last step's"
    model, _ = load_model(result.checkpoint)  # loads and runs
    assert result.validation["mse"] == pytest.approx(ckpt.card["validation"]["mse"])


# -- refit ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refit_run(section: Path, tmp_path_factory: pytest.TempPathFactory):
    """A refit recipe run to the end: selection run, then every spot up to its chosen epoch."""
    epochs: list[dict] = []
    out = tmp_path_factory.mktemp("refit") / "m.pt"
    result = _train(section, out, recipe=tiny_recipe(epochs=3, refit=True),
                    on_epoch=epochs.append, command=["hifusion", "train"])
    return result, epochs


def test_refit_retrains_on_every_spot_to_the_chosen_epoch(refit_run) -> None:
    result, epochs = refit_run
    selection = load_checkpoint(companion_paths(result.checkpoint)["selection"])
    refit = load_checkpoint(result.checkpoint)
    chosen = selection.card["epoch"]
    assert result.best_epoch == refit.card["epoch"] == refit.card["refit"]["epoch"] == chosen
    assert refit.card["validation"] == selection.card["validation"] == result.validation
    assert selection.card["sections"][0]["n_val"] > 0
    assert refit.card["sections"][0] == {**selection.card["sections"][0], "n_train": 40, "n_val": 0}
    assert refit.card["refit"]["selection_validation_split"].startswith("spatial blocks")
    assert refit.card["refit"]["selection_split"] == {"kind": "spatial_blocks", "fraction": 0.15,
                                                      "grid": 4}
    assert refit.card["split"] == {"kind": "none", "refit": True}
    assert refit.card["command"] == refit.card["refit"]["selection_command"] == "hifusion train"
    # three selection epochs with validation, then `chosen` refit epochs without
    assert [e["refit"] for e in epochs] == [False] * 3 + [True] * chosen
    assert all(e["val_mse"] is None for e in epochs[3:]) and epochs[-1]["best"]
    assert [c["epoch"] for c in result.curves] == list(range(1, chosen + 1))
    assert not torch.equal(refit.train_mean, selection.train_mean)  # every spot's mean
    assert any(not torch.equal(v, selection.state_dict[k]) for k, v in refit.state_dict.items())
    paths = companion_paths(result.checkpoint)
    assert not paths["resume"].exists()
    assert not companion_paths(paths["selection"])["resume"].exists()
    shown = format_card(refit, 0)
    assert f"retrained on every spot to epoch {chosen}" in shown
    assert "Selection run" not in shown  # the same command as the refit's
    resumed = dataclasses.replace(refit, card={**refit.card, "command": "hifusion train --resume"})
    assert re.search(r"^Selection run +hifusion train$", format_card(resumed, 0), re.M)
    assert "Validation (of the selection run)" in shown
    assert "refit on every spot" in format_epoch(epochs[-1])


def test_refit_resumes_in_either_stage(section: Path, tmp_path: Path, refit_run) -> None:
    full, _ = refit_run
    out = tmp_path / "m.pt"
    recipe = tiny_recipe(epochs=3, refit=True)
    calls = iter(range(10**6))
    with pytest.raises(Cancelled):  # in the selection run's second epoch
        _train(section, out, recipe=recipe, should_stop=lambda: next(calls) >= 6)
    assert companion_paths(companion_paths(out)["selection"])["resume"].exists()
    calls = iter(range(10**6))
    steps = 2 + 4 + 2  # the selection run's remaining 2 + 4 steps, then two refit steps
    with pytest.raises(Cancelled):
        _train(section, out, resume=True, should_stop=lambda: next(calls) >= steps)
    assert companion_paths(out)["resume"].exists()
    assert "refit" not in load_checkpoint(out).card  # until the refit ends: the selection model
    resumed = _train(section, out, resume=True)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert b.card["refit"]["epoch"] == a.card["refit"]["epoch"]
    for k, v in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[k], v, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _train(section, out, resume=True)


def test_no_validation_trains_every_spot_to_the_end(section: Path, tmp_path: Path,
                                                    full_run) -> None:
    """``val_fraction=0``: one run on every spot, the last epoch kept, even with refit on."""
    epochs: list[dict] = []
    out = tmp_path / "m.pt"
    result = _train(section, out, recipe=tiny_recipe(val_fraction=0.0, refit=True),
                    on_epoch=epochs.append)
    card = load_checkpoint(out).card
    assert not companion_paths(out)["selection"].exists() and "refit" not in card
    assert card["sections"][0]["n_train"] == 40 and card["sections"][0]["n_val"] == 0
    assert result.best_epoch == card["epoch"] == 2 and result.validation == {}
    assert card["validation"] is None and card["validation_split"].startswith("none")
    assert card["split"] == {"kind": "none", "refit": False}
    assert [e["best"] for e in epochs] == [False, True]
    assert all(e["val_mse"] is None and not e["refit"] for e in epochs)
    assert "every spot trains, no validation" in format_epoch(epochs[-1])
    assert re.search(r"^Validation +none: every spot trains for the whole schedule",
                     format_card(load_checkpoint(out), 0), re.M)
    # the same weights as a refit of a selection run told to go to the end of the schedule
    selection = tmp_path / "refit" / "m.selection.pt"
    selection.parent.mkdir()
    payload = torch.load(full_run[0].checkpoint, weights_only=True)
    payload["card"]["epoch"] = 2
    torch.save(payload, selection)
    refit = load_checkpoint(_train(section, selection.parent / "m.pt", resume=True).checkpoint)
    for k, v in load_checkpoint(out).state_dict.items():
        torch.testing.assert_close(refit.state_dict[k], v, atol=1e-6, rtol=0, msg=k)


def test_resume_refits_a_finished_plain_run(section: Path, tmp_path: Path, full_run) -> None:
    """A validated checkpoint placed as ``OUT.selection.pt`` is refitted by ``--resume``."""
    plain, _ = full_run
    out = tmp_path / "m.pt"
    shutil.copyfile(plain.checkpoint, companion_paths(out)["selection"])
    refit = _train(section, out, resume=True, command=["hifusion", "train", "--resume"])
    card = load_checkpoint(refit.checkpoint).card
    assert card["refit"]["epoch"] == plain.best_epoch == len(refit.curves)
    assert card["refit"]["selection_command"] == "hifusion train"
    assert card["command"] == "hifusion train --resume" and card["recipe"]["refit"] is True
    assert card["sections"][0]["n_val"] == 0 and card["validation"] == plain.validation
