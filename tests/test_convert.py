"""``hifusion convert``: any slide to a tiled pyramidal OME-TIFF, in bounded memory."""

from __future__ import annotations

import itertools
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_slide import _extra_mb, smooth_image, uniform_png

from hifusion_model.cli import main
from hifusion_model.data.convert import convert_to_ome_tiff
from hifusion_model.data.png_rows import PngRows, png_chunk
from hifusion_model.data.slide import Slide, to_rgb8
from hifusion_model.data.slide_plain import decode_plain
from hifusion_model.errors import Cancelled, SlideError


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


def filtered_png(path, width, height, depth, colour, channels, seed=0):
    """Random bytes behind every PNG row filter (0-4) at random, split over two IDAT chunks."""

    rng = np.random.default_rng(seed)
    row_bytes = (width * channels * depth + 7) // 8
    data = zlib.compress(b"".join(
        bytes([rng.integers(0, 5)]) + rng.integers(0, 256, row_bytes, dtype=np.uint8).tobytes()
        for _ in range(height)))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", data[:40]) + png_chunk(b"IDAT", data[40:])
                     + png_chunk(b"IEND", b""))
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
    monkeypatch.setattr(PngRows, "STEP_BYTES", 100)  # several small steps inside each band
    for path in _pillow_pngs(tmp_path):
        expected = to_rgb8(decode_plain(path))
        rows = PngRows(path)
        assert rows.streamable and rows.shape[:2] == expected.shape[:2]
        edges = [0, 1, 8, 30, 31, expected.shape[0]]
        got = np.concatenate([to_rgb8(rows[a:b]) for a, b in itertools.pairwise(edges)])
        rows.close()
        np.testing.assert_array_equal(got, expected, err_msg=path.name)
    with pytest.raises(ValueError, match="in order"):
        PngRows(tmp_path / "RGB.png")[5:9]


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
