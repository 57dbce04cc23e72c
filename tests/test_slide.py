"""Slides: lazy pyramids, µm/px from files, region reads, conversion to OME-TIFF."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import tifffile
from PIL import Image

from hifusion_model.cli import main
from hifusion_model.errors import Cancelled, SlideError
from hifusion_model.slide import Slide, TileCache, convert_to_ome_tiff

OME_UM = {"PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}


def write_ome(path, levels, mpp=0.5, tile=64):
    """A tiled OME-TIFF with the given levels as SubIFDs."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, **OME_UM}
        tw.write(levels[0], subifds=len(levels) - 1, tile=(tile, tile), photometric="rgb",
                 compression="zlib", metadata=meta)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(tile, tile), photometric="rgb", compression="zlib")
    return path


def crop(image, center, n):
    x0, y0 = (math.floor(c - n / 2 + 0.5) for c in center)
    return image[y0:y0 + n, x0:x0 + n]


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 200, (320, 400, 3), dtype=np.uint8)


@pytest.fixture
def pyramid(tmp_path, rgb):
    """Level 1 is all 3s and level 2 all 7s, so a read shows which level it came from."""
    l1 = np.full((160, 200, 3), 3, np.uint8)
    l2 = np.full((80, 100, 3), 7, np.uint8)
    return write_ome(tmp_path / "p.ome.tif", [rgb, l1, l2])


def test_ome_pyramid_opens_lazily_with_its_mpp(pyramid):
    with Slide.open(pyramid) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.shape == (320, 400)
        assert slide.downsamples == [1.0, 2.0, 4.0]
        assert [lv.shape for lv in slide.levels] == [(320, 400, 3), (160, 200, 3), (80, 100, 3)]
        assert not any(isinstance(lv, np.ndarray) for lv in slide.levels)


def test_native_read_equals_the_raw_crop(pyramid, rgb):
    with Slide.open(pyramid) as slide:
        center = (150.3, 120.7)
        np.testing.assert_array_equal(slide.read_region_px(center, 64, 64), crop(rgb, center, 64))
        um = slide.read_region((150.3 * 0.5, 120.7 * 0.5), 32.0, 64)
        np.testing.assert_array_equal(um, crop(rgb, center, 64))


def test_overlapping_reads_decode_each_tile_once(pyramid, rgb, monkeypatch):
    slide = Slide.open(pyramid)
    decoded = []
    get = TileCache.get
    monkeypatch.setattr(TileCache, "get", lambda self, key, load: get(
        self, key, lambda: decoded.append(key) or load()))
    first = slide.read_region_px((130.0, 100.0), 100, 100)  # rows 50:150, columns 80:180
    np.testing.assert_array_equal(first, crop(rgb, (130.0, 100.0), 100))
    assert sorted(decoded) == [(0, ty, tx) for ty in range(3) for tx in range(1, 3)]
    np.testing.assert_array_equal(slide.read_region_px((140.0, 90.0), 64, 64),
                                  crop(rgb, (140.0, 90.0), 64))
    assert len(decoded) == 6  # inside the first read's tiles: nothing decoded again
    np.testing.assert_array_equal(slide.read_region_px((370.0, 290.0), 60, 60),
                                  crop(rgb, (370.0, 290.0), 60))  # partial tiles at the edge


def test_tile_cache_drops_the_least_recently_used():
    cache = TileCache(max_bytes=250)
    for key in "abc":
        cache.get(key, lambda: np.zeros(100, np.uint8))
    assert len(cache) == 2
    hits = []
    cache.get("a", lambda: hits.append("a") or np.zeros(100, np.uint8))  # dropped: loaded again
    cache.get("c", lambda: hits.append("c") or np.zeros(100, np.uint8))  # kept
    assert hits == ["a"]


def test_level_choice_follows_the_output_pixel_size(pyramid):
    with Slide.open(pyramid) as slide:
        assert (slide.read_region_px((200, 160), 256, 64) == 7).all()  # 4× coarser: level 2
        assert (slide.read_region_px((200, 160), 256, 128) == 3).all()  # 2× coarser: level 1
        assert (slide.read_region_px((200, 160), 200, 64) == 3).all()  # 3.1×: level 1 resized
        assert slide.read_region_px((200, 160), 32, 64).shape == (64, 64, 3)  # upsampled level 0


def test_regions_beyond_the_edge_are_white(pyramid, rgb):
    with Slide.open(pyramid) as slide:
        patch = slide.read_region_px((0, 0), 64, 64)
        assert (patch[:32] == 255).all() and (patch[:, :32] == 255).all()
        np.testing.assert_array_equal(patch[32:, 32:], rgb[:32, :32])
        assert (slide.read_region_px((5000, 5000), 64, 32) == 255).all()


@pytest.mark.parametrize("tiled", [True, False], ids=["lazy", "in-memory"])
def test_rgba_grey_and_16bit_become_rgb8(tmp_path, tiled):
    tile = {"tile": (16, 16)} if tiled else {}
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[:, 16:, 3] = 255  # right half opaque, left half transparent
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=[2], **tile)
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    tifffile.imwrite(tmp_path / "g.tif", grey, **tile)
    deep = np.full((32, 32, 3), 257 * 40, np.uint16)
    tifffile.imwrite(tmp_path / "d.tif", deep, photometric="rgb", **tile)

    a = Slide.open(tmp_path / "a.tif", mpp=1).read_region_px((16, 16), 32, 32)
    assert (a[:, :16] == 255).all() and (a[:, 16:] == 10).all()
    g = Slide.open(tmp_path / "g.tif", mpp=1).read_region_px((16, 16), 32, 32)
    np.testing.assert_array_equal(g, np.repeat(grey[..., None], 3, axis=2))
    d = Slide.open(tmp_path / "d.tif", mpp=1).read_region_px((16, 16), 32, 32)
    assert d.dtype == np.uint8 and (d == 40).all()


def test_planar_rgb_is_read_as_interleaved(tmp_path, rgb):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate",
                     tile=(64, 64))
    with Slide.open(path, mpp=0.5) as slide:
        assert slide.levels[0].shape == (320, 400, 3)
        patch = slide.read_region_px((100, 90), 48, 48)
        np.testing.assert_array_equal(patch, crop(rgb, (100, 90), 48))


def test_mpp_from_resolution_tags_svs_and_caller(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "cm.tif", rgb, resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    assert Slide.open(tmp_path / "cm.tif").mpp == pytest.approx(0.25)
    tifffile.imwrite(tmp_path / "dpi.tif", rgb, resolution=(72, 72), resolutionunit="INCH")
    assert Slide.open(tmp_path / "dpi.tif").mpp is None  # 72 dpi is a placeholder, not a scan
    assert Slide.open(tmp_path / "dpi.tif", mpp=0.3).mpp == 0.3
    tifffile.imwrite(tmp_path / "s.svs", rgb, tile=(64, 64), photometric="rgb",
                     description="Aperio Image Library v12.0.5\n400x320 (64x64) RAW|AppMag = 40|"
                                 "MPP = 0.2525")
    assert Slide.open(tmp_path / "s.svs").mpp == pytest.approx(0.2525)


def test_missing_mpp_is_an_error_never_a_default(tmp_path, rgb):
    path = tmp_path / "plain.png"
    Image.fromarray(rgb).save(path)
    slide = Slide.open(path)
    assert slide.mpp is None
    with pytest.raises(SlideError, match=r"plain\.png.*--mpp"):
        slide.require_mpp()
    with pytest.raises(SlideError, match="plain.png"):
        slide.read_region((10, 10), 20, 16)
    with pytest.raises(SlideError, match="positive"):
        Slide.open(path, mpp=-1)


def test_bad_files_raise_slide_errors_naming_them(tmp_path, pyramid):
    with pytest.raises(SlideError, match="nope.tif.*does not exist"):
        Slide.open(tmp_path / "nope.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="junk.tif"):
        Slide.open(tmp_path / "junk.tif")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with pytest.raises(SlideError, match="cut.jpg"):
        Slide.open(tmp_path / "cut.jpg")
    (tmp_path / "x.czi").write_bytes(b"0")
    with pytest.raises(SlideError, match=r"x\.czi.*\.svs"):
        Slide.open(tmp_path / "x.czi")
    with Slide.open(pyramid) as slide, pytest.raises(SlideError, match="positive"):
        slide.read_region_px((10, 10), 0, 16)


def test_thumbnail_and_pickling(pyramid, rgb):
    slide = Slide.open(pyramid)
    thumb, downsample = slide.thumbnail(max_px=100)
    assert thumb.shape == (80, 100, 3) and downsample == pytest.approx(4.0)
    full, one = slide.thumbnail(max_px=1000)
    assert one == 1.0
    np.testing.assert_array_equal(full, rgb)
    clone = pickle.loads(pickle.dumps(slide))  # what a spawned DataLoader worker receives
    np.testing.assert_array_equal(clone.read_region_px((50, 50), 32, 32), crop(rgb, (50, 50), 32))
    slide.close()
    with pytest.raises(SlideError, match="closed"):
        slide.read_region_px((50, 50), 32, 32)


def smooth_image(h=200, w=300):
    y, x = np.mgrid[:h, :w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 60], axis=2)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_convert_round_trips_pixels_and_mpp(tmp_path, compression):
    image = smooth_image()
    Image.fromarray(image).save(tmp_path / "src.png")
    calls = []
    out = convert_to_ome_tiff(tmp_path / "src.png", tmp_path / "out.ome.tif", mpp=0.69, tile=32,
                              compression=compression, progress=lambda *a: calls.append(a))
    with Slide.open(out) as slide:
        assert slide.mpp == pytest.approx(0.69)
        assert len(slide.levels) >= 3 and slide.downsamples[2] == pytest.approx(4, rel=0.02)
        level0 = np.asarray(slide.levels[0][:, :])
        level1 = np.asarray(slide.levels[1][:, :])
    mean2 = image.reshape(100, 2, 150, 2, 3).mean(axis=(1, 3))
    if compression == "zlib":
        np.testing.assert_array_equal(level0, image)
        assert np.abs(level1 - mean2).max() <= 0.5
    else:
        assert np.abs(level0.astype(int) - image).mean() < 2
    assert calls[-1][0] == calls[-1][1] and len(calls) == calls[-1][1]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("src.png", "out.ome.tif")]


def test_convert_needs_an_mpp_and_sane_options(tmp_path):
    Image.fromarray(smooth_image()).save(tmp_path / "src.png")
    with pytest.raises(SlideError, match="--mpp"):
        convert_to_ome_tiff(tmp_path / "src.png", tmp_path / "o.ome.tif")
    with pytest.raises(SlideError, match="multiple of 16"):
        convert_to_ome_tiff(tmp_path / "src.png", tmp_path / "o.ome.tif", mpp=1, tile=100)
    with pytest.raises(Cancelled):
        convert_to_ome_tiff(tmp_path / "src.png", tmp_path / "o.ome.tif", mpp=1, tile=32,
                            should_stop=lambda: True)
    assert [p.name for p in tmp_path.iterdir()] == ["src.png"]  # no output, no temporary files


def test_convert_command(tmp_path, capsys):
    Image.fromarray(smooth_image()).save(tmp_path / "src.png")
    out = tmp_path / "out.ome.tif"
    assert main(["convert", str(tmp_path / "src.png"), str(out), "--mpp", "0.5", "--tile", "64",
                 "--compression", "zlib"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "4 levels" in printed and "0.5 µm/px" in printed
    assert main(["convert", str(tmp_path / "missing.jpg"), str(tmp_path / "new.ome.tif")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jpg" in err and len(err.splitlines()) == 1


@pytest.mark.her2st
def test_her2st_jpeg_patch_equals_pil_crop(her2st_dir, monkeypatch):
    path = her2st_dir / "images" / "B4.jpg"
    spots = np.loadtxt(her2st_dir / "spots" / "B4_selection.tsv", skiprows=1, usecols=(4, 5))
    center = tuple(spots[len(spots) // 2])
    with Slide.open(path, mpp=0.69) as slide:
        patch = slide.read_region_px(center, 224, 224)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the slide is ~92 MP
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(patch, crop(expected, center, 224))


def test_shrinking_is_anti_aliased(tmp_path):
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checkerboard).save(tmp_path / "fine.png")
    patch = Slide.open(tmp_path / "fine.png", mpp=1).read_region_px((32, 32), 64, 16)
    assert np.abs(patch.astype(int) - 127.5).max() <= 8  # grey, not a moiré of black and white
