from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy.spatial import cKDTree
from skimage.draw import disk

from hifusion_model.data.grids import spot_grid, tissue_mask, tissue_mask_from_image
from hifusion_model.errors import SectionError

MPP = 10.0  # µm/px: a 100 µm pitch is 10 px, so grids stay small
H, W = 300, 400
CENTER, RADIUS = (150, 200), 100  # (row, col), px


def _pink_disk() -> np.ndarray:
    """White glass with one disk of H&E-pink tissue."""
    image = np.full((H, W, 3), 245, np.uint8)
    image[disk(CENTER, RADIUS, shape=(H, W))] = (200, 110, 170)
    return image


def _nearest_distances(xy: np.ndarray) -> np.ndarray:
    return cKDTree(xy).query(xy, k=2)[0][:, 1]


@pytest.fixture
def disk_slide(tmp_path):
    from hifusion_model.data.slide import Slide

    path = tmp_path / "disk.tif"
    tifffile.imwrite(path, _pink_disk(), photometric="rgb")
    return Slide.open(path, mpp=MPP)


def test_hex_grid_pitch_offsets_and_indices():
    xy, row, col = spot_grid((H, W), MPP, "hex", return_indices=True)
    pitch_px = 100 / MPP
    np.testing.assert_allclose(_nearest_distances(xy), pitch_px, rtol=1e-9)
    ys = np.unique(xy[:, 1])
    np.testing.assert_allclose(np.diff(ys), pitch_px * np.sqrt(3) / 2)
    first, second = (np.sort(xy[xy[:, 1] == y, 0]) for y in ys[:2])
    assert second[0] - first[0] == pytest.approx(pitch_px / 2)
    # Visium convention: columns step by 2 along a row, row and column have the same parity
    assert row.min() == 0 and col.min() >= 0
    assert np.all((row + col) % 2 == 0)
    in_row0 = np.sort(col[row == 0])
    assert np.all(np.diff(in_row0) == 2)
    # whole 55 µm spots inside the slide
    r = 27.5 / MPP
    assert xy[:, 0].min() >= r and xy[:, 1].min() >= r
    assert xy[:, 0].max() <= W - r and xy[:, 1].max() <= H - r


def test_square_grid_defaults_to_legacy_st():
    xy, row, col = spot_grid((H, W), MPP, "square", return_indices=True)
    np.testing.assert_allclose(_nearest_distances(xy), 200 / MPP)
    np.testing.assert_allclose(xy[0], [5, 5])  # 100 µm spot touching the corner
    assert len(xy) == len(np.unique(xy[:, 0])) * len(np.unique(xy[:, 1]))
    np.testing.assert_array_equal(xy[:, 0], 5 + col * 20)
    np.testing.assert_array_equal(xy[:, 1], 5 + row * 20)


def test_custom_pitch_and_origin():
    xy = spot_grid((H, W), MPP, "square", pitch_um=150, diameter_um=20, origin=(100, 100))
    np.testing.assert_allclose(_nearest_distances(xy), 15)
    assert np.any(np.all(xy == [100, 100], axis=1))
    assert xy[:, 0].min() == pytest.approx(10)  # lattice extends left of the origin: 100 - 6·15


def test_grid_on_tissue_only(disk_slide):
    mask, downsample = tissue_mask(disk_slide, max_px=200)
    assert mask.shape == (150, 200) and downsample == pytest.approx(2)
    xy = spot_grid(disk_slide.shape, MPP, "hex", mask=mask, mask_downsample=downsample)
    dist = np.hypot(xy[:, 0] - CENTER[1], xy[:, 1] - CENTER[0])
    assert dist.max() <= RADIUS + 2 * downsample
    full = spot_grid(disk_slide.shape, MPP, "hex")
    full_dist = np.hypot(full[:, 0] - CENTER[1], full[:, 1] - CENTER[0])
    assert abs(len(xy) - np.sum(full_dist < RADIUS)) <= 0.05 * len(xy)
    np.testing.assert_allclose(_nearest_distances(xy), 10, rtol=1e-9)


def test_tissue_mask_from_image_finds_the_disk():
    mask = tissue_mask_from_image(_pink_disk())
    truth = np.zeros((H, W), bool)
    truth[disk(CENTER, RADIUS, shape=(H, W))] = True
    assert (mask == truth).mean() > 0.99


def test_polygon_restricts_grid():
    triangle = np.array([[50, 50], [350, 50], [50, 250]], float)  # x, y
    xy = spot_grid((H, W), MPP, "hex", polygon=triangle)
    full = spot_grid((H, W), MPP, "hex")
    assert 0 < len(xy) < len(full)
    assert np.all(xy[:, 0] >= 50) and np.all(xy[:, 1] >= 50)
    assert np.all(xy[:, 0] / 300 + xy[:, 1] / 200 <= 1 + 50 / 300 + 50 / 200)


def test_empty_mask_is_an_error(tmp_path):
    from hifusion_model.data.slide import Slide

    path = tmp_path / "glass.tif"
    tifffile.imwrite(path, np.full((H, W, 3), 240, np.uint8), photometric="rgb")
    with pytest.raises(SectionError, match="no tissue found.*polygon"):
        tissue_mask(Slide.open(path, mpp=MPP))
    with pytest.raises(SectionError, match="no spot centre lies on the tissue"):
        spot_grid((H, W), MPP, mask=np.zeros((H, W), bool))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "triangle"}, "unknown grid kind"),
        ({"pitch_um": 50, "diameter_um": 55}, "exceeds the pitch"),
        ({"pitch_um": -1}, "pitch must be a positive"),
        ({"polygon": np.zeros((2, 2))}, "polygon must be"),
        ({"mask": np.ones(10, bool)}, "2-D boolean"),
    ],
)
def test_bad_grid_arguments(kwargs, message):
    with pytest.raises(SectionError, match=message):
        spot_grid((H, W), MPP, **kwargs)


def test_spot_larger_than_slide():
    with pytest.raises(SectionError, match="does not fit"):
        spot_grid((3, 3), MPP)
