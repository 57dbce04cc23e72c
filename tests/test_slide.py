"""Slides: lazy pyramids, µm/px from files, region reads, memory bounds."""

from __future__ import annotations

import math
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from hifusion_model.data.slide import Slide, TileCache
from hifusion_model.errors import SlideError

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


def write_aperio(path, levels, mpp=0.5, tile=64):
    """A tiled pyramidal TIFF as Aperio writes an SVS: one IFD a level, each described."""
    h, w = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(levels):
            size = f"{w}x{h} ({tile}x{tile}) RAW|AppMag = 20|MPP = {mpp}" if k == 0 else \
                f"{w}x{h} -> {level.shape[1]}x{level.shape[0]}"
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     description=f"Aperio Image Library v12.0.5\n{size}", metadata=None)
    return path


def test_an_svs_opens_through_openslide(tmp_path, rgb):
    pytest.importorskip("openslide")
    from hifusion_model.data.slide_openslide import OpenSlideLevel

    levels = [rgb, np.full((160, 200, 3), 3, np.uint8), np.full((80, 100, 3), 7, np.uint8)]
    path = write_aperio(tmp_path / "s.svs", levels, mpp=0.25)
    with Slide.open(path) as slide:
        assert all(isinstance(lv, OpenSlideLevel) for lv in slide.levels)
        assert slide.mpp == pytest.approx(0.25) and slide.downsamples == [1.0, 2.0, 4.0]
        assert [lv.shape for lv in slide.levels] == [(320, 400, 4), (160, 200, 4), (80, 100, 4)]
        center = (150.3, 120.7)
        np.testing.assert_array_equal(slide.read_region_px(center, 64, 64), crop(rgb, center, 64))
        assert (slide.read_region_px((200, 160), 256, 64) == 7).all()  # level 2
        assert (slide.read_region_px((0, 0), 64, 64)[:32] == 255).all()  # white beyond the edge
        np.testing.assert_array_equal(slide.thumbnail(max_px=400)[0], rgb)
        clone = pickle.loads(pickle.dumps(slide))
        np.testing.assert_array_equal(clone.read_region_px(center, 32, 32), crop(rgb, center, 32))
        clone.close()


def test_without_openslide_an_svs_is_a_tiff_and_mirax_names_the_extra(tmp_path, rgb, monkeypatch):
    monkeypatch.setattr("hifusion_model.data.slide_openslide._openslide", lambda: None)
    path = write_aperio(tmp_path / "s.svs", [rgb, rgb[::2, ::2]], mpp=0.25)
    with Slide.open(path) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.levels[0].shape == (320, 400, 3)
        np.testing.assert_array_equal(slide.read_region_px((50, 60), 32, 32),
                                      crop(rgb, (50, 60), 32))
    (tmp_path / "s.mrxs").write_bytes(b"0")
    with pytest.raises(SlideError, match=r"s\.mrxs: .*needs OpenSlide.*"
                                         r"pip install napari-hifusion\[openslide\]"):
        Slide.open(tmp_path / "s.mrxs")


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


# -- memory bombs and big plain images (issue 24) ---------------------------------------------
def uniform_png(path, width, height, rows_present=None, value=235):
    """A one-colour RGB PNG compressed row by row; ``rows_present=k`` stores only k rows' data.

    With ``rows_present=1``, a 40,000 × 40,000 px PNG takes a few hundred bytes: a header that
    claims 4.8 GB of pixels, the classic decompression bomb.
    """
    from hifusion_model.data.png_rows import png_chunk

    z = zlib.compressobj(9)
    row = b"\0" + bytes([value]) * (3 * width)
    data = b"".join(z.compress(row) for _ in range(height if rows_present is None else rows_present))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header))
        f.write(png_chunk(b"IDAT", data + z.flush()) + png_chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = uniform_png(tmp_path / "bomb.png", 40_000, 40_000, rows_present=1)
    assert bomb.stat().st_size < 1000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded the bomb"))
    with pytest.raises(SlideError) as caught:
        Slide.open(bomb, mpp=0.5)
    message = str(caught.value)
    assert "40000 × 40000 px" in message and "1600 Mpx" in message
    assert "hifusion convert" in message and "OME-TIFF" in message and "\n" not in message
    assert "4.8 GB" in message


def test_the_pixel_limit_keeps_pillows_guard_and_can_be_moved(tmp_path, monkeypatch):
    image = smooth_image()  # 60,000 px
    Image.fromarray(image).save(tmp_path / "s.jpg")
    Image.fromarray(image).save(tmp_path / "s.png")
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "50000")
    for name in ("s.jpg", "s.png"):
        with pytest.raises(SlideError, match=r"more than the 0 Mpx .*hifusion convert"):
            Slide.open(tmp_path / name, mpp=1)
    tifffile.imwrite(tmp_path / "s.tif", image, photometric="rgb")  # untiled: decoded whole
    with pytest.raises(SlideError, match="untiled TIFF"):
        Slide.open(tmp_path / "s.tif", mpp=1)
    monkeypatch.setattr("hifusion_model.data.slide_plain.check_open_size", lambda *a: None)
    with pytest.raises(SlideError, match="too large to decode whole"):  # Pillow's own guard
        Slide.open(tmp_path / "s.png", mpp=1)
    monkeypatch.undo()
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "70000")
    with Slide.open(tmp_path / "s.png", mpp=1) as slide:
        np.testing.assert_array_equal(slide.levels[0], image)
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SlideError, match="HIFUSION_MAX_IMAGE_PIXELS"):
        Slide.open(tmp_path / "s.png", mpp=1)


def test_absurd_regions_and_big_thumbnails_are_bounded(tmp_path, pyramid, rgb, monkeypatch):
    import hifusion_model.data.slide as slide_module
    from hifusion_model.data.slide_plain import halve

    with Slide.open(pyramid, mpp=0.0001) as slide:  # a 55 µm spot: 550,000 px, 137,500 at 4×
        with pytest.raises(SlideError, match=r"a region of 137500 × 137500 px \(level 2\) would take .* GB "
                                             r"of memory; the µm per pixel \(--mpp\)"):
            slide.read_region((20, 15), 55, 224)
    single = write_ome(tmp_path / "one.ome.tif", [rgb], tile=32)  # tiled, no pyramid
    with Slide.open(single) as slide:
        direct, d1 = slide.thumbnail(max_px=100)
        monkeypatch.setattr(slide_module, "THUMBNAIL_BYTES", 40_000)  # ~33 rows a band
        fetched = []
        fetch = slide._fetch
        monkeypatch.setattr(slide, "_fetch", lambda *a: fetched.append(a[2] - a[1]) or fetch(*a))
        banded, d2 = slide.thumbnail(max_px=100)
    assert banded.shape == direct.shape == (80, 100, 3) and d1 == d2 == 4.0
    assert max(fetched) * 400 * 3 <= 40_000 and len(fetched) > 5
    np.testing.assert_array_equal(banded, halve(halve(rgb)))


# The peak RSS of this process alone: VmHWM starts afresh at exec, while getrusage's ru_maxrss
# carries the high-water mark of the forking parent (pytest: gigabytes) across it.
PEAK_MB = ("def peak_mb():\n"
           "    for line in open('/proc/self/status'):\n"
           "        if line.startswith('VmHWM:'):\n"
           "            return int(line.split()[1]) / 1024\n")
MEASURE = PEAK_MB + """
from hifusion_model.errors import SlideError
from hifusion_model.data.convert import convert_to_ome_tiff
from hifusion_model.data.slide import Slide
base = peak_mb()
try:
    {call}
except SlideError as e:
    print("error:", e)
print("extra MB", peak_mb() - base)
"""


def _extra_mb(call: str) -> tuple[float, str]:
    """Peak memory a slide call adds in a fresh interpreter, over its imports; and its output."""
    done = subprocess.run([sys.executable, "-c", MEASURE.format(call=call)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split("extra MB")[1]), done.stdout


def test_opening_or_converting_a_bomb_costs_no_memory(tmp_path):
    bomb = uniform_png(tmp_path / "bomb.png", 40_000, 40_000, rows_present=1)
    extra, out = _extra_mb(f"Slide.open({str(bomb)!r}, mpp=0.5)")
    assert extra < 20 and "40000 × 40000 px" in out
    extra, out = _extra_mb(f"convert_to_ome_tiff({str(bomb)!r}, {str(tmp_path / 'b.tif')!r}, "
                           "mpp=0.5)")
    assert extra < 60 and "ends at row 1 of 40000" in out


def test_the_cli_refuses_a_bomb_within_500_mb(tmp_path):
    """The target of issue 24: hifusion predict on the 40k × 40k PNG, peak RSS and message."""
    from synthetic import tiny_checkpoint

    bomb = uniform_png(tmp_path / "bomb.png", 40_000, 40_000, rows_present=1)
    model = tiny_checkpoint(tmp_path / "m.pt", ["A", "B"])
    script = PEAK_MB + ("import sys\nfrom hifusion_model.cli import main\ncode = main(sys.argv[1:])\n"
                        "print('peak MB', peak_mb(), file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "predict", str(bomb), "--grid", "hex:100",
                           "--mpp", "0.5", "--model", str(model), "--out", str(tmp_path / "p.h5ad")],
                          capture_output=True, text=True, timeout=120, check=False)
    error, peak = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "40000 × 40000 px" in error and "hifusion convert" in error
    assert float(peak.split()[-1]) < 500
    assert not (tmp_path / "p.h5ad").exists()


def test_a_truncated_pyramid_is_refused_on_open(tmp_path, rgb):
    """Its smallest level is decoded at once, as napari will for its contrast limits."""
    path = write_ome(tmp_path / "p.ome.tif", [rgb, rgb[::2, ::2], rgb[::4, ::4]], tile=32)
    data = path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match=r"cut.ome.tif.*truncated or corrupt"):
        Slide.open(cut)
