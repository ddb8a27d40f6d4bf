"""The built-in input readers: .npz, .npy, HDF5 datasets, image folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from cka_offline.errors import InputError, OptionError, PluginError
from cka_offline.extractor import InputReader
from cka_offline.hookspecs import hookimpl
from cka_offline.inputs import HDF5Inputs, ImageFolderInputs, NpyInputs, NpzInputs
from cka_offline.registry import find_input_reader, get_plugin_manager

RNG = np.random.default_rng(1)


def blocks(reader: InputReader, step: int) -> dict[str, np.ndarray]:
    parts = [reader.read(s, min(len(reader), s + step)) for s in range(0, len(reader), step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_reads_blocks_of_every_array(tmp_path, save):
    a = RNG.normal(size=(11, 3, 2)).astype(np.float32)
    b = RNG.integers(0, 9, size=(11, 4))
    save(tmp_path / "in.npz", a=a, b=b, ids=np.array([f"ex{i}" for i in range(11)]))
    reader = NpzInputs(str(tmp_path / "in.npz"))
    assert len(reader) == 11 and list(reader.ids()[:2]) == ["ex0", "ex1"]
    got = blocks(reader, 4)
    assert set(got) == {"a", "b"}  # ids are not a model input
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    np.testing.assert_array_equal(reader.read(2, 5)["a"], a[2:5])  # going back reopens the stream
    reader.close()


def test_npz_fortran_order_and_default_ids(tmp_path):
    a = np.asfortranarray(RNG.normal(size=(6, 5)))
    np.savez(tmp_path / "f.npz", a=a)
    with_reader = NpzInputs(str(tmp_path / "f.npz"))
    np.testing.assert_array_equal(with_reader.ids(), np.arange(6))
    np.testing.assert_array_equal(blocks(with_reader, 4)["a"], a)
    with_reader.close()


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(InputError, match="holds Python objects.*pickle"):
        NpzInputs(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "len.npz", a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    with pytest.raises(InputError, match="different numbers of examples.*a: 3, b: 4"):
        NpzInputs(str(tmp_path / "len.npz"))
    np.savez(tmp_path / "dup.npz", a=np.zeros((3, 2)), ids=np.array([5, 7, 5]))
    with pytest.raises(InputError, match="more than once, e.g. 5"):
        NpzInputs(str(tmp_path / "dup.npz"))
    np.savez(tmp_path / "ids.npz", a=np.zeros((3, 2)), ids=np.arange(4))
    with pytest.raises(InputError, match="'ids' .* has 4 entries but the inputs have 3"):
        NpzInputs(str(tmp_path / "ids.npz"))
    np.savez(tmp_path / "scalar.npz", a=np.float32(1))
    with pytest.raises(InputError, match="is a scalar"):
        NpzInputs(str(tmp_path / "scalar.npz"))
    np.savez(tmp_path / "only_ids.npz", ids=np.arange(3))
    with pytest.raises(InputError, match="holds no input arrays"):
        NpzInputs(str(tmp_path / "only_ids.npz"))
    np.savez(tmp_path / "ok.npz", a=np.zeros((3, 2)))
    with pytest.raises(OptionError, match="unknown option\\(s\\) resize for npz inputs .*known: none"):
        NpzInputs(str(tmp_path / "ok.npz"), resize="2x2")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(InputError, match="cannot read inputs .*bad.npz"):
        NpzInputs(str(tmp_path / "bad.npz"))


def test_npy(tmp_path):
    x = RNG.normal(size=(7, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    reader = NpyInputs(str(tmp_path / "x.npy"))
    assert len(reader) == 7 and list(reader.read(0, 1)) == ["input"]
    np.testing.assert_array_equal(blocks(reader, 3)["input"], x)
    np.testing.assert_array_equal(reader.ids(), np.arange(7))
    reader.close()
    np.save(tmp_path / "s.npy", np.float32(2))
    with pytest.raises(InputError, match="is a scalar"):
        NpyInputs(str(tmp_path / "s.npy"))
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="o.npy: cannot read it without unpickling: it holds Python objects"):
        NpyInputs(str(tmp_path / "o.npy"))


def test_hdf5_dataset(tmp_path):
    x = RNG.normal(size=(9, 4)).astype(np.float32)
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f["group/pixels"] = x
        f["group/mask"] = np.ones((9, 4), dtype=np.int8)
        f["meta/ids"] = np.arange(10, 19)
        f["meta/dup"] = np.zeros(9, dtype=np.int64)
    reader = HDF5Inputs(f"{path}:/group/pixels", ids="/meta/ids")
    assert HDF5Inputs.can_open(f"{path}:/group/pixels") and len(reader) == 9
    np.testing.assert_array_equal(blocks(reader, 4)["pixels"], x)
    np.testing.assert_array_equal(reader.ids(), np.arange(10, 19))
    assert reader.fingerprint()["description"].endswith(':pixels {"ids": "/meta/ids"}')
    reader.close()
    both = HDF5Inputs(str(path), dataset="/group/pixels,/group/mask")
    assert sorted(both.read(0, 2)) == ["mask", "pixels"]
    both.close()
    with pytest.raises(InputError, match="holds 4 datasets .*name the input as .*in.h5:/path/to/dataset"):
        HDF5Inputs(str(path))
    with pytest.raises(InputError, match="has no dataset '/group/nope'"):
        HDF5Inputs(f"{path}:/group/nope")
    with pytest.raises(InputError, match="more than once, e.g. 0"):
        HDF5Inputs(f"{path}:/group/pixels", ids="/meta/dup")
    with pytest.raises(InputError, match="inputs .*missing.h5: no such file"):
        HDF5Inputs(str(tmp_path / "missing.h5"))
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["x"] = x
    single = HDF5Inputs(str(tmp_path / "one.h5"))
    assert list(single.read(0, 1)) == ["x"]
    single.close()


def write_images(folder, sizes):
    paths = []
    for rel, size in sizes:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = (RNG.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(p)
        paths.append((rel, arr))
    return dict(paths)


def test_image_folder(tmp_path):
    images = write_images(tmp_path / "img", [("b/2.png", (4, 6)), ("a.png", (4, 6)), ("b/1.png", (4, 6))])
    (tmp_path / "img" / "notes.txt").write_text("ignored")
    reader = ImageFolderInputs(str(tmp_path / "img"), mean="0.5", std="0.25,0.5,1")
    assert list(reader.ids()) == ["a.png", "b/1.png", "b/2.png"]
    x = reader.read(0, 3)["input"]
    assert x.dtype == np.float32 and x.shape == (3, 3, 4, 6)
    ref = (images["b/1.png"].transpose(2, 0, 1) / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0]).reshape(3, 1, 1)
    np.testing.assert_allclose(x[1], ref, rtol=1e-5, atol=1e-6)
    gray = ImageFolderInputs(str(tmp_path / "img"), resize="8x5", grayscale="true", name="pixels")
    assert gray.read(0, 2)["pixels"].shape == (2, 1, 8, 5)
    assert gray.fingerprint() != reader.fingerprint()


def test_image_folder_errors(tmp_path):
    write_images(tmp_path / "img", [("a.png", (4, 6)), ("b.png", (5, 6))])
    reader = ImageFolderInputs(str(tmp_path / "img"))
    with pytest.raises(InputError, match="image b.png .* --input-option resize=HxW"):
        reader.read(0, 2)
    with pytest.raises(InputError, match="resize='big' must be HxW"):
        ImageFolderInputs(str(tmp_path / "img"), resize="big")
    with pytest.raises(InputError, match="resize='0x3' must be positive"):
        ImageFolderInputs(str(tmp_path / "img"), resize="0x3")
    with pytest.raises(InputError, match="mean has 2 values; give 1 or 3"):
        ImageFolderInputs(str(tmp_path / "img"), mean="1,2")
    with pytest.raises(InputError, match="std must not contain 0"):
        ImageFolderInputs(str(tmp_path / "img"), std=0)
    with pytest.raises(InputError, match="mean='a' must be a number"):
        ImageFolderInputs(str(tmp_path / "img"), mean="a")
    with pytest.raises(OptionError, match="grayscale='maybe' is not a boolean"):
        ImageFolderInputs(str(tmp_path / "img"), grayscale="maybe")
    with pytest.raises(OptionError, match="unknown option\\(s\\) size for images inputs .*known: resize, mean"):
        ImageFolderInputs(str(tmp_path / "img"), size=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        ImageFolderInputs(str(tmp_path / "empty"))
    (tmp_path / "img" / "c.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*c.png"):
        ImageFolderInputs(str(tmp_path / "img"), resize="4x4").read(0, 3)


def test_fingerprint_follows_content(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 2)))
    before = NpzInputs(str(tmp_path / "a.npz")).fingerprint()
    np.savez(tmp_path / "a.npz", x=np.ones((2, 2)))
    after = NpzInputs(str(tmp_path / "a.npz")).fingerprint()
    assert before["description"] == after["description"] and before["sha256"] != after["sha256"]


class MyNpz(NpzInputs):
    name = "my-npz"


class Readers:
    @hookimpl
    def cka_input_readers(self):
        return [MyNpz]


def test_reader_lookup_and_plugin_override(tmp_path):
    pm = get_plugin_manager(entry_points=False)
    assert find_input_reader("x.npz", pm) is NpzInputs
    assert find_input_reader("x.NPY", pm) is NpyInputs
    assert find_input_reader("f.hdf5:/a/b", pm) is HDF5Inputs
    assert find_input_reader(str(tmp_path), pm) is ImageFolderInputs
    with pytest.raises(PluginError, match="no input reader can open 'x.csv'"):
        find_input_reader("x.csv", pm)
    assert find_input_reader("x.npz", get_plugin_manager(entry_points=False, plugins=[Readers()])) is MyNpz


def test_damaged_npz_members(tmp_path):
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10, 2)})
    with zipfile.ZipFile(tmp_path / "short.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", b"\x93NUMPY" + header.getvalue()[6:] + np.zeros(6, "<f4").tobytes())
    # the header declares more rows than the member holds: refused on opening, before any allocation
    with pytest.raises(
        InputError,
        match=r"array 'a' in .*short.npz: the header declares shape \(10, 2\) of float32 "
        r"\(80 bytes\) but 24 bytes follow it; .*save it again",
    ):
        NpzInputs(str(tmp_path / "short.npz"))
    with zipfile.ZipFile(tmp_path / "garbage.npz", "w") as zf:
        zf.writestr("a.npy", b"this is not an array")
    with pytest.raises(InputError, match="array 'a' in .*garbage.npz: not a readable .npy array \\(malformed header"):
        NpzInputs(str(tmp_path / "garbage.npz"))


def test_hdf5_dataset_errors(tmp_path):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((4, 2))
        f["scalar"] = 3.0
        f["ids"] = np.arange(5)
        f.create_dataset("text", data=["a", "b"], dtype=h5py.string_dtype())
    with pytest.raises(InputError, match="dataset /scalar in .* is a scalar"):
        HDF5Inputs(f"{path}:/scalar")
    with pytest.raises(
        InputError, match=r"ids /ids in .* has shape \(5,\), the inputs 4 examples; give one id per example"
    ):
        HDF5Inputs(f"{path}:/x", ids="/ids")
    with pytest.raises(InputError, match="dataset /text in .* has variable-length type"):
        HDF5Inputs(f"{path}:/text")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc (Linux)")
@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_streaming_a_memory_mapped_input_keeps_resident_memory_flat(tmp_path, kind):
    """Rows are copied out of the memory map and its pages dropped: reading 96 MB of inputs in batches must
    not leave 96 MB resident (file-backed pages count in RSS as long as they stay mapped)."""
    x = np.ones((3072, 8192), dtype=np.float32)  # 96 MiB
    path = tmp_path / f"x.{kind}"
    if kind == "npz":
        np.savez(path, x=x)
    else:
        np.save(path, x)
    del x
    reader = "NpzInputs" if kind == "npz" else "NpyInputs"
    code = (
        "import sys\n"
        f"from cka_offline.inputs import {reader} as R\n"
        "def hwm():\n"
        "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "r = R(sys.argv[1])\n"
        "r.read(0, 64)\n"
        "before = hwm()\n"
        "total = 0.0\n"
        "for s in range(0, len(r), 64):\n"
        "    total += float(next(iter(r.read(s, s + 64).values())).sum())\n"
        "print(hwm() - before, total)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    grown_kb, total = out.stdout.split()
    assert float(total) == 3072 * 8192  # every row was read
    assert int(grown_kb) < 24 * 1024, f"peak RSS grew by {int(grown_kb) // 1024} MiB while reading 96 MiB"


def test_hdf5_allow_external_is_an_option_outside_the_fingerprint(tmp_path):
    from cka_offline.errors import UnsafeFileError

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(12, dtype=np.float32).reshape(6, 2)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["x"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "x")
    with pytest.raises(UnsafeFileError, match=r"in\.h5: /x is an external link to .*other\.h5:x; .*--allow-external"):
        HDF5Inputs(f"{tmp_path / 'in.h5'}:/x")
    reader = HDF5Inputs(f"{tmp_path / 'in.h5'}:/x", allow_external="true")
    np.testing.assert_array_equal(reader.read(0, 6)["x"], np.arange(12).reshape(6, 2))
    assert reader.fingerprint()["description"] == f"hdf5:{tmp_path / 'in.h5'}:x"  # a trust decision, not a setting
    reader.close()
