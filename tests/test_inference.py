"""Inference: batched prediction with prefetching, the prediction file, grids on bare slides."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
import torch
from synthetic import spot_array_section
from torch.utils.data import Dataset

from hifusion_model.data.dataset import SpotDataset
from hifusion_model.data.expression import counts_matrix, normalize_counts
from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.data.slide import Slide
from hifusion_model.devices import autocast_dtype, cpu_has_native_bf16, resolve_device
from hifusion_model.errors import Cancelled, ConfigError, SectionError, SlideError
from hifusion_model.inference.predict import (
    CPU_CHUNK,
    check_section_genes,
    dihedral,
    grid_section,
    predict_section,
    predictions_to_anndata,
    prefetch_batches,
    write_predictions,
)
from hifusion_model.models.checkpoint import load_model, save_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion


@pytest.fixture(scope="module")
def section_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 neighbouring legacy-ST spots (HER2ST's geometry and genes, synthetic tissue)."""
    return spot_array_section(tmp_path_factory.mktemp("st"), n_spots=24)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    genes = ["ERBB2", "KRT19", "CD74", "ACTB", "FASN"]
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return save_checkpoint(
        path,
        HiFusion(tiny_config(genes)),
        train_mean=-np.arange(1.0, 6.0),
        card={"data": ["B1"], "recipe": {"name": "hifusion"}, "epoch": 3},
    )


def synthetic_slide(path: Path, size: int = 500) -> Path:
    """White glass with a pink disc of 'tissue' in the middle, no µm/px in the file."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 245, np.uint8)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rng = np.random.default_rng(0)
    image[disc] = (np.array([200, 90, 160]) + rng.integers(-30, 30, (disc.sum(), 3))).clip(0, 255)
    tifffile.imwrite(path, image, photometric="rgb")
    return path


# -- prefetching ------------------------------------------------------------------------------
class _Slow(Dataset):
    """Records how many items are being read at once."""

    def __init__(self, n: int) -> None:
        self.n, self.active, self.peak, self.lock = n, 0, 0, threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.002)
        with self.lock:
            self.active -= 1
        return {"x": torch.tensor([i])}


def test_prefetch_keeps_order_and_overlaps_reads() -> None:
    data = _Slow(23)
    batches = list(prefetch_batches(data, 5, workers=3))
    assert [b["x"].ravel().tolist() for b in batches] == [
        list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)
    ]
    assert data.peak > 1  # batches were read concurrently
    sequential = _Slow(23)
    assert len(list(prefetch_batches(sequential, 5, workers=0))) == 5 and sequential.peak == 1


def test_prefetch_stops_reading_when_closed() -> None:
    data = _Slow(1000)
    gen = prefetch_batches(data, 10, workers=2, prefetch=2)
    next(gen)
    gen.close()
    time.sleep(0.05)
    assert data.active == 0


# -- devices ----------------------------------------------------------------------------------
def test_device_and_precision_rules() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu" and resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(cpu, "auto", training=True) is None
    assert autocast_dtype(cpu, "auto") is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(ConfigError, match="fp16 autocast is for GPUs"):
        autocast_dtype(cpu, "fp16")
    # int8 quantises the CPU's graph; whatever runs outside it runs as under auto
    assert autocast_dtype(cpu, "int8") is autocast_dtype(cpu, "auto")
    for device, training in ((torch.device("cuda"), False), (cpu, True)):
        with pytest.raises(ConfigError, match="int8 is for predicting on the CPU"):
            autocast_dtype(device, "int8", training=training)
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


# -- predict_section --------------------------------------------------------------------------
def test_predict_section_matches_a_plain_forward_pass(section_path: Path, model_file: Path) -> None:
    model, ckpt = load_model(model_file)
    section = read_section(section_path)
    slide = section_slide(section)
    assert CPU_CHUNK < 20  # batches of 20 run as 8 + 8 + 4 on the CPU: chunks stitch exactly
    pred = predict_section(
        model, ckpt, section, slide, batch_size=20, device="cpu", precision="fp32", workers=2
    )
    samples = [SpotDataset(section, slide, ckpt.config)[i] for i in range(section.n_obs)]
    with torch.no_grad():
        expected = model(
            torch.stack([s["spot"] for s in samples]), torch.stack([s["region"] for s in samples])
        ).prediction.numpy()
    assert pred.shape == (24, 5) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, expected, atol=1e-5)
    low = predict_section(
        model, ckpt.config, section, slide, device="cpu", precision="bf16", workers=0
    )
    np.testing.assert_allclose(low, pred, atol=0.1)  # bf16 keeps ~3 significant digits


def test_dihedral_views_are_the_eight_symmetries_of_the_square() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = [dihedral(x, k) for k in range(8)]
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_test_time_views_average_the_symmetric_predictions(section_path: Path,
                                                           model_file: Path) -> None:
    model, ckpt = load_model(model_file)
    section = read_section(section_path)[:6].copy()
    slide = section_slide(section)
    samples = [SpotDataset(section, slide, ckpt.config)[i] for i in range(section.n_obs)]
    spot, region = (torch.stack([s[k] for s in samples]) for k in ("spot", "region"))
    with torch.no_grad():
        views = [model(dihedral(spot, k), dihedral(region, k)).prediction for k in range(4)]
    pred = predict_section(model, ckpt, section, slide, device="cpu", precision="fp32", tta=4)
    np.testing.assert_allclose(pred, torch.stack(views).mean(0).numpy(), atol=1e-5)
    assert not np.allclose(pred, views[0].numpy(), atol=1e-4)  # the views do differ
    with pytest.raises(ConfigError, match="1 to 8"):
        predict_section(model, ckpt, section, slide, device="cpu", tta=9)


def test_predict_section_reports_progress_and_stops(section_path: Path, model_file: Path) -> None:
    model, ckpt = load_model(model_file)
    section = read_section(section_path)
    slide = section_slide(section)
    seen = []
    predict_section(
        model,
        ckpt,
        section,
        slide,
        batch_size=10,
        device="cpu",
        precision="fp32",
        progress=lambda done, total, msg: seen.append((done, total)),
    )
    assert seen == [(10, 24), (20, 24), (24, 24)]
    with pytest.raises(Cancelled, match="after 10 spots"):
        predict_section(
            model,
            ckpt,
            section,
            slide,
            batch_size=10,
            device="cpu",
            should_stop=lambda: len(seen) > 3,
            progress=lambda *a: seen.append(a),
        )


def test_prediction_file_holds_truth_model_and_slide(
    section_path: Path, model_file: Path, tmp_path: Path
) -> None:
    model, ckpt = load_model(model_file)
    section = read_section(section_path)
    pred = np.random.default_rng(0).normal(size=(24, 5)).astype(np.float32)
    out = write_predictions(
        predictions_to_anndata(section, pred, ckpt, source="tiny.pt"), tmp_path / "p.h5ad"
    )
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X, pred)
    assert list(back.var_names) == ckpt.genes and list(back.obs_names) == list(section.obs_names)
    truth = normalize_counts(counts_matrix(section, ckpt.genes), "log_relative")
    np.testing.assert_allclose(back.layers["truth"], truth)
    np.testing.assert_array_equal(back.obsm["spatial"], section.obsm["spatial"])
    np.testing.assert_array_equal(back.obs["array_row"], section.obs["array_row"])
    meta = back.uns["hifusion"]
    assert meta["name"] == "B4" and meta["mpp"] == pytest.approx(section.uns["hifusion"]["mpp"])
    assert (out.parent / meta["slide"]).resolve() == Path(section.uns["hifusion"]["slide_abs"])
    ident = back.uns["hifusion_model"]
    assert (
        ident["source"] == "tiny.pt"
        and ident["n_genes"] == 5
        and ident["normalization"] == "log_relative"
    )
    np.testing.assert_allclose(ident["train_mean"], -np.arange(1.0, 6.0))
    assert ident["card"]["trained_on"] == ["B1"] and ident["card"]["epoch"] == 3
    with pytest.raises(SectionError, match="expected \\(24, 5\\)"):
        predictions_to_anndata(section, pred[:3], ckpt)


def test_section_genes_must_cover_the_model(section_path: Path) -> None:
    section = read_section(section_path)
    check_section_genes(section, ["ERBB2", "CD74"])
    with pytest.raises(SectionError, match="lacks 1 of the model's 2 .*NOT_A_GENE"):
        check_section_genes(section, ["ERBB2", "NOT_A_GENE"])


# -- bare slides ------------------------------------------------------------------------------
def test_grid_on_a_bare_slide_covers_the_tissue(tmp_path: Path, model_file: Path) -> None:
    slide = Slide.open(synthetic_slide(tmp_path / "s.tif"), mpp=2.0)
    section = grid_section(slide, kind="hex", pitch_um=100)
    whole = grid_section(slide, kind="hex", pitch_um=100, on_tissue=False)
    assert 0 < section.n_obs < whole.n_obs and section.n_vars == 0
    centre = np.asarray(section.obsm["spatial"]) - 250
    assert (np.hypot(*centre.T) < 500 / 3 + 10).all()  # on the disc (radius 500 / 3 px)
    assert section.uns["hifusion"]["spot_diameter_um"] == pytest.approx(55)
    model, ckpt = load_model(model_file)
    pred = predict_section(model, ckpt, section, slide, device="cpu", precision="fp32", workers=0)
    adata = predictions_to_anndata(section, pred, ckpt)
    assert adata.shape == (section.n_obs, 5) and "truth" not in adata.layers
    with pytest.raises(SlideError, match="mpp"):
        grid_section(Slide.open(tmp_path / "s.tif"))


# -- the scanpy / squidpy convention ----------------------------------------------------------
@pytest.fixture(scope="module")
def visium_predictions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ad.AnnData]:
    """A real-shaped Space Ranger section (4 µm/px) and random predictions written for it."""
    from spaceranger import write_spaceranger

    from hifusion_model.data.importers import import_visium
    from hifusion_model.models.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("visium")
    section = import_visium(write_spaceranger(root, mpp=4.0))
    genes = ["ERBB2", "GATA3", "KRT19"]
    ckpt = load_checkpoint(save_checkpoint(root / "m.pt", HiFusion(tiny_config(genes)),
                                           train_mean=-np.arange(1.0, 4.0)))
    pred = np.random.default_rng(0).normal(-5, 1, (section.n_obs, 3)).astype(np.float32)
    return write_predictions(predictions_to_anndata(section, pred, ckpt), root / "p.h5ad"), section


def test_prediction_file_follows_the_scanpy_spatial_convention(visium_predictions) -> None:
    import h5py

    path, section = visium_predictions
    pred = ad.read_h5ad(path)
    [library] = pred.uns["spatial"]
    lib = pred.uns["spatial"][library]
    assert library == "run"
    image = lib["images"]["hires"]
    factors = lib["scalefactors"]
    mpp = section.uns["hifusion"]["mpp"]
    assert image.dtype == np.uint8 and image.ndim == 3 and max(image.shape[:2]) == 2000
    with Slide.open(section.uns["hifusion"]["slide_abs"]) as slide:
        assert factors["tissue_hires_scalef"] == pytest.approx(image.shape[1] / slide.shape[1])
    assert factors["spot_diameter_fullres"] == pytest.approx(55.0 / mpp)
    # each spot, scaled as scanpy scales it, lands on the tissue (pink) of the thumbnail
    xy = np.round(pred.obsm["spatial"] * factors["tissue_hires_scalef"]).astype(int)
    colours = image[xy[:, 1], xy[:, 0]].astype(int)
    assert (np.abs(colours - [200, 110, 170]).max(axis=1) < 12).mean() > 0.95
    with h5py.File(path) as f:  # the thumbnail is compressed: the file stays small
        assert f[f"uns/spatial/{library}/images/hires"].compression == "gzip"
    assert path.stat().st_size < 0.5 * image.nbytes
    assert Path(lib["metadata"]["source_image_path"]) == Path(section.uns["hifusion"]["slide_abs"])


def test_squidpy_and_scanpy_draw_predictions_unchanged(visium_predictions, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    sq = pytest.importorskip("squidpy")
    sc = pytest.importorskip("scanpy")
    import matplotlib.pyplot as plt

    pred = ad.read_h5ad(visium_predictions[0])
    sq.pl.spatial_scatter(pred, color="ERBB2")
    plt.savefig(tmp_path / "squidpy.png")
    sc.pl.spatial(pred, color="ERBB2", show=False)
    plt.savefig(tmp_path / "scanpy.png")
    plt.close("all")
    assert (tmp_path / "squidpy.png").stat().st_size > 0 and (tmp_path / "scanpy.png").stat().st_size > 0


def test_prediction_file_reuses_an_open_slide_or_goes_without_image(
    visium_predictions, tmp_path: Path
) -> None:
    path, section = visium_predictions
    adata = ad.read_h5ad(path)
    del adata.uns["spatial"]
    adata.uns["hifusion"]["slide_abs"] = section.uns["hifusion"]["slide_abs"]
    with Slide.open(section.uns["hifusion"]["slide_abs"]) as slide:
        again = ad.read_h5ad(write_predictions(adata, tmp_path / "a.h5ad", image_px=500,
                                               slide=slide))
    [lib] = again.uns["spatial"].values()
    assert max(lib["images"]["hires"].shape[:2]) == 500
    bare = ad.read_h5ad(write_predictions(adata, tmp_path / "b.h5ad", image_px=0))
    [lib] = bare.uns["spatial"].values()
    assert "hires" not in lib.get("images", {}) and lib["scalefactors"]["tissue_hires_scalef"] == 1
