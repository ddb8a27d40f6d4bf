"""Decoding one image file into the channels-first float32 array the image-folder reader gives a model.

Every pixel becomes a value in [0, 1] at the precision the file holds: 8-bit samples are divided by 255,
16-bit samples by 65535 (never cut to 8 bits first). The channel layout is RGB (3 channels), or one
luma channel with ``grayscale`` (``0.299 R + 0.587 G + 0.114 B``, ITU-R 601-2, the weights Pillow uses,
computed in floating point). By mode:

- ``1``, ``L``, ``I;16`` (16-bit grayscale PNG), ``I`` (integers, which must lie in 0..65535: read as 16-bit):
  one gray channel, repeated three times for RGB;
- ``LA``: gray, the alpha channel is dropped; ``P`` and ``PA``: the palette's RGB colours (alpha dropped);
- ``RGB``, ``RGBA``, ``RGBX``: the colour channels (alpha dropped, not composited);
- ``CMYK``: ``R = (1 - C)(1 - K)`` and so on (the formula Pillow uses), in floating point;
- ``F`` (32-bit float TIFF): the values as stored; other modes (``YCbCr``, ``LAB``, ``HSV``): Pillow's
  conversion to RGB;
- 16-bit colour PNGs (RGB, RGBA, gray+alpha), which Pillow can only read as 8 bits, are decoded here
  (non-interlaced; an interlaced one is refused with the fix).

An image of more than :data:`MAX_IMAGE_PIXELS` pixels is refused before it is decoded (a decompression
bomb: a small file that decodes to gigabytes); so is a file that is not an image.
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from typing import Any

import numpy as np

from .errors import InputError
from .untrusted import shown

#: the most pixels (width x height) an image may have: Pillow's default limit, about 9459 x 9459
MAX_IMAGE_PIXELS = 89_478_485
#: ITU-R 601-2 luma weights (Pillow's ``convert("L")``)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG16_CHANNELS = {2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (RGB, gray+alpha, RGBA)


def load_image(path: str, *, grayscale: bool, size: tuple[int, int] | None) -> np.ndarray:
    """The image at ``path`` as float32 ``(channels, H, W)`` in [0, 1] (``size``: resized to ``(H, W)``,
    bilinear, in floating point); InputError naming the file for an unreadable file or a bomb."""
    from PIL import Image

    where = f"image {shown(path)}"
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and raises above twice it; the check below gives one message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img.size, where)
                png16 = _png16_color(path, img)
                channels = _decode_png16(path, where) if png16 else _channels(img, where)
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its limit, comes first
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise InputError(_too_many(where, int(found.group(1)) if found else None)) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:  # Pillow's errors for broken files
        raise InputError(f"cannot read {where}: {' '.join(str(exc).split())[:200]}") from None
    if grayscale and len(channels) == 3:
        red, green, blue = (c.astype(np.float64) for c in channels)
        channels = [(LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).astype(np.float32)]
    elif not grayscale and len(channels) == 1:
        channels = channels * 3
    if size is not None:
        channels = [_resize(c, size) for c in channels]
    return np.ascontiguousarray(np.stack(channels), dtype=np.float32)


def _check_pixels(wh: tuple[int, int], where: str) -> None:
    width, height = wh
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(_too_many(where, width * height))


def _too_many(where: str, pixels: int | None) -> str:
    count = f"{pixels} pixels" if pixels is not None else "too many pixels"
    return (
        f"{where} has {count}, more than the limit of {MAX_IMAGE_PIXELS} (a decompression bomb?); resize it "
        "before extraction"
    )


def _resize(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _channels(img: Any, where: str) -> list[np.ndarray]:
    """The image's channels (1 gray or 3 RGB) as float32 arrays in [0, 1], from its own mode."""
    mode = img.mode
    if mode.startswith("I;16"):
        return [np.asarray(img).astype(np.float32) / 65535.0]
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(
                f"{where} holds 32-bit integers outside 0..65535 ({arr.min()}..{arr.max()}); only 8- and 16-bit "
                "images are scaled to [0, 1]: convert it to a 16-bit PNG, or give the arrays as .npy inputs"
            )
        return [arr.astype(np.float32) / 65535.0]
    if mode == "F":
        return [np.asarray(img, dtype=np.float32)]
    if mode == "1":
        return [np.asarray(img, dtype=np.float32)]
    if mode == "L":
        return [np.asarray(img, dtype=np.float32) / 255.0]
    if mode in ("LA", "La"):  # La: alpha-premultiplied, undone by the conversion
        return [np.asarray(img.convert("LA") if mode == "La" else img, dtype=np.float32)[..., 0] / 255.0]
    if mode == "CMYK":
        cmyk = np.asarray(img, dtype=np.float32) / 255.0
        black = 1.0 - cmyk[..., 3]
        return [(1.0 - cmyk[..., i]) * black for i in range(3)]
    if mode not in ("RGB", "RGBA", "RGBX"):
        img = img.convert("RGBA" if mode in ("P", "PA", "RGBa") else "RGB")  # palette: exact 8-bit colours
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    return [rgb[..., i] for i in range(3)]


def _png16_color(path: str, img: Any) -> bool:
    """Whether the file is a 16-bit PNG that Pillow would read as 8 bits (colour, or gray with alpha)."""
    if img.format != "PNG":
        return False
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return False
    return head[24] == 16 and head[25] in _PNG16_CHANNELS


def _decode_png16(path: str, where: str) -> list[np.ndarray]:
    """A non-interlaced 16-bit RGB, RGBA or gray+alpha PNG, decoded with zlib and the PNG row filters
    (PNG specification, section 9), as its colour channels (1 or 3) in [0, 1]."""
    with open(path, "rb") as fh:
        data = fh.read()
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise InputError(f"cannot read {where}: no PNG header")
    width, height, _, color, _, _, interlace = header
    if interlace:
        raise InputError(
            f"{where} is an interlaced 16-bit colour PNG, which cannot be read at full precision; save it "
            "without interlacing"
        )
    samples = _PNG16_CHANNELS[color]
    bpp = 2 * samples
    stride = width * bpp
    expected = height * (stride + 1)
    raw = zlib.decompressobj().decompress(b"".join(idat), expected)  # never more than the image holds
    if len(raw) < expected:
        raise InputError(f"cannot read {where}: its pixel data is truncated")
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1)
        out[y] = _unfilter(kind, row, prev, bpp, where)
        prev = out[y]
    values = out.view(">u2").reshape(height, width, samples).astype(np.float32) / 65535.0
    colours = 1 if samples == 2 else 3
    return [values[..., i] for i in range(colours)]


def _unfilter(kind: int, row: np.ndarray, prev: np.ndarray, bpp: int, where: str) -> np.ndarray:
    if kind == 0:
        return row
    if kind == 1:  # Sub: a running sum along the row, per byte of a pixel (uint8 wraps modulo 256)
        return np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:  # Up
        return row + prev
    if kind not in (3, 4):
        raise InputError(f"cannot read {where}: unknown PNG row filter {kind}")
    cur = bytearray(row.tobytes())
    up = prev.tobytes()
    for i in range(len(cur)):  # Average and Paeth depend on the byte just decoded: sequential
        a = cur[i - bpp] if i >= bpp else 0
        b = up[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
            continue
        c = up[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return np.frombuffer(bytes(cur), dtype=np.uint8)


__all__ = ["LUMA", "MAX_IMAGE_PIXELS", "load_image"]
