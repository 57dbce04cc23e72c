"""Spot and region patches cut from blocks of the slide (inference/blocks.py) against the exact
path's own reads: the same pixels at the model's scale, within a fraction of a pixel when the
slide is resampled, in the order and batches asked for."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from hifusion_model.data.dataset import SpotDataset
from hifusion_model.data.sections import new_section
from hifusion_model.data.slide import Slide
from hifusion_model.inference import blocks, dense, lattice
from hifusion_model.models.config import tiny_config

MPP = 2.0  # the synthetic slide's µm/px


@pytest.fixture(scope="module")
def slide(synthetic_slide_path):
    with Slide.open(synthetic_slide_path) as opened:
        yield opened


def cut(slide: Slide, spot_um: float, monkeypatch, n: int = 40, batch_size: int = 7):
    """Spots scattered over the slide (some over its edges) and the dense path's cuts of them,
    in blocks of 4 lattice rows × 5 columns."""
    monkeypatch.setattr(dense, "BAND_ROWS", 4)
    monkeypatch.setattr(dense, "CHUNK_COLS", 5)
    config = tiny_config(4, spot_px=224, region_px=448, spot_um=spot_um, region_um=2 * spot_um)
    xy = np.random.default_rng(0).uniform([-50, -50], [1074, 818], (n, 2))
    section = new_section(xy, slide=slide.path, mpp=MPP, spot_diameter_um=100.0, name="blocks",
                          source="grid:hex")
    grid = lattice.Lattice.of(config, MPP)
    dataset = SpotDataset(section, slide, config, raw=True)
    origins = grid.positions(dataset.centers, config.spot_px)
    _, first = lattice.needed_cells(origins, config.spot_px // grid.step)
    order, _, block = dense.band_order(origins, first)
    sizes = ((dataset.spot_size_px, config.spot_px), (dataset.region_size_px, config.region_px))
    batches = list(blocks.block_batches(slide, dataset.centers, order, block, sizes,
                                        batch_size))
    return dataset, order, block, batches


def test_at_the_models_scale_the_cuts_are_the_exact_paths_pixels(slide, monkeypatch):
    dataset, order, block, batches = cut(slide, 224 * MPP, monkeypatch)  # read 1:1
    assert len(set(block.tolist())) > 5  # spots from many blocks, batches across them
    assert torch.cat([b["index"] for b in batches]).tolist() == order.tolist()
    assert [len(b["index"]) for b in batches] == [7] * 5 + [5]
    for batch in batches:
        for key in ("spot", "region"):  # the network's memory format, with no copy to make
            assert batch[key].is_contiguous(memory_format=torch.channels_last), key
        for k, i in enumerate(batch["index"].tolist()):
            exact = dataset[i]
            assert torch.equal(batch["spot"][k], exact["spot"]), i
            assert torch.equal(batch["region"][k], exact["region"]), i


def test_resampled_cuts_start_at_the_exact_crops_nearest_px(tmp_path, monkeypatch):
    """At 0.73 model px a slide px (the released model on a 0.5 µm/px scan) every cut matches
    the exact path's crop better than any cut a px off: the block is resampled by the spot's
    own ratio, with no drift across it. The tissue is sharp noise, so a px shows."""
    noise = np.random.default_rng(1).uniform(0, 255, (768, 1024, 3))
    path = tmp_path / "noise.tif"
    tifffile.imwrite(path, np.clip(3 * ndimage.gaussian_filter(noise, (1.5, 1.5, 0)) - 255,
                                   0, 255).astype(np.uint8))
    with Slide.open(path, mpp=MPP) as sharp:
        dataset, _, _, batches = cut(sharp, 307 * MPP, monkeypatch, n=12)
        for batch in batches:
            for k, i in enumerate(batch["index"].tolist()):
                exact = dataset[i]["region"].float()[:, 1:-1, 1:-1]
                got = batch["region"][k].float()
                error = {(dx, dy): float((got[:, 1 + dy:447 + dy, 1 + dx:447 + dx] - exact)
                                         .abs().mean())
                         for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
                assert min(error, key=error.get) == (0, 0), (i, error)


def test_reading_ahead_gives_the_same_batches_and_stops_with_the_consumer(slide, monkeypatch):
    config = tiny_config(4, spot_px=224, region_px=448, spot_um=224 * MPP, region_um=448 * MPP)
    grid = lattice.Lattice.of(config, MPP)
    centers = np.array([[150.0, 150], [700, 160], [160, 600], [720, 610]])
    order, block = np.arange(4), np.arange(4)
    inline = list(blocks.block_batches(slide, centers, order, block, ((224, 224), (448, 448)), 1,
                                       prefetch=False))
    ahead = blocks.block_batches(slide, centers, order, block, ((224, 224), (448, 448)), 1)
    first = next(ahead)
    assert torch.equal(first["region"], inline[0]["region"])
    ahead.close()  # the consumer stops early: the reading thread goes
    assert not [t for t in threading.enumerate() if t.name.startswith("hifusion-read")]
