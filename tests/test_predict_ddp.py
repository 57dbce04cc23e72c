"""``hifusion predict`` under torchrun: 2 CPU processes (gloo) share one slide's spots (``--out``
form), or share the inputs of a folder (``--out-dir``), and write what one process would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from test_ddp import _free_port
from test_predict_many import assert_same_prediction

from hifusion_model.cli import main

OPTIONS = ["--device", "cpu", "--workers", "0", "--precision", "fp32", "--batch-size", "16"]


def _torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "hifusion_model", "predict", *argv, *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
                          check=False)


@pytest.mark.slow
def test_two_processes_share_one_slides_spots_and_rank_0_writes_the_whole(
    tmp_path: Path, synthetic_slide_path: Path, tiny_checkpoint_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    model = ["--model", str(tiny_checkpoint_path), "--grid", "hex:100"]
    shared = _torchrun(str(synthetic_slide_path), "--out", str(tmp_path / "two" / "slide.pred.h5ad"),
                       *model, cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert shared.stdout.count("predicted on cpu (fp32) by 2 processes") == 1  # rank 0 alone
    alone = tmp_path / "one" / "slide.pred.h5ad"
    assert main(["predict", str(synthetic_slide_path), "--out", str(alone), *model,
                 *OPTIONS]) == 0
    merged = ad.read_h5ad(tmp_path / "two" / "slide.pred.h5ad")
    assert merged.n_obs > 16  # more than one batch, so both processes had spots
    assert_same_prediction(merged, ad.read_h5ad(alone))
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["slide.pred.h5ad"]


@pytest.mark.slow
def test_two_processes_share_the_inputs_and_agree_on_the_failures(
    tmp_path: Path, synthetic_dir: Path, tiny_checkpoint_path: Path,
) -> None:
    folder = tmp_path / "sections"
    folder.mkdir()
    shutil.copy(synthetic_dir / "slide.ome.tif", folder / "slide.ome.tif")
    for name in ("A", "B", "C"):
        shutil.copy(synthetic_dir / "section.h5ad", folder / f"{name}.h5ad")
    (folder / "B.h5ad").write_text("not HDF5")  # rank 1's input
    out = tmp_path / "preds"
    run = _torchrun(str(folder), "--out-dir", str(out), "--model", str(tiny_checkpoint_path),
                    cwd=tmp_path)
    assert run.returncode != 0  # torchrun's report of the processes' exit 2
    assert sorted(p.name for p in out.iterdir()) == ["A.pred.h5ad", "C.pred.h5ad"]
    assert run.stdout.count("165 spots × 12 genes predicted") == 2
    assert run.stderr.count(f"hifusion predict: error: {folder / 'B.h5ad'}: cannot read") == 1
    assert run.stderr.count(f"hifusion predict: 1 of 3 inputs failed: {folder / 'B.h5ad'}") == 1
    assert "exitcode: 2" in run.stderr  # the one-line error's exit, not a bug's 1
