"""Image decoding (cka_offline.images): every mode at the precision its file holds, against numpy references
written from the formulas in the module docstring; the pixel limit; a class-sorted folder through cka-extract."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cka_offline.errors import InputError
from cka_offline.images import MAX_IMAGE_PIXELS, load_image
from cka_offline.store.reader import open_activations

from .hardening.builders import SAMPLE, error_line, invoke

RNG = np.random.default_rng(7)
LUMA = (0.299, 0.587, 0.114)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png16(path: Path, arr: np.ndarray, color_type: int, *, interlace: int = 0, size: tuple | None = None) -> Path:
    """A 16-bit PNG written from the specification: row ``y`` uses filter ``y % 5`` (None, Sub, Up,
    Average, Paeth), so every filter the decoder undoes is exercised."""
    height, width = arr.shape[:2]
    samples = arr.reshape(height, width, -1).astype(">u2")
    bpp = samples.shape[2] * 2
    rows = [bytearray(samples[y].tobytes()) for y in range(height)]
    out = bytearray()
    for y, cur in enumerate(rows):
        prev = rows[y - 1] if y else bytearray(len(cur))
        kind = y % 5
        filtered = bytearray(len(cur))
        for i, x in enumerate(cur):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            filtered[i] = (x - pred) % 256
        out += bytes([kind]) + filtered
    w, h = size or (width, height)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, interlace)
    data = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(out))) + _chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def luma(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float64 -> (1, H, W) with the ITU-R 601-2 weights."""
    return sum(w * rgb[i] for i, w in enumerate(LUMA))[None]


def check(path: Path, rgb_reference: np.ndarray, gray_reference: np.ndarray | None = None) -> None:
    """load_image against float64 references (3, H, W) and (1, H, W)."""
    rgb = load_image(str(path), grayscale=False, size=None)
    assert rgb.dtype == np.float32 and rgb.shape == rgb_reference.shape
    np.testing.assert_allclose(rgb, rgb_reference, rtol=0, atol=1e-6)
    gray = load_image(str(path), grayscale=True, size=None)
    ref = luma(rgb_reference) if gray_reference is None else gray_reference
    np.testing.assert_allclose(gray, ref, rtol=0, atol=1e-6)


def test_16_bit_grayscale_png_keeps_full_precision(tmp_path):
    arr = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 65535, 1  # the top and the bottom of the range: no clipping, no 8-bit step
    Image.fromarray(arr).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    ref = arr.astype(np.float64)[None] / 65535
    check(tmp_path / "g.png", np.repeat(ref, 3, axis=0), ref)
    assert load_image(str(tmp_path / "g.png"), grayscale=True, size=None)[0, 0, 1] == np.float32(1 / 65535)


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)])
def test_16_bit_colour_png_is_decoded_at_full_precision(tmp_path, color_type, channels):
    arr = RNG.integers(0, 65536, (7, 6, channels), dtype=np.uint16)
    path = png16(tmp_path / "c.png", arr, color_type)
    values = arr.astype(np.float64).transpose(2, 0, 1) / 65535
    if channels == 2:  # gray + alpha: the alpha is dropped
        check(path, np.repeat(values[:1], 3, axis=0), values[:1])
    else:  # RGB(A): alpha dropped, not composited
        check(path, values[:3])
    assert np.asarray(Image.open(path)).dtype == np.uint8  # what Pillow alone would have given


def test_interlaced_16_bit_colour_png_is_refused(tmp_path):
    path = png16(tmp_path / "i.png", RNG.integers(0, 65536, (4, 4, 3), dtype=np.uint16), 2, interlace=1)
    with pytest.raises(InputError, match=r"image .*i\.png is an interlaced 16-bit colour PNG, .*without interlacing"):
        load_image(str(path), grayscale=False, size=None)


def test_8_bit_modes(tmp_path):
    rgb = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    ref_rgb = rgb.astype(np.float64).transpose(2, 0, 1) / 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    check(tmp_path / "rgb.png", ref_rgb)
    rgba = np.concatenate([rgb, RNG.integers(0, 256, (4, 5, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    check(tmp_path / "rgba.png", ref_rgb)  # alpha dropped, not composited

    gray = RNG.integers(0, 256, (4, 5), dtype=np.uint8)
    ref_gray = gray.astype(np.float64)[None] / 255
    Image.fromarray(gray).save(tmp_path / "l.png")
    check(tmp_path / "l.png", np.repeat(ref_gray, 3, axis=0), ref_gray)
    la = np.stack([gray, RNG.integers(0, 256, (4, 5), dtype=np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    check(tmp_path / "la.png", np.repeat(ref_gray, 3, axis=0), ref_gray)

    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (4, 5), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.reshape(-1).tolist())
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    check(tmp_path / "p.png", palette[index].astype(np.float64).transpose(2, 0, 1) / 255)

    bits = RNG.integers(0, 2, (4, 5)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    check(tmp_path / "bits.png", np.repeat(bits[None].astype(np.float64), 3, axis=0), bits[None].astype(np.float64))


def test_cmyk_i_and_f_modes(tmp_path):
    cmyk = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c = cmyk.astype(np.float64) / 255
    check(tmp_path / "c.tif", np.stack([(1 - c[..., i]) * (1 - c[..., 3]) for i in range(3)]))

    ints = RNG.integers(0, 65536, (4, 5)).astype(np.int32)
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    ref = ints.astype(np.float64)[None] / 65535
    check(tmp_path / "i.tif", np.repeat(ref, 3, axis=0), ref)
    Image.fromarray(ints * 2 - 70000, "I").save(tmp_path / "wide.tif")
    with pytest.raises(InputError, match=r"wide\.tif holds 32-bit integers outside 0\.\.65535 .*16-bit PNG"):
        load_image(str(tmp_path / "wide.tif"), grayscale=True, size=None)

    floats = RNG.random((4, 5)).astype(np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    check(tmp_path / "f.tif", np.repeat(floats[None].astype(np.float64), 3, axis=0), floats[None])


def test_resize_is_done_in_floating_point(tmp_path):
    arr = RNG.integers(0, 65536, (6, 8), dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"), grayscale=True, size=(3, 4))
    ref = Image.fromarray(arr.astype(np.float32) / 65535, "F").resize((4, 3), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(out[0], np.asarray(ref), rtol=0, atol=1e-6)
    assert not np.allclose(out * 255, np.round(out * 255))  # not through 8 bits


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = 100_000  # 10**10 pixels declared by a file of a hundred bytes
    path = png16(tmp_path / "bomb.png", np.zeros((1, 1), np.uint16), 0, size=(side, side))
    assert path.stat().st_size < 200 and side * side > MAX_IMAGE_PIXELS
    with pytest.raises(
        InputError,
        match=rf"image .*bomb\.png has 10000000000 pixels, more than the limit of "
        rf"{MAX_IMAGE_PIXELS} \(a decompression bomb\?\); resize it",
    ):
        load_image(str(path), grayscale=False, size=None)
    (tmp_path / "img").mkdir()
    path.rename(tmp_path / "img" / "bomb.png")
    r = invoke("cka-extract", [SAMPLE / "cnn_b.onnx", "-i", tmp_path / "img", "-o", tmp_path / "o.h5"])
    assert r.exit_code == 3
    assert re.fullmatch(r"image .*bomb\.png has 10000000000 pixels, .*", error_line(r, "cka-extract"))
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match=r"cannot read image .*bad\.png: "):
        load_image(str(tmp_path / "img" / "bad.png"), grayscale=False, size=None)


def test_class_sorted_folder_of_8_and_16_bit_pngs_matches_numpy_reference(tmp_path):
    """cka-extract over a folder equals cka-extract over the same images decoded by the formulas."""
    folder, names, pixels = tmp_path / "img", [], []
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            name = f"{cls}/{i:02d}.png"
            if i % 2:
                arr = RNG.integers(0, 65536, (8, 8), dtype=np.uint16)
                Image.fromarray(arr).save(folder / name)
                ref = arr / 65535
            else:
                arr = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / name)
                ref = sum(w * arr[..., k] / 255 for k, w in enumerate(LUMA))
            names.append(name)
            pixels.append(ref[None].astype(np.float32))
    np.savez(tmp_path / "ref.npz", pixels=np.stack(pixels), ids=np.array(names))
    model = SAMPLE / "cnn_b.onnx"
    common = ["-l", "*", "-q"]
    r = invoke(
        "cka-extract",
        [model, "-i", folder, "-I", "grayscale=true", "-I", "name=pixels", "-o", tmp_path / "img.h5", *common],
    )
    assert r.exit_code == 0, r.output
    r = invoke("cka-extract", [model, "-i", tmp_path / "ref.npz", "-o", tmp_path / "ref.h5", *common])
    assert r.exit_code == 0, r.output
    with open_activations(tmp_path / "img.h5") as a, open_activations(tmp_path / "ref.h5") as b:
        assert a.ids.tolist() == names == b.ids.tolist()  # sorted by class folder, then name
        for layer in b.layer_names:
            np.testing.assert_allclose(a.read(layer, 0, len(names)), b.read(layer, 0, len(names)), atol=1e-5)
