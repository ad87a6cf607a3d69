"""Pictures that lie or are too big: what an attacker's browser could send as camera frames
(shared by tests/test_sources.py and tests/test_call.py)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims w x h: nothing but the header lies."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims w x h, over one compressed row of zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * w + 1))) + chunk(b"IEND", b"")


def strip_jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def hostile_pictures() -> list[bytes]:
    """The three of the security report: a 65500² header, a 65000×1 strip, a 12000² PNG."""
    return [jpeg_claiming(65500, 65500), strip_jpeg(65000, 1), png_claiming(12000, 12000)]
