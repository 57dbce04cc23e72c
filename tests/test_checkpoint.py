from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import hifusion_model
from hifusion_model.models import checkpoint
from hifusion_model.cli import main
from hifusion_model.errors import CheckpointError
from hifusion_model.evaluation.metrics import evaluate_predictions
from hifusion_model.models.checkpoint import (
    FORMAT,
    bundled_model_path,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion

GENES = ["ERBB2", "KRT19", "ACTB", "GAPDH", "MUC1", "EPCAM"]


@pytest.fixture
def model() -> HiFusion:
    torch.manual_seed(0)
    return HiFusion(tiny_config(GENES)).eval()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 56, 56, generator=g), torch.rand(3, 3, 112, 112, generator=g)


@pytest.fixture
def card() -> dict:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(12, len(GENES)))
    pred = truth + rng.normal(scale=0.5, size=truth.shape)
    validation = evaluate_predictions(
        pred, truth, sections=["B1"] * 6 + ["C1"] * 6, genes=GENES, train_mean=np.zeros(6)
    )
    return {
        "data": ["A1", "A2"],
        "command": "hifusion train her2st/ --epochs 2",
        "validation": validation,
        "notes": "tiny test model",
        "numpy_value": np.float32(0.5),
    }


def _predict(model: torch.nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).prediction


def test_round_trip_is_bit_exact(tmp_path, model, inputs, card):
    train_mean = torch.linspace(-1, 1, len(GENES))
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=train_mean, card=card)
    loaded, ckpt = load_model(path)
    assert not loaded.training
    assert torch.equal(_predict(loaded, inputs), _predict(model, inputs))
    assert ckpt.config == model.config and ckpt.genes == GENES
    assert torch.equal(ckpt.train_mean, train_mean) and ckpt.stored_dtype == "float32"
    assert ckpt.card["command"] == card["command"]
    assert ckpt.card["numpy_value"] == 0.5  # numpy scalars become plain floats
    assert ckpt.card["validation"] == json.loads(json.dumps(card["validation"]))
    assert "date" in ckpt.card and ckpt.card["software"].startswith("napari-hifusion")


def test_half_precision_halves_the_file_and_stays_close(tmp_path, model, inputs):
    full = save_checkpoint(tmp_path / "full.pt", model, train_mean=torch.zeros(6))
    half = save_checkpoint(tmp_path / "half.pt", model, train_mean=torch.zeros(6), half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, ckpt = load_model(half)
    assert ckpt.stored_dtype == "float16/float32"  # weights fp16, BatchNorm statistics fp32
    raw = torch.load(half, weights_only=True)["state_dict"]
    assert {str(v.dtype) for k, v in raw.items() if "running_" in k} == {"torch.float32"}
    assert raw["head.2.weight"].dtype == torch.float16
    assert all(v.dtype != torch.float16 for v in ckpt.state_dict.values())
    assert next(loaded.parameters()).dtype == torch.float32
    expected, got = _predict(model, inputs), _predict(loaded, inputs)
    assert not torch.equal(got, expected)  # really rounded ...
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # ... but only slightly


def test_truncated_file_is_refused(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pt is truncated or corrupt"):
        load_checkpoint(path)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "config": {}, "state_dict": {}, "card": _Evil(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="evil.pt") as err:
        load_checkpoint(path)
    assert not marker.exists()
    if writer == "torch.save":
        assert "refused" in str(err.value) and "system" in str(err.value)
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.loads(
        path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"conv1.weight": torch.zeros(2, 3), "fc.weight": torch.zeros(2, 2)}, "bare PyTorch"),
        ([torch.zeros(2)], "not a napari-hifusion checkpoint"),
        ({"format": "other-tool/1"}, "not written by napari-hifusion"),
        ({"format": "napari-hifusion/2"}, "upgrade napari-hifusion"),
        ({"format": FORMAT, "config": {}}, "incomplete checkpoint"),
    ],
)
def test_foreign_torch_files_are_refused(tmp_path, content, message):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"format": "napari-hifusion/1"}', "is a JSON file"),
        (bytes(range(7, 200)), "not a PyTorch file"),
        (b"", "empty file"),
    ],
)
def test_non_torch_files_are_refused(tmp_path, data, message):
    path = tmp_path / "x.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


def test_inconsistent_contents_are_refused(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6))
    obj = torch.load(path, weights_only=True)
    torch.save({**obj, "train_mean": torch.zeros(5)}, path)
    with pytest.raises(CheckpointError, match="train_mean must be a tensor of 6 values"):
        load_checkpoint(path)
    state = dict(obj["state_dict"])
    state.pop("head.2.bias")
    state["head.2.weight"] = torch.zeros(3, 3)
    torch.save({**obj, "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="1 missing, e.g. head.2.bias; 1 misshapen"):
        load_model(path)
    torch.save({**obj, "config": {**obj["config"], "heads": 5}}, path)
    with pytest.raises(CheckpointError, match="invalid model configuration"):
        load_checkpoint(path)


def test_save_refuses_bad_arguments(tmp_path, model):
    with pytest.raises(CheckpointError, match="train_mean has 2 values"):
        save_checkpoint(tmp_path / "m.pt", model, train_mean=[0.0, 1.0])
    with pytest.raises(CheckpointError, match="JSON-like"):
        save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6), card={"x": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_existing_checkpoint_untouched(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*No space left"):
        save_checkpoint(path, model, train_mean=torch.ones(6))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_bundled_model(tmp_path, monkeypatch):
    path = bundled_model_path()
    assert path.parent == Path(hifusion_model.__file__).parent / "weights"
    assert path.name == "her2st_hifusion.pt"
    monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: tmp_path / "her2st_hifusion.pt")
    with pytest.raises(CheckpointError, match="bundled model is missing from this installation"):
        load_model("bundled")


# -- hifusion info --------------------------------------------------------------------------------
def test_info_prints_the_card(tmp_path, model, card, capsys):
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6), card=card)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    v = card["validation"]
    n_params = sum(p.numel() for p in model.parameters())
    assert "6: ERBB2, KRT19, ACTB, GAPDH, MUC1, EPCAM" in out
    assert "ERBB2 yes, KRT19 yes, CD74 no" in out
    assert "spot 56 px = 154.0 µm, region 112 px = 308.0 µm (2.75 µm/px)" in out
    assert f"{n_params:,} parameters" in out and "float32 weights" in out
    assert "A1, A2" in out and card["command"] in out and "tiny test model" in out
    assert f"gene PCC   {v['gene_pcc']:.3f} [0.000]" in out
    assert f"ERBB2 {v['genes']['ERBB2']:.3f}" in out
    best = max(v["gene_pcc_all"], key=v["gene_pcc_all"].get)
    assert f"top genes  {best} " in out
    assert "Uncertainty" in out and "none (trained before" in out
    noise = {"kind": "poisson_stain_library", "features": ["haematoxylin"], "intercept": 5.0,
             "coef": [30.0], "residual_sd": 0.7, "n_spots": 650}
    path = save_checkpoint(tmp_path / "n.pt", model, train_mean=torch.zeros(6),
                           card={**card, "noise_model": noise})
    assert main(["info", str(path)]) == 0
    assert "read from the haematoxylin (fitted on 650 training spots" in capsys.readouterr().out


def test_info_json_and_genes(tmp_path, model, card, capsys):
    path = save_checkpoint(tmp_path / "m.pt", model, train_mean=torch.zeros(6), card=card)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["genes"] == GENES and info["card"]["data"] == ["A1", "A2"]
    assert info["format"] == FORMAT and info["n_parameters"] > 0
    assert main(["info", str(path), "--genes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pcc = card["validation"]["gene_pcc_all"]["ACTB"]
    assert len(lines) == 6 and lines[2] == f"ACTB\t{pcc:.4f}"


def test_info_on_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a model")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hifusion info: error: ") and "bad.pt" in err
    assert err.count("\n") == 1
