"""PNG rows decoded a band at a time, so that ``hifusion convert`` streams a PNG of any size."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import SlideError


class PngRows:
    """Rows of a PNG decoded in order, a band at a time: bounded memory for any size.

    Pillow decodes a PNG only whole. Here the zlib stream is inflated just far enough for the
    rows asked for, and Pillow's C code undoes the row filters: each band is handed to it as a
    small PNG of its own (stored, not recompressed), led by the last row of the band before,
    which the filters of the first row refer to. The band PNG pretends to be 8-bit grey, grey +
    alpha, RGB or RGBA with the real file's bytes per pixel, so the filter arithmetic is the
    same and the bytes come back exactly as stored; they are then read in the real format
    (palette, 1-16 bits). Interlaced and 16-bit colour PNGs cannot be read this way
    (:attr:`streamable` is False).
    """

    _FAKE: ClassVar[dict[int, int]] = {1: 0, 2: 4, 3: 2, 4: 6}  # bytes/px → 8-bit colour type
    _CHANNELS: ClassVar[dict[int, int]] = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
    SIGNATURE = b"\x89PNG\r\n\x1a\n"
    STEP_BYTES = 4 * 2**20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._next_row = 0
        self._previous: bytes | None = None
        self._inflate = zlib.decompressobj()
        self._pending = b""
        self._chunk_left = self._first_idat_length

    def _read_header(self) -> None:
        f = self._file
        if f.read(8) != self.SIGNATURE:
            raise SlideError(f"{self.path} is not a PNG file")
        self.palette: bytes | None = None
        self.transparency: bytes | None = None
        header = None
        while True:
            length, kind = self._chunk_head()
            if kind == b"IDAT":
                self._first_idat_length = length
                break
            if length > 2**26:
                raise SlideError(f"{self.path}: a {kind!r} chunk of {length} bytes; the file is "
                                 "corrupt")
            data = f.read(length)
            f.read(4)  # CRC
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", data[:13])
            elif kind == b"PLTE":
                self.palette = data
            elif kind == b"tRNS":
                self.transparency = data
            elif kind == b"IEND":
                raise SlideError(f"{self.path} holds no image data (no IDAT chunk)")
        if header is None:
            raise SlideError(f"{self.path} has no PNG header (IHDR)")
        width, height, self.depth, self.colour, _, _, interlace = header
        if self.colour not in self._CHANNELS or width < 1 or height < 1:
            raise SlideError(f"{self.path}: unsupported PNG header {header}")
        self.shape_hw = (height, width)
        channels = self._CHANNELS[self.colour]
        self.bpp = max(1, channels * self.depth // 8)
        self.row_bytes = (width * channels * self.depth + 7) // 8
        self.streamable = interlace == 0 and self.bpp in self._FAKE
        if self.colour == 3:
            self.channels = 4 if self.transparency else 3
        else:
            self.channels = channels
        self.dtype = np.dtype(np.uint16 if self.depth == 16 and channels == 1 else np.uint8)
        self.shape = (height, width) if self.channels == 1 else (height, width, self.channels)
        self.ndim = len(self.shape)

    def _chunk_head(self) -> tuple[int, bytes]:
        head = self._file.read(8)
        if len(head) < 8:
            raise SlideError(f"{self.path} ends before its image data; the file is truncated")
        return struct.unpack(">I", head[:4])[0], head[4:]

    def _compressed(self) -> bytes:
        """The next piece of the zlib stream (IDAT chunks joined), b"" at its end."""
        while self._chunk_left == 0:
            self._file.read(4)  # CRC of the chunk before
            length, kind = self._chunk_head()
            if kind != b"IDAT":
                return b""
            self._chunk_left = length
        piece = self._file.read(min(self._chunk_left, 2**20))
        if not piece:
            return b""
        self._chunk_left -= len(piece)
        return piece

    def _filtered(self, n: int) -> bytes:
        """The next ``n`` rows as stored: a filter byte and ``row_bytes`` bytes each."""
        need = n * (self.row_bytes + 1)
        out = bytearray()
        while len(out) < need:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self._compressed()
                if not data:
                    got = self._next_row + len(out) // (self.row_bytes + 1)
                    raise SlideError(f"{self.path} is truncated or corrupt: its image data ends "
                                     f"at row {got} of {self.shape_hw[0]}")
            try:
                out += self._inflate.decompress(data, need - len(out))
            except zlib.error as e:
                raise SlideError(f"cannot decode {self.path} ({e}); the file is corrupt") from e
            self._pending = self._inflate.unconsumed_tail
        return out

    def _unfilter(self, filtered: bytearray, n: int) -> bytes:
        """Raw row bytes of ``n`` filtered rows, through Pillow (see the class docstring)."""
        lead = b"" if self._previous is None else b"\0" + self._previous
        rows = n + (self._previous is not None)
        header = struct.pack(">IIBBBBB", self.row_bytes // self.bpp, rows, 8,
                             self._FAKE[self.bpp], 0, 0, 0)
        store = zlib.compressobj(0)
        data = store.compress(lead) + store.compress(filtered) + store.flush()
        del filtered
        png = b"".join((self.SIGNATURE, png_chunk(b"IHDR", header), png_chunk(b"IDAT", data),
                        png_chunk(b"IEND", b"")))
        del data
        try:
            with Image.open(io.BytesIO(png)) as im:
                raw = im.tobytes()
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"cannot decode {self.path} ({e}); the file is corrupt") from e
        raw = raw[self.row_bytes:] if lead else raw
        self._previous = raw[-self.row_bytes:]
        return raw

    def __getitem__(self, key: Any) -> np.ndarray:
        """``rows[r0:r1]`` or ``rows[r0:r1, c0:c1]``, rows following the ones read before."""
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = key[0], key[1] if len(key) > 1 else slice(None)
        r0, r1, _ = rows.indices(self.shape_hw[0])
        if not self.streamable:
            raise SlideError(f"{self.path} is an interlaced or 16-bit colour PNG, which cannot "
                             "be decoded a band at a time")
        if r0 != self._next_row:
            raise ValueError(f"rows must be read in order: {r0} asked, {self._next_row} next")
        out = np.empty((max(0, r1 - r0), *self.shape[1:]), self.dtype)
        step = max(1, self.STEP_BYTES // self.row_bytes)  # a few copies of this much at a time
        for a in range(r0, r1, step):
            n = min(step, r1 - a)
            out[a - r0:a - r0 + n] = self._pixels(self._unfilter(self._filtered(n), n), n)
            self._next_row = a + n
        return out[:, cols]

    def _pixels(self, raw: bytes, n: int) -> np.ndarray:
        """Raw row bytes in the real format as (n, W[, C]), the way Pillow + Slide show them."""
        width = self.shape_hw[1]
        flat = np.frombuffer(raw, np.uint8).reshape(n, self.row_bytes)
        if self.depth < 8:
            bits = np.unpackbits(flat, axis=1).reshape(n, -1, self.depth)
            weights = 1 << np.arange(self.depth - 1, -1, -1, dtype=np.uint8)
            values = (bits * weights).sum(axis=2, dtype=np.uint8)[:, :width]
            if self.colour == 0:  # Pillow scales grey to 0..255
                return values * np.uint8(255 // (2**self.depth - 1))
            flat = values
        if self.colour == 3:
            lut = np.zeros((256, 4), np.uint8)
            lut[:, 3] = 255
            colours = np.frombuffer(self.palette or b"", np.uint8)[: 256 * 3].reshape(-1, 3)
            lut[: len(colours), :3] = colours
            alpha = np.frombuffer(self.transparency or b"", np.uint8)[:256]
            lut[: len(alpha), 3] = alpha
            return lut[flat[:, :width], : self.channels]
        if self.depth == 16:
            pixels = flat.reshape(n, width, -1, 2)
            if self.colour == 0:
                return (pixels[..., 0, 0].astype(np.uint16) << 8) | pixels[..., 0, 1]
            return pixels[..., 0].copy()  # grey + alpha: Pillow keeps the high bytes
        return flat.reshape(n, width, self.channels) if self.channels > 1 else flat.copy()

    def close(self) -> None:
        self._file.close()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
