"""Self-supervised pretraining of the encoders, and training from their weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_training import tiny_recipe

from hifusion_model.cli import main
from hifusion_model.engine.optim import build_optimizer, pretrained_encoders
from hifusion_model.engine.pretrain import (
    PretrainConfig,
    augment_views,
    crop_pairs,
    nt_xent,
    pretrain_encoder,
)
from hifusion_model.engine.train import train
from hifusion_model.errors import CheckpointError, ConfigError, SectionError
from hifusion_model.models.backbones import load_torchvision_resnet18
from hifusion_model.models.checkpoint import load_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.registry import build_model
from hifusion_model.models.spot_only import spot_only_config

TINY = PretrainConfig(crop_px=16, batch_size=4)


@pytest.fixture(scope="module")
def section(spot_array: Path) -> Path:
    """40 spots of a synthetic ST array, the image cropped around them (conftest)."""
    return spot_array


@pytest.fixture(scope="module")
def trunk(section: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trunk") / "trunk.pt"
    result = pretrain_encoder([section], out, steps=3, pretrain=TINY,
                                   model_config=tiny_config(), device="cpu")
    assert result.steps == 3 and len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)
    return out


def test_nt_xent_is_chance_for_identical_views_and_low_for_matched_pairs():
    n, t = 4, 0.2
    same = torch.nn.functional.normalize(torch.ones(n, 8), dim=1)
    assert nt_xent(same, same, t).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)
    pairs = torch.eye(8)[:n]  # each view's partner is itself, the others orthogonal
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert nt_xent(pairs, pairs, t).item() == pytest.approx(expected, rel=1e-5)


def test_crop_pairs_overlap_and_stay_inside_the_window():
    size, crop = 96, 16
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    window = torch.stack([rows, cols, rows]).to(torch.uint8)
    first, second = crop_pairs(window.expand(50, 3, size, size), crop,
                               torch.Generator().manual_seed(0))
    assert first.shape == second.shape == (50, 3, crop, crop)
    r1, c1 = first[:, 0, 0, 0].long(), first[:, 1, 0, 0].long()
    r2, c2 = second[:, 0, 0, 0].long(), second[:, 1, 0, 0].long()
    margin = size // 6
    assert (r1 >= margin).all() and (r1 + crop <= size - margin).all()
    assert ((r2 - r1).abs() <= crop // 2).all() and ((c2 - c1).abs() <= crop // 2).all()
    assert (r2 + crop <= size).all() and (c2 >= 0).all()
    views = augment_views(first, torch.Generator().manual_seed(1))
    assert views.dtype == torch.float32 and 0 <= views.min() and views.max() <= 1


def test_pretrained_weights_load_into_the_spot_encoder(trunk: Path):
    model = build_model(tiny_config(level_norm="per_level"))
    load_torchvision_resnet18(model.spot_encoder, trunk)
    saved = torch.load(trunk, weights_only=True)
    torch.testing.assert_close(model.spot_encoder.conv1.weight, saved["conv1.weight"])


def test_pretraining_is_reproducible_for_a_step_budget(section: Path, trunk: Path, tmp_path: Path):
    again = pretrain_encoder([section], tmp_path / "again.pt", steps=3, pretrain=TINY,
                                  model_config=tiny_config(), device="cpu")
    first, second = torch.load(trunk, weights_only=True), torch.load(again.path, weights_only=True)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_training_starts_from_the_pretrained_encoder(section: Path, trunk: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    recipe = tiny_recipe(epochs=1)
    out = tmp_path / "m.pt"
    train([section], out, recipe=recipe.replace(refit=True), model_config=tiny_config(),
          genes=4, spot_encoder_init=trunk, device="cpu")
    for stage in (out, out.with_suffix(".selection.pt")):  # the refit starts from it again
        assert load_checkpoint(stage).card["spot_encoder_init"] == str(trunk)
    assert main(["info", str(out)]) == 0
    assert f"started from the weights in {trunk}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="start a new run"):
        train([section], out, recipe=recipe, init=out, spot_encoder_init=trunk, device="cpu")
    with pytest.raises(CheckpointError, match="no such weights file"):
        train([section], tmp_path / "n.pt", recipe=recipe, model_config=tiny_config(), genes=4,
              spot_encoder_init=tmp_path / "missing.pt", device="cpu")
    wrong_width = tmp_path / "wide.pt"
    torch.save(build_model(tiny_config(width=16)).spot_encoder.state_dict(), wrong_width)
    with pytest.raises(CheckpointError, match="wrong shape"):
        train([section], tmp_path / "n.pt", recipe=recipe, model_config=tiny_config(), genes=4,
              spot_encoder_init=wrong_width, device="cpu")
    assert not (tmp_path / "n.pt").exists()


def test_pretrained_encoders_learn_at_their_own_rate():
    model = build_model(tiny_config())
    recipe = tiny_recipe(pretrained_lr=0.1)
    prefixes = pretrained_encoders(model, init=None, encoder_init={"spot": "ssl.pt"})
    assert prefixes == ["spot_encoder."]
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in build_optimizer(model, recipe, prefixes)
            .param_groups for p in g["params"]}
    assert len(rate) == len(list(model.parameters()))  # each parameter in exactly one group
    for name, p in model.named_parameters():
        lr = recipe.lr * (0.1 if name.startswith("spot_encoder.") else 1.0)
        assert rate[id(p)] == (lr, recipe.weight_decay if p.ndim > 1 else 0.0), name
    assert pretrained_encoders(model, init="bundled.pt") == ["spot_encoder.", "region_encoder."]
    spot_only = build_model(spot_only_config(tiny_config()))
    assert pretrained_encoders(spot_only, init="c.pt") == ["spot_encoder."]
    assert pretrained_encoders(model, init=None) == []
    with pytest.raises(ConfigError, match="pretrained_lr"):
        tiny_recipe(pretrained_lr=0.0)


def test_a_lower_pretrained_rate_keeps_the_encoder_near_its_weights(section: Path, trunk: Path,
                                                                     tmp_path: Path):
    start = torch.load(trunk, weights_only=True)["conv1.weight"]
    moved = {}
    for scale in (1.0, 1e-3):
        out = tmp_path / f"m{scale}.pt"
        train([section], out, recipe=tiny_recipe(epochs=1, ema_decay=0.0, pretrained_lr=scale),
              model_config=tiny_config(), genes=4, spot_encoder_init=trunk, device="cpu")
        weights = load_checkpoint(out).state_dict["spot_encoder.conv1.weight"]
        moved[scale] = (weights.float() - start).abs().max().item()
    assert 0 < moved[1e-3] < moved[1.0] / 100


def test_the_region_encoder_pretrains_and_starts_a_run(section: Path, trunk: Path,
                                                      tmp_path: Path, capsys):
    region = tmp_path / "region.pt"
    pretrain_encoder([section], region, encoder="region", steps=2, pretrain=TINY,
                     model_config=tiny_config(), device="cpu")
    saved = torch.load(region, weights_only=True)
    assert "layer1.1.conv1.weight" not in saved  # one block per stage: the ResNet-10
    out = tmp_path / "m.pt"
    train([section], out, recipe=tiny_recipe(epochs=1), model_config=tiny_config(), genes=4,
          spot_encoder_init=trunk, region_encoder_init=region, device="cpu")
    card = load_checkpoint(out).card
    assert (card["spot_encoder_init"], card["region_encoder_init"]) == (str(trunk), str(region))
    assert main(["info", str(out)]) == 0
    assert f"Region encoder  started from the weights in {region}" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="48 unexpected tensors"):  # a ResNet-18 into the ResNet-10
        train([section], tmp_path / "n.pt", recipe=tiny_recipe(epochs=1),
              model_config=tiny_config(), genes=4, region_encoder_init=trunk, device="cpu")
    with pytest.raises(ConfigError, match="no region encoder"):
        train([section], tmp_path / "n.pt", recipe=tiny_recipe(epochs=1),
              model_config=spot_only_config(tiny_config()), genes=4,
              region_encoder_init=region, device="cpu")
    with pytest.raises(ConfigError, match="no encoder 'head'"):
        pretrain_encoder([section], tmp_path / "h.pt", encoder="head", steps=1, pretrain=TINY,
                         model_config=tiny_config())
    assert not (tmp_path / "n.pt").exists() and not (tmp_path / "h.pt").exists()


def test_bad_budgets_and_settings_are_refused(section: Path, tmp_path: Path):
    out = tmp_path / "t.pt"
    for kwargs, match in [({}, "steps or as minutes"), ({"steps": 2, "minutes": 1.0}, "one of"),
                          ({"steps": 0}, "must be positive")]:
        with pytest.raises(ConfigError, match=match):
            pretrain_encoder([section], out, pretrain=TINY, model_config=tiny_config(),
                                  **kwargs)
    with pytest.raises(ConfigError, match="crop_px"):
        pretrain_encoder([section], out, steps=1, pretrain=PretrainConfig(crop_px=500),
                              model_config=tiny_config())
    with pytest.raises(SectionError, match="fewer than one batch"):
        pretrain_encoder([section], out, steps=1, pretrain=PretrainConfig(crop_px=16),
                              model_config=tiny_config())
    assert not out.exists()


def test_cli_pretrain_writes_weights_and_a_record(section: Path, tmp_path: Path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in tiny_config().to_dict().items()
                                  if k != "genes"}))
    out = tmp_path / "trunk.pt"
    args = ["pretrain", str(section), "--out", str(out), "--steps", "2", "--crop-px", "16",
            "--model-config", str(config), "--device", "cpu"]
    assert main([*args, "--batch-size", "4"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and record["settings"]["crop_px"] == 16
    assert record["encoder"] == "spot"
    assert "encoder weights" in capsys.readouterr().out
    assert main([*args, "--batch-size", "1000", "--overwrite"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
