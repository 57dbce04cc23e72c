"""SpotDataset and Augment: patch geometry, targets, paired augmentation, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch

from hifusion_model.data.dataset import Augment, SpotDataset, as_unit_float, spot_loader
from hifusion_model.data.sections import new_section
from hifusion_model.data.slide import Slide
from hifusion_model.errors import ConfigError, SectionError, SlideError
from hifusion_model.models.config import tiny_config

MPP = 0.5
GENES = ["A", "B", "C", "D"]


@pytest.fixture
def image():
    """Random, so every flip and rotation of a patch is distinguishable from the others."""
    return np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)


@pytest.fixture
def slide(tmp_path, image):
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm"})
    with Slide.open(path) as s:
        yield s


@pytest.fixture
def section(slide):
    spatial = np.array([[100.0, 80.0], [160.4, 120.6], [250.0, 200.0], [5.0, 5.0]])
    counts = np.array([[0, 1, 2, 3], [10, 0, 0, 5], [1, 1, 1, 1], [0, 0, 0, 0]])
    return new_section(spatial, slide=slide.path, mpp=MPP, spot_diameter_um=100, name="syn",
                       source="test", counts=counts, genes=GENES)


@pytest.fixture
def config():
    # spot: 14 µm = 28 px at 0.5 µm/px, read natively; region: 56 µm = 112 px, shrunk to 56 px
    return tiny_config(GENES, spot_px=28, region_px=56, spot_um=14.0, region_um=56.0)


def as_uint8(t: torch.Tensor) -> np.ndarray:
    return np.rint(t.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


def crop(image, center, n):
    x0, y0 = (math.floor(c - n / 2 + 0.5) for c in center)
    return image[y0:y0 + n, x0:x0 + n]


def test_sample_shapes_pixels_and_targets(section, slide, config, image):
    data = SpotDataset(section, slide, config, genes=GENES)
    assert len(data) == 4
    sample = data[1]
    assert sample["index"] == 1
    assert sample["spot"].shape == (3, 28, 28) and sample["spot"].dtype == torch.float32
    assert sample["region"].shape == (3, 56, 56) and sample["region"].dtype == torch.float32
    assert sample["region"].min() >= 0 and sample["region"].max() <= 1
    np.testing.assert_array_equal(as_uint8(sample["spot"]), crop(image, (160.4, 120.6), 28))
    c = np.asarray(section.X.toarray()) + 1.0
    expected = np.log(c / c.sum(axis=1, keepdims=True))
    targets = torch.stack([data[i]["target"] for i in range(4)])
    assert targets.dtype == torch.float32
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)
    with pytest.raises(IndexError):
        data[4]


def test_raw_patches_are_the_same_pixels_as_uint8(section, slide, config):
    raw, unit = SpotDataset(section, slide, config, raw=True)[1], SpotDataset(section, slide,
                                                                              config)[1]
    for key in ("spot", "region"):
        assert raw[key].dtype == torch.uint8
        torch.testing.assert_close(as_unit_float(raw[key]), unit[key], rtol=0, atol=1e-7)
        assert as_unit_float(unit[key]) is unit[key]
    with pytest.raises(ConfigError, match="cannot be augmented"):
        SpotDataset(section, slide, config, augment=Augment(), raw=True)


def test_without_genes_there_is_no_target_and_edges_are_white(section, slide, config):
    sample = SpotDataset(section, slide, config)[3]  # spot at (5, 5): mostly off the slide
    assert "target" not in sample
    assert (sample["region"][:, :10, :10] == 1).all()


def test_dataset_errors(section, slide, config, tmp_path, image):
    with pytest.raises(SectionError, match="lacks 1 of the 5 genes"):
        SpotDataset(section, slide, config, genes=GENES + ["ERBB2"])
    tifffile.imwrite(tmp_path / "bare.tif", image)
    with pytest.raises(SlideError, match="bare.tif.*--mpp"):
        SpotDataset(section, Slide.open(tmp_path / "bare.tif"), config)
    with pytest.raises(ConfigError, match="color_gain"):
        Augment(color_gain=-0.1)


D4 = [(flip, k) for flip in (False, True) for k in range(4)]


def transform(im: np.ndarray, flip: bool, k: int) -> np.ndarray:
    return np.rot90(im[:, ::-1] if flip else im, k, axes=(0, 1))


def which(before: np.ndarray, after: np.ndarray) -> tuple[bool, int]:
    """The dihedral transform taking ``before`` to ``after`` (the image is random: unique)."""
    matches = [g for g in D4 if np.array_equal(transform(before, *g), after)]
    assert len(matches) == 1
    return matches[0]


def test_augmentation_moves_spot_and_region_together(section, slide, config):
    plain = SpotDataset(section, slide, config)[0]
    spot0, region0 = as_uint8(plain["spot"]), as_uint8(plain["region"])
    data = SpotDataset(section, slide, config, augment=Augment(seed=7))
    seen = set()
    for _ in range(24):
        sample = data[0]
        g = which(spot0, as_uint8(sample["spot"]))
        np.testing.assert_array_equal(as_uint8(sample["region"]), transform(region0, *g))
        seen.add(g)
    assert len(seen) >= 6  # the draw really varies over the dihedral group


def test_same_seed_same_augmentation(section, slide, config):
    def draws(seed):
        data = SpotDataset(section, slide, config, augment=Augment(seed=seed, color_gain=0.1))
        return torch.stack([data[i % 4]["spot"] for i in range(12)])

    assert torch.equal(draws(3), draws(3))
    assert not torch.equal(draws(3), draws(4))


def test_colour_and_stain_jitter_are_shared_and_bounded():
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 3), dtype=np.float32)
    for augment in (Augment(flips=False, rotations=False, color_gain=0.1, color_bias=0.05),
                    Augment(flips=False, rotations=False, hed_sigma=0.05)):
        a, b = augment(image, image.copy(), rng)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
        assert 0 < np.abs(a - image).mean() < 0.2
    gain_only = Augment(flips=False, rotations=False, color_gain=0.1)
    out, _ = gain_only(np.full((4, 4, 3), 0.5, np.float32), np.zeros((4, 4, 3), np.float32), rng)
    assert np.all(np.abs(out / 0.5 - 1) <= 0.1 + 1e-6)


def test_loader_batches_in_a_worker_process(section, slide, config):
    data = SpotDataset(section, slide, config, genes=GENES, augment=Augment(seed=0))
    loader = spot_loader(data, batch_size=2, shuffle=False, num_workers=1, device="cpu")
    assert not loader.pin_memory and loader.persistent_workers
    batches = list(loader)  # the forked worker reopens the lazy TIFF rather than share its offset
    assert [b["spot"].shape for b in batches] == [(2, 3, 28, 28)] * 2
    assert batches[1]["target"].shape == (2, 4)
    assert batches[0]["index"].tolist() == [0, 1]


