"""The bad-input and fault matrix of the CLI (issue 24): one row per careless or hostile input.

Every row must end as a user error: exit code 2, one line on stderr naming the problem, no
traceback, no advice to load a pickle with ``weights_only=False``, and every file that existed
before the command byte-identical afterwards (no file created either). ``docs/reliability.md``
holds the same table in words. The commands run in-process on a tiny synthetic slide, section
and model (``tests/synthetic.py``), so the whole matrix takes seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import synthetic_section, tiny_checkpoint

from hifusion_model.cli import main
from hifusion_model.data.sections import read_section, write_section
from hifusion_model.engine.recipes import get_recipe
from hifusion_model.engine.train import train
from hifusion_model.errors import Cancelled
from hifusion_model.models.checkpoint import load_checkpoint, save_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion


class _Evil:
    """Unpickling this creates the marker file: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slide, section (165 spots, 12 genes), a tiny model and the odd sections the rows need."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    section = synthetic_section(folder)
    adata = read_section(section)
    tiny_checkpoint(folder / "model.pt", list(adata.var_names))
    config = tiny_config(1).to_dict()
    del config["genes"]
    (folder / "tiny.json").write_text(json.dumps(config))
    write_section(adata[:0].copy(), folder / "empty.h5ad")
    zeros = adata.copy()
    zeros.X = zeros.X * 0
    write_section(zeros, folder / "zeros.h5ad")
    odd = adata.copy()
    odd.uns["hifusion"] = {**odd.uns["hifusion"], "mpp": 100.0}
    write_section(odd, folder / "mpp100.h5ad")
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        ckpt = load_checkpoint(folder / "model.pt")
        model = HiFusion(ckpt.config)
        model.load_state_dict(ckpt.state_dict)
        torch.save({"format": "napari-hifusion/1", "config": ckpt.config.to_dict(),
                    "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                    "train_mean": torch.zeros(ckpt.config.n_genes), "card": {}},
                   folder / f"{name}.pt")
        raw = torch.load(folder / f"{name}.pt", weights_only=True)
        key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
        raw["state_dict"][key].view(-1)[0] = value
        torch.save(raw, folder / f"{name}.pt")
    huge = HiFusion(load_checkpoint(folder / "model.pt").config)
    with torch.no_grad():  # finite weights whose output overflows float32: an inf prediction
        for p in huge.parameters():
            p.fill_(1e30)
    save_checkpoint(folder / "overflow.pt", huge, train_mean=np.zeros(12))
    (folder / "spots.csv").write_text("id,x,y\na,400,300\nb,500,350\n")
    calls = iter(range(10**6))  # a run stopped after two steps, to resume
    with pytest.raises(Cancelled):
        train([section], folder / "stopped.pt", recipe=get_recipe(epochs=2, batch_size=16),
              model_config=tiny_config(["x"]), genes=4, workers=0, device="cpu",
              should_stop=lambda: next(calls) >= 2)
    other = adata.copy()  # the same section name, other counts
    other.X = other.X.copy()
    other.X[0, 0] += 1
    write_section(other, folder / "other.h5ad")
    return folder


# -- files the rows create in their own folder ----------------------------------------------------
def _csv(text: str, name: str = "in.csv") -> Callable[[Path, Path], None]:
    def make(base: Path, tmp: Path) -> None:
        (tmp / name).write_text(text)
    return make


def _st(spots: str, counts: str = "\tG1\tG2\n1x1\t1\t2\n2x1\t3\t4\n"
        ) -> Callable[[Path, Path], None]:
    """A legacy-ST spot table and count matrix."""
    def make(base: Path, tmp: Path) -> None:
        (tmp / "spots.tsv").write_text(spots)
        (tmp / "counts.tsv").write_text(counts)
    return make


ST_HEAD = "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\n"
ST_OK = ST_HEAD + "1\t1\t1.0\t1.0\t300\t300\n2\t1\t2.0\t1.0\t400\t300\n"


def _evil(name: str) -> Callable[[Path, Path], None]:
    def make(base: Path, tmp: Path) -> None:
        torch.save({"weights": torch.zeros(2), "payload": _Evil(tmp / "marker")}, tmp / name)
    return make


def _file(name: str, data: bytes = b"keep me") -> Callable[[Path, Path], None]:
    def make(base: Path, tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return make


def _link(name: str, target: str, hard: bool = False) -> Callable[[Path, Path], None]:
    def make(base: Path, tmp: Path) -> None:
        (os.link if hard else os.symlink)(base / target, tmp / name)
    return make


def _truncated(base: Path, tmp: Path) -> None:
    data = (base / "model.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])


def _plain_pickle(base: Path, tmp: Path) -> None:
    import pickle

    (tmp / "plain.pt").write_bytes(pickle.dumps({"a": 1}))


def _png(base: Path, tmp: Path) -> None:
    """A slide image that records no µm/px."""
    from PIL import Image

    Image.new("RGB", (800, 600), (230, 180, 200)).save(tmp / "bare.png")


def _spaceranger(**factors: object) -> Callable[[Path, Path], None]:
    """A real-shaped Space Ranger outs in ``tmp/run/outs`` with scale factors overridden."""
    def make(base: Path, tmp: Path) -> None:
        import json

        from spaceranger import write_spaceranger

        outs = write_spaceranger(tmp)
        path = outs / "spatial" / "scalefactors_json.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **factors}))
    return make


def _both(*makers: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def make(base: Path, tmp: Path) -> None:
        for m in makers:
            m(base, tmp)
    return make


# -- faults injected while the command runs -------------------------------------------------------
def _fail_write(exc: Callable[[str], BaseException]) -> Callable[[pytest.MonkeyPatch], None]:
    """``AnnData.write_h5ad`` writes a little of its (temporary) file, then fails."""
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import anndata

        def write(self, filename, *args, **kwargs):
            Path(filename).write_bytes(b"half")
            raise exc(str(filename))
        monkeypatch.setattr(anndata.AnnData, "write_h5ad", write)
    return patch


def _fail_probe(code: int) -> Callable[[pytest.MonkeyPatch], None]:
    """The output folder refuses new files (read-only file system, no permission)."""
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        from hifusion_model import io_utils

        def mkstemp(*args, **kwargs):
            raise OSError(code, os.strerror(code), kwargs.get("dir"))
        monkeypatch.setattr(io_utils.tempfile, "mkstemp", mkstemp)
    return patch


def _out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import hifusion_model.inference.predict as inference

    def predict_section(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(inference, "predict_section", predict_section)


def _h5py_text(name: str) -> BaseException:
    """How h5py reports a full disk: errno and file only in the text."""
    return OSError(f"Can't write data (file write failed: time = Mon, filename = '{name}', "
                   "file descriptor = 5, errno = 28, error message = 'No space left on device')")


@dataclass
class Case:
    id: str
    argv: str  # formatted with {base}, {tmp}, {section}, {slide}, {model}, {tiny}, then split
    expect: str  # the message must contain this (case-insensitive)
    setup: Callable[[Path, Path], None] | None = None
    fault: Callable[[pytest.MonkeyPatch], None] | None = None


PREDICT = "predict {section} --model {model} --device cpu --workers 0"
TRAIN = "train {section} --model-config {tiny} --epochs 1 --workers 0 --device cpu --genes 4"
TRAIN_M = TRAIN + " --out {tmp}/m.pt"
CSV = "import csv {tmp}/in.csv --image {slide} --out {tmp}/s.h5ad"
ST = ("import her2st --image {slide} --counts {tmp}/counts.tsv --spots {tmp}/spots.tsv "
      "--out {tmp}/s.h5ad")
UNSAFE = "not a safe"
PROGRESS = re.compile(r"\| *\d+/\d+ \[")  # a tqdm bar left on screen

CASES = [
    # -- 1. an output is never an input, and never replaced by surprise --
    Case("predict-out-is-input", PREDICT + " --out {section}", "one of the inputs"),
    Case("predict-out-is-input-overwrite", PREDICT + " --out {section} --overwrite",
         "one of the inputs"),
    Case("predict-out-symlink-to-input", PREDICT + " --out {tmp}/p.h5ad", "one of the inputs",
         _link("p.h5ad", "section.h5ad")),
    Case("predict-out-hardlink-to-input", PREDICT + " --out {tmp}/p.h5ad --overwrite",
         "one of the inputs", _link("p.h5ad", "section.h5ad", hard=True)),
    Case("predict-out-exists", PREDICT + " --out {tmp}/p.h5ad", "already exists; add --overwrite",
         _file("p.h5ad")),
    Case("predict-out-is-folder", PREDICT + " --out {tmp}/d.h5ad --overwrite", "existing folder",
         _file("d.h5ad/x")),
    Case("predict-out-under-a-file", PREDICT + " --out {tmp}/f/p.h5ad", "is not a folder",
         _file("f")),
    Case("predict-out-not-h5ad", PREDICT + " --out {tmp}/p.csv", "must end in .h5ad"),
    Case("train-out-is-section", TRAIN + " --out {section}", "one of the inputs"),
    Case("train-init-is-out", TRAIN + " --init {model} --out {model} --overwrite",
         "one of the inputs"),
    Case("train-resume-init-is-out", "train {section} --init {model} --out {model} --resume",
         "one of the inputs"),
    Case("train-val-is-out", TRAIN + " --val {base}/zeros.h5ad --out {base}/zeros.h5ad",
         "one of the inputs"),
    Case("train-out-exists", TRAIN + " --out {tmp}/m.pt", "already exists", _file("m.pt")),
    Case("train-companion-is-input",
         TRAIN + " --out {tmp}/section.pt --init {tmp}/section.selection.pt",
         "one of the inputs", _link("section.selection.pt", "model.pt")),
    Case("convert-onto-itself", "convert {slide} {slide}", "one of the inputs"),
    Case("convert-out-exists", "convert {slide} {tmp}/x.ome.tif", "already exists",
         _file("x.ome.tif")),
    Case("import-out-is-input", "import csv {tmp}/in.h5ad --image {slide} --out {tmp}/in.h5ad",
         "one of the inputs", _csv("x,y\n1,2\n", "in.h5ad")),
    Case("import-out-exists", CSV, "already exists", _both(_csv("x,y\n300,300\n"),
                                                           _file("s.h5ad"))),
    Case("pseudolabel-out-is-input", "pseudolabel {section} --model {model} --out {section}",
         "one of the inputs"),
    Case("pseudolabel-out-exists", "pseudolabel {section} --model {model} --out {tmp}/p.h5ad",
         "already exists", _file("p.h5ad")),
    Case("pretrain-out-is-input", "pretrain {section} --out {section} --steps 1",
         "one of the inputs"),
    Case("pretrain-out-exists", "pretrain {section} --out {tmp}/t.pt --steps 1",
         "already exists", _file("t.pt")),
    # -- 2. resource errors: one line naming the file, the previous file kept --
    Case("write-no-space", CSV + " --overwrite", "no space left",
         _both(_csv("x,y\n300,300\n"), _file("s.h5ad")),
         _fail_write(lambda f: OSError(errno.ENOSPC, "No space left on device", f))),
    Case("write-file-too-large", CSV + " --overwrite", "file-size limit",
         _both(_csv("x,y\n300,300\n"), _file("s.h5ad")),
         _fail_write(lambda f: OSError(errno.EFBIG, "File too large", f))),
    Case("write-quota", CSV, "quota", _csv("x,y\n300,300\n"),
         _fail_write(lambda f: OSError(errno.EDQUOT, "Disk quota exceeded", f))),
    Case("write-h5py-no-space", CSV, "s.h5ad: no space left", _csv("x,y\n300,300\n"),
         _fail_write(_h5py_text)),
    Case("out-read-only-fs", CSV, "read-only", _csv("x,y\n300,300\n"), _fail_probe(errno.EROFS)),
    Case("out-permission-denied", CSV, "does not accept new files", _csv("x,y\n300,300\n"),
         _fail_probe(errno.EACCES)),
    Case("out-of-memory", PREDICT + " --out {tmp}/p.h5ad", "out of memory", None, _out_of_memory),
    # -- 3. every value is checked where it enters --
    Case("set-lr-text", TRAIN_M + " --set lr=abc", "lr must be a number > 0"),
    Case("set-lr-nan", TRAIN_M + " --set lr=NaN", "lr must be a number > 0"),
    Case("set-epochs-fraction", TRAIN_M + " --set epochs=2.5",
         "epochs must be a whole number >= 1"),
    Case("set-optimizer", TRAIN_M + " --set optimizer=sgd",
         "optimizer must be one of ('adam', 'adamw')"),
    Case("set-bool-text", TRAIN_M + " --set refit=yes", "refit must be true or false"),
    Case("set-betas-text", TRAIN_M + " --set betas=abc", "betas must be a list of 2"),
    Case("set-ema-range", TRAIN_M + " --set ema_decay=1.5",
         "ema_decay must be a number in [0, 1)"),
    Case("set-batch-1", TRAIN_M + " --set batch_size=1", "batch_size must be a whole"),
    Case("set-seed-fraction", TRAIN_M + " --set seed=1.5", "seed must be a whole"),
    Case("set-unknown-key", TRAIN_M + " --set ema=0.9", "unknown training recipe keys"),
    Case("lr-negative", TRAIN + " --out {tmp}/m.pt --lr -1", "lr must be a number > 0"),
    Case("epochs-zero", TRAIN + " --out {tmp}/m.pt --epochs 0", "epochs must be a whole number"),
    Case("resume-other-data-same-name", "train {base}/other.h5ad --out {base}/stopped.pt --resume "
         "--device cpu --workers 0", "written for another section 'synthetic'"),
    Case("resume-with-lr", "train {section} --out {tmp}/m.pt --resume --lr 0.1 --set ema_decay=0",
         "--lr, --set would be ignored"),
    Case("resume-with-genes", "train {section} --out {tmp}/m.pt --resume --genes 4",
         "--genes would be ignored"),
    Case("train-empty-section",
         TRAIN.replace("{section}", "{base}/empty.h5ad") + " --out {tmp}/m.pt",
         "has no spots"),
    Case("train-zero-counts", TRAIN.replace("{section}", "{base}/zeros.h5ad") + " --out {tmp}/m.pt",
         "only zero counts"),
    Case("csv-header-only", CSV, "holds no spots", _csv("x,y\n")),
    Case("csv-array-row-nan", CSV, "column array_row",
         _csv("x,y,array_row\n300,300,\n400,300,1\n")),
    Case("csv-array-col-fraction", CSV, "column array_col must hold whole numbers",
         _csv("x,y,array_col\n300,300,1.5\n")),
    Case("csv-x-nan", CSV, "column x holds 1 missing", _csv("x,y\nnan,300\n400,300\n")),
    Case("csv-pixel-col-text", CSV, "column pxl_col_in_fullres",
         _csv("pxl_col_in_fullres,pxl_row_in_fullres\nabc,300\n")),
    Case("csv-y-inf", CSV, "column y", _csv("x,y\n300,inf\n")),
    Case("csv-no-coordinates", CSV, "no spot-centre columns", _csv("a,b\n1,2\n")),
    Case("csv-duplicate-ids", CSV, "duplicated spot ids", _csv("id,x,y\na,300,300\na,400,300\n")),
    Case("csv-outside-slide", CSV, "outside the slide", _csv("x,y\n99999,300\n")),
    Case("visium-spot-diameter-zero", "import visium {tmp}/run/outs --out {tmp}/v.h5ad",
         "spot_diameter_fullres must be a positive number", _spaceranger(spot_diameter_fullres=0)),
    Case("visium-negative-scalef", "import visium {tmp}/run/outs --out {tmp}/v.h5ad",
         "tissue_hires_scalef must be a positive number", _spaceranger(tissue_hires_scalef=-0.2)),
    Case("csv-spot-diameter-zero", CSV + " --spot-diameter-um 0", "spot diameter",
         _csv("x,y\n300,300\n")),
    Case("csv-spot-diameter-negative", CSV + " --spot-diameter-um -5", "spot diameter",
         _csv("x,y\n300,300\n")),
    Case("csv-empty-file", CSV, "cannot read the spot csv", _csv("")),
    Case("import-mpp-tiny", CSV + " --mpp 0.0001", "outside the plausible", _csv("x,y\n300,300\n")),
    Case("import-mpp-huge", CSV + " --mpp 50", "outside the plausible", _csv("x,y\n300,300\n")),
    Case("import-mpp-zero", CSV + " --mpp 0", "must be a positive number", _csv("x,y\n300,300\n")),
    Case("import-mpp-nan", CSV + " --mpp nan", "must be a positive number", _csv("x,y\n300,300\n")),
    Case("her2st-pixel-x-nan", ST, "column pixel_x",
         _st(ST_HEAD + "1\t1\t1.0\t1.0\t\t300\n2\t1\t2.0\t1.0\t400\t300\n")),
    Case("her2st-new-x-nan", ST, "column new_x",
         _st(ST_HEAD + "1\t1\tnan\t1.0\t300\t300\n2\t1\t2.0\t1.0\t400\t300\n")),
    Case("her2st-array-fraction", ST, "column x must hold whole numbers",
         _st(ST_HEAD + "1.5\t1\t1.0\t1.0\t300\t300\n")),
    Case("her2st-empty-counts", ST, "count matrix is empty", _st(ST_OK, "\tG1\tG2\n")),
    Case("her2st-no-selected-spots", ST, "no (selected) spots",
         _st("x\ty\tpixel_x\tpixel_y\tselected\n1\t1\t300\t300\t0\n")),
    Case("her2st-negative-counts", ST, "negative", _st(ST_OK, "\tG1\n1x1\t-1\n2x1\t3\n")),
    Case("her2st-text-counts", ST, "non-numeric", _st(ST_OK, "\tG1\n1x1\tabc\n2x1\t3\n")),
    Case("her2st-mpp-implausible", ST.replace("{slide}", "{tmp}/bare.png"),  # 0.5 px per 200 µm
         "400 (from array geometry", _both(_png, _st(ST_HEAD + "1\t1\t1.0\t1.0\t300\t300\n"
                                                     "2\t1\t2.0\t1.0\t300.5\t300\n"))),
    Case("convert-mpp-tiny", "convert {slide} {tmp}/x.ome.tif --mpp 0.001", "outside the plausible"),
    Case("predict-mpp-tiny-grid", "predict {slide} --grid hex:100 --mpp 0.0001 --model {model} "
         "--out {tmp}/p.h5ad", "outside the plausible"),
    Case("predict-spots-mpp-tiny", "predict {slide} --spots {base}/spots.csv --mpp 0.001 "
         "--model {model} --out {tmp}/p.h5ad", "outside the plausible"),
    Case("predict-section-mpp-100", "predict {base}/mpp100.h5ad --model {model} --out {tmp}/p.h5ad",
         "outside the plausible"),
    Case("predict-grid-kind", "predict {slide} --grid tri:5 --mpp 2 --model {model} "
         "--out {tmp}/p.h5ad", "kind must be hex or square"),
    Case("predict-grid-pitch", "predict {slide} --grid hex:abc --mpp 2 --model {model} "
         "--out {tmp}/p.h5ad", "pitch must be a number"),
    Case("predict-batch-zero", PREDICT + " --out {tmp}/p.h5ad --batch-size 0", "--batch-size"),
    Case("predict-tta", PREDICT + " --out {tmp}/p.h5ad --tta 99", "test-time views"),
    Case("predict-missing-input", "predict {tmp}/nope.h5ad --model {model} --out {tmp}/p.h5ad",
         "does not exist"),
    Case("evaluate-missing", "evaluate {tmp}/nope.h5ad", "prediction file not found"),
    # -- 4. no silent garbage --
    Case("model-nan-weights", PREDICT.replace("{model}", "{base}/nan.pt") + " --out {tmp}/p.h5ad",
         "nan.pt: 1 weight tensor(s) hold nan"),
    Case("model-inf-weights", PREDICT.replace("{model}", "{base}/inf.pt") + " --out {tmp}/p.h5ad",
         "inf.pt: 1 weight tensor(s) hold nan or infinite"),
    Case("info-nan-weights", "info {base}/nan.pt", "hold nan or infinite"),
    Case("prediction-inf", PREDICT.replace("{model}", "{base}/overflow.pt") + " --out {tmp}/p.h5ad",
         "overflow.pt predicted"),
    Case("train-lr-1000", TRAIN + " --out {tmp}/m.pt --lr 1000 --set refit=false --batch-size 32",
         "lower the learning rate (--lr, 1000 now)"),
    # -- 5. untrusted files: a pickle payload never runs, PyTorch's advice is never passed on --
    Case("evil-model", PREDICT.replace("{model}", "{tmp}/evil.pt") + " --out {tmp}/p.h5ad", UNSAFE,
         _evil("evil.pt")),
    Case("evil-init", TRAIN.replace("--model-config {tiny} ", "") + " --out {tmp}/m.pt --init "
         "{tmp}/evil.pt", UNSAFE, _evil("evil.pt")),
    Case("evil-spot-encoder", TRAIN + " --out {tmp}/m.pt --spot-encoder-init {tmp}/evil.pt", UNSAFE,
         _evil("evil.pt")),
    Case("evil-region-encoder", TRAIN + " --out {tmp}/m.pt --region-encoder-init {tmp}/evil.pt",
         UNSAFE, _evil("evil.pt")),
    Case("evil-resume-state", "train {section} --out {tmp}/m.pt --resume --device cpu", UNSAFE,
         _both(_evil("m.resume.pt"), _file("m.pt"))),
    Case("evil-teacher", "pseudolabel {section} --model {tmp}/evil.pt --out {tmp}/p.h5ad "
         "--device cpu", UNSAFE, _evil("evil.pt")),
    Case("evil-info", "info {tmp}/evil.pt", UNSAFE, _evil("evil.pt")),
    Case("plain-pickle-model", PREDICT.replace("{model}", "{tmp}/plain.pt") + " --out {tmp}/p.h5ad",
         UNSAFE, _plain_pickle),
    Case("truncated-model", PREDICT.replace("{model}", "{tmp}/cut.pt") + " --out {tmp}/p.h5ad",
         "truncated or corrupt", _truncated),
    Case("json-as-model", "info {tmp}/m.json", "a json file", _file("m.json", b'{"a": 1}')),
    Case("missing-model", PREDICT.replace("{model}", "{tmp}/none.pt") + " --out {tmp}/p.h5ad",
         "checkpoint not found"),
]


def _snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _paths(base: Path, tmp: Path) -> dict[str, str]:
    return {"base": str(base), "tmp": str(tmp), "section": str(base / "section.h5ad"),
            "slide": str(base / "slide.ome.tif"), "model": str(base / "model.pt"),
            "tiny": str(base / "tiny.json")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(
    case: Case, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if case.setup:
        case.setup(base, tmp_path)
    before = _snapshot(base, tmp_path)
    argv = shlex.split(case.argv.format(**_paths(base, tmp_path)))
    if case.fault:
        case.fault(monkeypatch)
    code = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    # what is left of each line once progress bars (redrawn after "\r") are taken out
    lines = [s for line in err.split("\n") if (s := line.rpartition("\r")[2].strip())
             and not PROGRESS.search(s)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hifusion "), err
    assert case.expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    assert _snapshot(base, tmp_path) == before, "a file was changed, created or removed"
    assert not (tmp_path / "marker").exists(), "a pickle payload ran"


def test_the_matrix_is_large_and_distinct() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


# -- what must keep working -----------------------------------------------------------------------
def test_overwrite_replaces_an_existing_output(base: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.csv").write_text("x,y\n300,300\n400,300\n")
    out = tmp_path / "s.h5ad"
    out.write_bytes(b"old")
    argv = ["import", "csv", str(tmp_path / "in.csv"), "--image", str(base / "slide.ome.tif"),
            "--out", str(out)]
    assert main(argv) == 2 and out.read_bytes() == b"old"
    assert main([*argv, "--overwrite"]) == 0
    assert read_section(out).n_obs == 2
    assert main([*argv, "--mpp", "30"]) == 2  # an odd µm/px needs --any-mpp ...
    assert main([*argv, "--mpp", "30", "--any-mpp", "--overwrite"]) == 0  # ... and then works
    assert read_section(out).uns["hifusion"]["mpp"] == 30
    capsys.readouterr()


def test_resume_may_write_over_its_own_output(base: Path, tmp_path: Path, capsys) -> None:
    """``--resume`` continues ``--out``: its existence is expected, not refused."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous model")
    assert main(["train", str(base / "section.h5ad"), "--out", str(out), "--resume",
                 "--device", "cpu"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_legacy_torch_save_checkpoint_still_loads(base: Path, tmp_path: Path) -> None:
    """Checkpoints written before the zip format (a pickle head) load through weights_only."""
    raw = torch.load(base / "model.pt", weights_only=True)
    torch.save(raw, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes()[:1] == b"\x80"
    assert load_checkpoint(tmp_path / "legacy.pt").genes == raw["config"]["genes"]


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The evil file is no dud: an unsafe load runs it (the rows above prove we never do)."""
    _evil("evil.pt")(tmp_path, tmp_path)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hifusion_model", *args],
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_debug_shows_the_traceback(base: Path) -> None:
    from hifusion_model.errors import OutputError

    section = str(base / "section.h5ad")
    with pytest.raises(OutputError, match="one of the inputs"):
        main(["--debug", "predict", section, "--model", str(base / "model.pt"), "--out", section])


def test_a_closed_pipe_is_no_traceback(base: Path, tmp_path: Path, capsys) -> None:
    """``hifusion evaluate PRED --json | head -c 1``: the reader leaves, the command ends
    quietly."""
    pred = tmp_path / "p.h5ad"
    assert main(["predict", str(base / "section.h5ad"), "--model", str(base / "model.pt"),
                 "--out", str(pred), "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    proc = _cli("evaluate", str(pred), "--json", stdout=subprocess.PIPE)
    proc.stdout.close()  # nobody reads: every write fails with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_real_file_size_limit_is_one_line_and_no_crash(base: Path, tmp_path: Path) -> None:
    """A write beyond ``ulimit -f`` (EFBIG from the kernel, inside h5py): exit 2, no segfault."""
    import resource

    out = tmp_path / "s.h5ad"
    out.write_bytes(b"previous")
    n = 4000
    rows = "\n".join(f"s{i},{300 + i % 400},{200 + i // 400}" for i in range(n))
    (tmp_path / "in.csv").write_text("id,x,y\n" + rows + "\n")
    limit = 64 * 1024  # the .h5ad of 4000 spots needs more

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _cli("import", "csv", str(tmp_path / "in.csv"), "--image", str(base / "slide.ome.tif"),
                "--out", str(out), "--overwrite", stdout=subprocess.DEVNULL,
                preexec_fn=small_files, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2, err
    assert "file-size limit" in err and "s.h5ad" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == sorted(["in.csv", "s.h5ad"]) or \
        sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "s.h5ad"]
