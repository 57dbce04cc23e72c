"""``hifusion train / predict / evaluate`` end to end, and their one-line errors (exit code 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark
from synthetic import spot_array_section
from test_inference import synthetic_slide

from hifusion_model.cli import main
from hifusion_model.evaluation.metrics import evaluate_predictions
from hifusion_model.models.checkpoint import load_model, save_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    spot_array_section(folder)  # B4.h5ad: 40 legacy-ST spots, HER2ST's geometry
    config = tiny_config(1).to_dict()
    del config["genes"]  # the data chooses them
    (folder / "tiny.json").write_text(json.dumps(config))
    return folder


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run a command that must fail as a user error: exit 2, one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_predict_evaluate_end_to_end(work: Path, capsys: pytest.CaptureFixture) -> None:
    model = work / "model.pt"
    assert (
        main(
            [
                "train",
                str(work / "B4.h5ad"),
                "--out",
                str(model),
                "--model-config",
                str(work / "tiny.json"),
                "--genes",
                "16",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "best epoch" in out.out and "epoch   2" in out.err
    _, ckpt = load_model(model)
    assert ckpt.config.n_genes == 16 and ckpt.config.width == 8
    assert ckpt.card["data"] == ["B4"]
    assert model.with_suffix(".curves.csv").is_file()

    pred = work / "pred.h5ad"
    assert (
        main(
            [
                "predict",
                str(work / "B4.h5ad"),
                "--model",
                str(model),
                "--out",
                str(pred),
                "--device",
                "cpu",
                "--batch-size",
                "16",
                "--tta",
                "2",
            ]
        )
        == 0
    )
    assert "40 spots × 16 genes" in capsys.readouterr().out
    assert ad.read_h5ad(pred).uns["hifusion_model"]["test_time_views"] == 2
    bad = ["predict", str(work / "B4.h5ad"), "--model", str(model), "--out", str(pred), "--tta", "9"]
    assert main(bad) != 0 and "test-time views must be 1 to 8" in capsys.readouterr().err

    assert main(["evaluate", str(pred), "--json", "--genes", "ERBB2", "KRT19", "CD74"]) == 0
    result = json.loads(capsys.readouterr().out)
    adata = ad.read_h5ad(pred)
    expected = evaluate_predictions(
        adata.X,
        adata.layers["truth"],
        sections=["B4"] * 40,
        genes=list(adata.var_names),
        train_mean=ckpt.train_mean.numpy(),
    )
    for key in ("mse", "mae", "spot_pcc", "gene_pcc"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
        assert result["baseline"][key] == pytest.approx(expected["baseline"][key], abs=1e-12)
    assert result["genes"] == pytest.approx(expected["genes"]) and set(result["genes"]) <= {
        "ERBB2",
        "KRT19",
        "CD74",
    }
    assert result["baseline"]["gene_pcc"] == 0.0

    assert (
        main(["evaluate", str(pred), str(pred)]) == 0
    )  # two sections: per-section and overall rows
    table = capsys.readouterr().out
    assert (
        "constant (train mean)" in table and "all 2 sections" in table and "B4 (pred.h5ad)" in table
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return save_checkpoint(
        path, HiFusion(tiny_config(["ERBB2", "NOT_A_GENE"])), train_mean=np.zeros(2)
    )


def test_predict_on_a_bare_slide_with_a_grid(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    slide = synthetic_slide(tmp_path / "bare.tif")
    pred = tmp_path / "pred.h5ad"
    def predict_on_slide(*spots: str) -> int:
        argv = ["predict", str(slide), *spots, "--mpp", "2", "--model", str(tiny_model),
                "--out", str(pred), "--device", "cpu"]
        return main(argv)

    assert predict_on_slide("--grid", "hex:100") == 0
    assert "no truth" in capsys.readouterr().out
    adata = ad.read_h5ad(pred)
    assert adata.n_obs > 5 and "truth" not in adata.layers and adata.uns["hifusion"]["mpp"] == 2.0
    err = _error_line(capsys, ["evaluate", str(pred)])
    assert "no measured truth" in err

    (tmp_path / "spots.csv").write_text("id,x,y\na,250,250\nb,300,200\n")
    assert "already exists; add --overwrite" in _error_line(
        capsys, ["predict", str(slide), "--spots", str(tmp_path / "spots.csv"), "--mpp", "2",
                 "--model", str(tiny_model), "--out", str(pred)])
    assert predict_on_slide("--spots", str(tmp_path / "spots.csv"), "--overwrite") == 0
    adata = ad.read_h5ad(pred)
    assert list(adata.obs_names) == ["a", "b"] and adata.obsm["spatial"].tolist() == [
        [250, 250],
        [300, 200],
    ]


def test_user_errors_are_one_line(
    work: Path, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    section = str(work / "B4.h5ad")
    slide = str(synthetic_slide(tmp_path / "bare.tif"))
    out = ["--out", str(tmp_path / "p.h5ad"), "--device", "cpu"]
    assert "does not exist" in _error_line(
        capsys, ["predict", str(tmp_path / "nope.h5ad"), "--model", str(tiny_model), *out]
    )
    assert "NOT_A_GENE" in _error_line(
        capsys, ["predict", section, "--model", str(tiny_model), *out]
    )
    assert "mpp" in _error_line(
        capsys, ["predict", slide, "--grid", "hex:100", "--model", str(tiny_model), *out]
    )
    assert "--grid hex:100 or --spots" in _error_line(
        capsys, ["predict", slide, "--model", str(tiny_model), *out]
    )
    assert "kind must be hex or square" in _error_line(
        capsys,
        ["predict", slide, "--grid", "tri:5", "--mpp", "2", "--model", str(tiny_model), *out],
    )
    assert "checkpoint not found" in _error_line(
        capsys, ["predict", section, "--model", str(tmp_path / "m.pt"), *out]
    )
    assert "section file not found" in _error_line(
        capsys, ["train", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "m.pt")]
    )
    assert "nothing to resume" in _error_line(
        capsys,
        [
            "train",
            section,
            "--out",
            str(tmp_path / "m.pt"),
            "--resume",
            "--device",
            "cpu",
        ],
    )
    assert "unknown recipe" in _error_line(
        capsys, ["train", section, "--out", str(tmp_path / "m.pt"), "--recipe", "x"]
    )
    assert "prediction file not found" in _error_line(
        capsys, ["evaluate", str(tmp_path / "p.h5ad")]
    )
    train_out = ["train", section, "--out", str(tmp_path / "m.pt")]
    assert "unknown training recipe keys: ['ema']" in _error_line(
        capsys, [*train_out, "--set", "ema=0.9"]
    )
    assert "ema_decay must be a number in [0, 1)" in _error_line(
        capsys, [*train_out, "--set", "ema_decay=1.5"]
    )
    assert not (tmp_path / "m.pt").exists()


def test_train_help_documents_the_model_config(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--model-config FILE.json" in text and "released" in text and "--resume" in text


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (16, 4)])
def test_patch_readers_default_to_the_usable_cores_up_to_four(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, cores: int,
        threads: int) -> None:
    """More readers than cores take CPU from the network (cli/_options.reading_threads)."""
    from hifusion_model.cli import _options

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    assert _options.reading_threads() == threads
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert f"at most 4: {threads} here" in " ".join(capsys.readouterr().out.split())


def test_level_heads_script_reports_every_head(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    module = load_benchmark("level_heads")
    section = work / "B4.h5ad"
    genes = list(ad.read_h5ad(section).var_names[:3])
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "m.pt", HiFusion(tiny_config(genes)),
                            train_mean=np.full(3, -1.0))
    assert module.main([str(model), str(section)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| B4 |")]
    assert [r.split(" | ")[1] for r in rows] == ["final", "level 1", "level 2", "level 7"]
    from hifusion_model.models.registry import build_model
    from hifusion_model.models.spot_only import spot_only_config

    spot_only = save_checkpoint(tmp_path / "s.pt", build_model(spot_only_config(tiny_config(genes))),
                                train_mean=np.zeros(3))
    assert module.main([str(spot_only), str(section)]) == 2
    assert "no level heads" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                    signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_mid_training_leaves_files_that_resume(
    tmp_path: Path, signum: int, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C, ``kill`` or ``kill -9`` during epoch 2 of a real ``hifusion train`` process: a
    loadable model and resume state (exit 130 and a hint where the process can still speak),
    and ``--resume`` finishes the run."""
    from synthetic import synthetic_section

    from hifusion_model.engine.state import companion_paths
    from hifusion_model.models.checkpoint import load_checkpoint, safe_load

    section = synthetic_section(tmp_path / "data")
    config = tiny_config(1).to_dict()
    del config["genes"]
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "m.pt"
    argv = ["train", str(section), "--out", str(out), "--model-config", str(tmp_path / "tiny.json"),
            "--epochs", "3", "--batch-size", "16", "--genes", "4", "--set", "refit=false",
            "--workers", "0", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "hifusion_model", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # see conftest.py
    resume = companion_paths(out)["resume"]
    deadline = time.monotonic() + 120
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the state appears once epoch 1 is done
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.2)  # inside epoch 2 (a third follows: a fast epoch 2 cannot end the run)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    if signum == signal.SIGKILL:  # no chance to clean up: the atomic writes are all there is
        assert proc.returncode == -signal.SIGKILL, err
    else:
        assert proc.returncode == 130, err
        assert "continue with --resume" in err and "Traceback" not in err, err
    assert load_checkpoint(out).card["epoch"] >= 1
    assert safe_load(resume, "resume state")["format"].startswith("napari-hifusion-resume")
    assert main(["train", str(section), "--out", str(out), "--resume", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert load_checkpoint(out).card["epoch"] >= 1 and not resume.exists()
    assert "epoch   2" in capsys.readouterr().err


def test_version_and_help_answer_without_loading_torch() -> None:
    """Only the command being run is imported: `hifusion --version` is instant."""
    import subprocess
    import sys

    code = ("import sys\nfrom hifusion_model.cli import main\n"
            "for argv in (['--version'], ['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "    print(argv[0], 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "--version False" in out and "--help False" in out
    assert "train True" in out and "--resume" in out  # the named command is built in full
