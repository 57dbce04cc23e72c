"""Distributed training: 2 CPU processes under torchrun (gloo) train one model, rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import spot_array_section

from hifusion_model.models.checkpoint import load_model
from hifusion_model.models.config import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_loadable_checkpoint(tmp_path: Path) -> None:
    section = spot_array_section(tmp_path)
    config = tiny_config(1).to_dict()
    del config["genes"]
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "run" / "model.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "hifusion_model",
        "train",
        str(section),
        "--out",
        str(out),
        "--model-config",
        str(tmp_path / "tiny.json"),
        "--genes",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--set",
        "refit=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best epoch") == 1  # rank 0 alone reports
    selection = load_model(out.with_suffix(".selection.pt"))[1]
    model, ckpt = load_model(out)
    assert ckpt.card["world_size"] == 2 and ckpt.config.n_genes == 8
    assert ckpt.card["command"].startswith(f"hifusion train {section} --out {out}")
    data = ckpt.card["sections"][0]
    curves = json.loads(out.with_suffix(".selection.curves.json").read_text())
    assert [c["epoch"] for c in curves] == [1, 2]
    # validation gathered from both ranks; the refit (every spot) stops at the epoch it chose
    assert ckpt.card["validation"]["n_spots"] == selection.card["sections"][0]["n_val"] > 0
    assert data["n_val"] == 0 and ckpt.card["refit"]["epoch"] == selection.card["epoch"]
    refit_curves = json.loads(out.with_suffix(".curves.json").read_text())
    assert len(refit_curves) == selection.card["epoch"]
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.curves.csv",
        "model.curves.json",
        "model.pt",
        "model.selection.curves.csv",
        "model.selection.curves.json",
        "model.selection.pt",
    ]
