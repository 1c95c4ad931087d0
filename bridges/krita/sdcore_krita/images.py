"""PNG <-> Krita pixel bytes. Krita's RGBA/U8 pixel data is BGRA; selections are 1 byte per pixel.

Uses Qt's QImage when PyQt5 is there (inside Krita: fast), else a pure-Python codec (zlib + PNG filters), so
the logic also runs, and is tested, outside Krita."""

from __future__ import annotations

import struct
import zlib

try:
    from PyQt5.QtCore import QBuffer, QByteArray, QIODevice
    from PyQt5.QtGui import QImage
except ImportError:  # pragma: no cover - outside Krita
    QImage = None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, raw: bytes, channels: int) -> bytes:
    color = {1: 0, 3: 2, 4: 6}[channels]
    stride = width * channels
    rows = b"".join(b"\x00" + raw[y * stride:(y + 1) * stride] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 3)) + _chunk(b"IEND", b""))


def bgra_to_png(bgra: bytes, width: int, height: int) -> bytes:
    """Krita pixel data (BGRA) -> RGBA PNG bytes."""
    if QImage is not None:
        data = bytes(bgra)
        image = QImage(data, width, height, width * 4, QImage.Format_ARGB32).copy()  # own the pixels
        return _qimage_png(image)
    src = memoryview(bytes(bgra))
    rgba = bytearray(len(src))
    rgba[0::4], rgba[1::4], rgba[2::4], rgba[3::4] = src[2::4], src[1::4], src[0::4], src[3::4]
    return _png(width, height, bytes(rgba), 4)


def gray_to_png(gray: bytes, width: int, height: int) -> bytes:
    """A selection's bytes (255 = selected) -> grayscale PNG, white where the image is repainted."""
    return _png(width, height, bytes(gray), 1)


def _qimage_png(image: object) -> bytes:
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.WriteOnly)
    image.save(buffer, "PNG")  # type: ignore[attr-defined]
    return bytes(data)


def png_to_bgra(png: bytes) -> tuple[bytes, int, int]:
    """PNG bytes -> (BGRA bytes, width, height), for Node.setPixelData."""
    if QImage is not None:
        image = QImage.fromData(png, "PNG").convertToFormat(QImage.Format_ARGB32)
        width, height = image.width(), image.height()
        ptr = image.constBits()
        ptr.setsize(image.byteCount())
        data = bytes(ptr)
        stride = image.bytesPerLine()
        if stride != width * 4:
            data = b"".join(data[y * stride:y * stride + width * 4] for y in range(height))
        return data, width, height
    width, height, channels, raw = _decode(png)
    out = bytearray(width * height * 4)
    if channels == 4:
        out[0::4], out[1::4], out[2::4], out[3::4] = raw[2::4], raw[1::4], raw[0::4], raw[3::4]
    elif channels == 3:
        out[0::4], out[1::4], out[2::4] = raw[2::3], raw[1::3], raw[0::3]
        out[3::4] = b"\xff" * (width * height)
    else:
        out[0::4] = out[1::4] = out[2::4] = raw
        out[3::4] = b"\xff" * (width * height)
    return bytes(out), width, height


def _decode(png: bytes) -> tuple[int, int, int, bytes]:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or interlace or color not in (0, 2, 6):
        raise ValueError("only 8-bit, non-interlaced gray, RGB or RGBA PNGs are supported")
    channels = {0: 1, 2: 3, 6: 4}[color]
    stride = width * channels
    raw = zlib.decompress(b"".join(idat))
    out = bytearray(stride * height)
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)
