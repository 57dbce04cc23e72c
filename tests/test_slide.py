"""Slides: lazy pyramids, µm/px from files, region reads, conversion to OME-TIFF."""

from __future__ import annotations

import itertools
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

from hifusion_model.cli import main
from hifusion_model.data.slide import Slide, TileCache, convert_to_ome_tiff
from hifusion_model.errors import Cancelled, SlideError

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


# -- memory bombs and big plain images (issue 24) ---------------------------------------------
def uniform_png(path, width, height, rows_present=None, value=235):
    """A one-colour RGB PNG compressed row by row; ``rows_present=k`` stores only k rows' data.

    With ``rows_present=1``, a 40,000 × 40,000 px PNG takes a few hundred bytes: a header that
    claims 4.8 GB of pixels, the classic decompression bomb.
    """
    from hifusion_model.data.slide import _png_chunk

    z = zlib.compressobj(9)
    row = b"\0" + bytes([value]) * (3 * width)
    data = b"".join(z.compress(row) for _ in range(height if rows_present is None else rows_present))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header))
        f.write(_png_chunk(b"IDAT", data + z.flush()) + _png_chunk(b"IEND", b""))
    return path


def filtered_png(path, width, height, depth, colour, channels, seed=0):
    """Random bytes behind every PNG row filter (0-4) at random, split over two IDAT chunks."""
    from hifusion_model.data.slide import _png_chunk

    rng = np.random.default_rng(seed)
    row_bytes = (width * channels * depth + 7) // 8
    data = zlib.compress(b"".join(
        bytes([rng.integers(0, 5)]) + rng.integers(0, 256, row_bytes, dtype=np.uint8).tobytes()
        for _ in range(height)))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", data[:40]) + _png_chunk(b"IDAT", data[40:])
                     + _png_chunk(b"IEND", b""))
    return path


def _pillow_pngs(folder):
    img = np.random.default_rng(1).integers(0, 256, (50, 37, 4), dtype=np.uint8)
    for mode, pixels in (("RGB", img[..., :3]), ("RGBA", img), ("L", img[..., 0]),
                         ("LA", img[..., :2])):
        Image.fromarray(pixels, mode).save(folder / f"{mode}.png")
    palette = Image.fromarray(img[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE,
                                                    colors=16)
    palette.save(folder / "P.png")
    palette.save(folder / "P-alpha.png", transparency=bytes(range(0, 160, 10)))
    palette.save(folder / "P-4bit.png", bits=4)
    Image.fromarray(img[..., 0] > 128).save(folder / "1bit.png")
    Image.fromarray(img[..., 0].astype(np.uint16) * 257 + 3).save(folder / "grey16.png")
    kinds = [(8, 2, 3), (8, 6, 4), (8, 0, 1), (8, 4, 2), (16, 0, 1), (16, 4, 2), (1, 0, 1),
             (2, 0, 1), (4, 0, 1)]
    for depth, colour, channels in kinds:
        filtered_png(folder / f"raw-{depth}-{colour}.png", 41, 33, depth, colour, channels)
    return sorted(folder.iterdir())


def test_png_rows_decode_band_by_band_as_pillow_does(tmp_path, monkeypatch):
    from hifusion_model.data.slide import PngRows, _decode_plain, _to_rgb8

    monkeypatch.setattr(PngRows, "STEP_BYTES", 100)  # several small steps inside each band
    for path in _pillow_pngs(tmp_path):
        expected = _to_rgb8(_decode_plain(path))
        rows = PngRows(path)
        assert rows.streamable and rows.shape[:2] == expected.shape[:2]
        edges = [0, 1, 8, 30, 31, expected.shape[0]]
        got = np.concatenate([_to_rgb8(rows[a:b]) for a, b in itertools.pairwise(edges)])
        rows.close()
        np.testing.assert_array_equal(got, expected, err_msg=path.name)
    with pytest.raises(ValueError, match="in order"):
        PngRows(tmp_path / "RGB.png")[5:9]


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
    monkeypatch.setattr("hifusion_model.data.slide._check_open_size", lambda *a: None)
    with pytest.raises(SlideError, match="too large to decode whole"):  # Pillow's own guard
        Slide.open(tmp_path / "s.png", mpp=1)
    monkeypatch.undo()
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "70000")
    with Slide.open(tmp_path / "s.png", mpp=1) as slide:
        np.testing.assert_array_equal(slide.levels[0], image)
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SlideError, match="HIFUSION_MAX_IMAGE_PIXELS"):
        Slide.open(tmp_path / "s.png", mpp=1)


@pytest.mark.parametrize("name", ["s.png", "s.jpg", "s.tif"])
def test_convert_streams_images_above_the_limit(tmp_path, monkeypatch, name):
    image = smooth_image(210, 300)
    if name.endswith(".tif"):
        tifffile.imwrite(tmp_path / name, image, photometric="rgb", rowsperstrip=16)
    else:
        Image.fromarray(image).save(tmp_path / name, quality=95)
    expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))
    monkeypatch.setenv("HIFUSION_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(SlideError, match="hifusion convert"):
        Slide.open(tmp_path / name, mpp=0.5)
    out = convert_to_ome_tiff(tmp_path / name, tmp_path / "o.ome.tif", mpp=0.5, tile=32,
                              compression="zlib")
    with Slide.open(out) as slide:
        np.testing.assert_array_equal(np.asarray(slide.levels[0][:, :]), expected)
        assert len(slide.levels) == 5


def test_convert_of_a_truncated_bomb_fails_fast_naming_the_row(tmp_path):
    bomb = uniform_png(tmp_path / "bomb.png", 40_000, 40_000, rows_present=3)
    with pytest.raises(SlideError, match=r"bomb.png is truncated or corrupt: its image data ends "
                                         r"at row 3 of 40000$"):
        convert_to_ome_tiff(bomb, tmp_path / "b.ome.tif", mpp=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]


def test_absurd_regions_and_big_thumbnails_are_bounded(tmp_path, pyramid, rgb, monkeypatch):
    import hifusion_model.data.slide as slide_module

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
    np.testing.assert_array_equal(banded, slide_module._half(slide_module._half(rgb)))


# The peak RSS of this process alone: VmHWM starts afresh at exec, while getrusage's ru_maxrss
# carries the high-water mark of the forking parent (pytest: gigabytes) across it.
PEAK_MB = ("def peak_mb():\n"
           "    for line in open('/proc/self/status'):\n"
           "        if line.startswith('VmHWM:'):\n"
           "            return int(line.split()[1]) / 1024\n")
MEASURE = PEAK_MB + """
from hifusion_model.errors import SlideError
from hifusion_model.data.slide import Slide, convert_to_ome_tiff
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


def test_convert_holds_a_big_png_a_band_at_a_time(tmp_path):
    """A 7,000 × 7,000 px PNG is 147 MB as RGB; decoded whole (Pillow's 4 bytes a pixel, the
    copy to numpy, the in-memory pyramid) it took ~400 MB. Streamed: a band, level 1 (37 MB)."""
    png = uniform_png(tmp_path / "big.png", 7_000, 7_000)
    out = tmp_path / "big.ome.tif"
    extra, _ = _extra_mb(f"convert_to_ome_tiff({str(png)!r}, {str(out)!r}, mpp=0.5)")
    assert extra < 100, f"{extra:.0f} MB"
    with Slide.open(out) as slide:
        assert slide.shape == (7000, 7000) and (slide.read_region_px((3500, 3500), 64, 64) > 225
                                                ).all()


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
