"""Hostile inputs through the installed commands, the way an attacker would hand them over.

Tiny files that declare far more than they hold, inputs that point into other files, FIFOs, names and
ids that are not UTF-8. Each run of a real console script is limited to 2.5 GB of address space and a
timeout, so a reader that allocates from a declaration (or blocks on a FIFO) fails here fast instead of
swapping or hanging. Every refusal is one line on stderr naming the file and the fix, exit code 3, and
no output file. docs/reliability.md ("Hostile inputs") lists the same classes.
"""

from __future__ import annotations

import io
import os
import re
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from cka_offline.store.reader import open_activations

from .builders import SAMPLE, acts, error_line, invoke

BIN = Path(sys.executable).parent
ONNX = str(SAMPLE / "cnn_b.onnx")  # input "pixels" (batch, 1, 8, 8)
MEMORY_LIMIT = 2_500_000_000
ROWS = 10**9


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(prog: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``prog`` under the memory limit; a hang (a FIFO opened) fails the test after 60 s."""
    return subprocess.run(
        [str(BIN / prog), *map(str, args)],
        cwd=cwd,
        preexec_fn=_limited,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error(r: subprocess.CompletedProcess, prog: str, match: str) -> None:
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert re.fullmatch(f"{prog}: error: {match}", lines[0]), lines[0]


def _npy_bytes(shape: tuple, descr: str = "<f4", data: bytes = b"\0" * 64) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + data


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# -- every hostile file: (command, how to build it in tmp_path -> arguments, the error line) -------------------


def npz_deflated_declares_1e9_rows(t):
    return ["cka-extract", ONNX, "-i", _zip(t / "bomb.npz", {"pixels.npy": _npy_bytes((ROWS, 1, 8, 8))})]


def npz_stored_declares_more_rows(t):
    member = _npy_bytes((ROWS, 1, 8, 8), data=np.zeros((2, 1, 8, 8), np.float32).tobytes())
    return ["cka-extract", ONNX, "-i", _zip(t / "stored.npz", {"pixels.npy": member}, zipfile.ZIP_STORED)]


def npy_declares_more_rows(t):
    (t / "short.npy").write_bytes(_npy_bytes((ROWS, 1, 8, 8)))
    return ["cka-extract", ONNX, "-i", t / "short.npy"]


def npy_declares_empty_rows(t):
    (t / "empty.npy").write_bytes(_npy_bytes((10**12, 0), data=b""))
    return ["cka-extract", ONNX, "-i", t / "empty.npy"]


def npy_malformed_header(t):
    (t / "bad.npy").write_bytes(
        b"\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3 8), }\n"
    )
    return ["cka-extract", ONNX, "-i", t / "bad.npy"]


def hdf5_declares_unstored_rows(t):
    with h5py.File(t / "in.h5", "w") as h:
        h.create_dataset("pixels", shape=(ROWS, 1, 8, 8), dtype=np.float32, chunks=(1, 1, 8, 8))
    return ["cka-extract", ONNX, "-i", f"{t / 'in.h5'}:/pixels"]


def arrays_npy_declares_more_rows(t):
    (t / "acts").mkdir()
    (t / "acts" / "fc.npy").write_bytes(_npy_bytes((ROWS, 4)))
    return ["cka-extract", t / "acts"]


def arrays_npz_deflated_declares_1e9_rows(t):
    return ["cka-extract", _zip(t / "acts.npz", {"fc.npy": _npy_bytes((ROWS, 4))})]


def arrays_ids_file_declares_1e9_rows(t):
    (t / "acts").mkdir()
    np.save(t / "acts" / "fc.npy", np.zeros((3, 4), np.float32))
    (t / "ids.npy").write_bytes(_npy_bytes((ROWS,), "<i8"))
    return ["cka-extract", t / "acts", "-X", f"ids={t / 'ids.npy'}"]


def fifo(t, name: str) -> Path:
    os.mkfifo(t / name)
    return t / name


def fifo_inputs(t):
    return ["cka-extract", ONNX, "-i", fifo(t, "in.npz")]


def fifo_in_image_folder(t):
    from PIL import Image

    (t / "img").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(t / "img" / "a.png")
    fifo(t / "img", "b.png")
    return ["cka-extract", ONNX, "-i", t / "img", "-I", "grayscale=true", "-I", "name=pixels"]


def fifo_activation_file_analyze(t):
    return ["cka-analyze", fifo(t, "a.h5"), acts(t / "b.h5"), "--device", "cpu", "-q"]


def fifo_activation_file_inspect(t):
    return ["cka-inspect", fifo(t, "a.h5")]


def fifo_arrays_ids(t):
    (t / "acts").mkdir()
    np.save(t / "acts" / "fc.npy", np.zeros((3, 4), np.float32))
    return ["cka-extract", t / "acts", "-X", f"ids={fifo(t, 'ids.txt')}"]


DECLARES = r"the header declares shape \({shape}\) of {dtype} \(\d+ bytes\) but \d+ bytes follow it; .*save it again"
CASES = {
    "npz-deflated-1e9-rows": (
        npz_deflated_declares_1e9_rows,
        r"array 'pixels' in .*bomb\.npz: " + DECLARES.format(shape=f"{ROWS}, 1, 8, 8", dtype="float32"),
    ),
    "npz-stored-more-rows": (
        npz_stored_declares_more_rows,
        r"array 'pixels' in .*stored\.npz: " + DECLARES.format(shape=f"{ROWS}, 1, 8, 8", dtype="float32"),
    ),
    "npy-more-rows": (
        npy_declares_more_rows,
        r"inputs .*short\.npy: " + DECLARES.format(shape=f"{ROWS}, 1, 8, 8", dtype="float32"),
    ),
    "npy-10**12-empty-rows": (
        npy_declares_empty_rows,
        r"inputs .*empty\.npy: declares 1000000000000 examples of 0 bytes each .*at least one value",
    ),
    "npy-malformed-header": (
        npy_malformed_header,
        r"inputs .*bad\.npy: not a readable \.npy array \(malformed header: .*\); save it with numpy\.save",
    ),
    "hdf5-unstored-rows": (
        hdf5_declares_unstored_rows,
        r".*in\.h5: dataset /pixels declares shape \(1000000000, 1, 8, 8\) but stores only 0 of its "
        r"1000000000 chunks; save the inputs again",
    ),
    "arrays-npy-more-rows": (
        arrays_npy_declares_more_rows,
        r".*fc\.npy: " + DECLARES.format(shape=f"{ROWS}, 4", dtype="float32"),
    ),
    "arrays-npz-deflated-1e9-rows": (
        arrays_npz_deflated_declares_1e9_rows,
        r".*acts\.npz:fc\.npy: " + DECLARES.format(shape=f"{ROWS}, 4", dtype="float32"),
    ),
    "arrays-ids-file-1e9-rows": (
        arrays_ids_file_declares_1e9_rows,
        r"ids file .*ids\.npy: " + DECLARES.format(shape=f"{ROWS},", dtype="int64"),
    ),
    "fifo-inputs": (fifo_inputs, r"inputs .*in\.npz is a named pipe \(FIFO\), not a regular file; .*"),
    "fifo-in-image-folder": (
        fifo_in_image_folder,
        r"image .*img/b\.png is a named pipe \(FIFO\), not a regular file; .*",
    ),
    "fifo-activation-file-analyze": (
        fifo_activation_file_analyze,
        r"activation file .*a\.h5 is a named pipe \(FIFO\), not a regular file; .*",
    ),
    "fifo-activation-file-inspect": (
        fifo_activation_file_inspect,
        r"activation file .*a\.h5 is a named pipe \(FIFO\), not a regular file; .*",
    ),
    "fifo-arrays-ids-file": (fifo_arrays_ids, r"ids file .*ids\.txt is a named pipe \(FIFO\), not a regular file; .*"),
}


@pytest.mark.parametrize("name", CASES)
def test_hostile_file_is_one_line_under_a_memory_limit(tmp_path, name):
    build, match = CASES[name]
    prog, *args = build(tmp_path)
    before = set(os.listdir(tmp_path))
    out = ["-o", tmp_path / "out.h5"] if prog != "cka-inspect" else []
    r = run(prog, [*args, *out], tmp_path)
    one_error(r, prog, match)
    assert set(os.listdir(tmp_path)) == before  # no output, complete or partial


# -- HDF5 inputs that read other files: refused, like activation files, unless --allow-external --------------


def _secret(t: Path) -> Path:
    (t / "elsewhere").mkdir()
    secret = t / "elsewhere" / "secret.h5"
    with h5py.File(secret, "w") as h:
        h["pixels"] = np.full((6, 1, 8, 8), 7.0, np.float32)
        h["ids"] = np.arange(100, 106)
    return secret


@pytest.mark.parametrize(
    "kind", ["external-link", "group-external-link", "soft-to-external", "virtual", "external-storage", "ids-link"]
)
def test_hdf5_inputs_reading_other_files_are_refused_unless_allowed(tmp_path, kind):
    secret = _secret(tmp_path)
    raw = tmp_path / "elsewhere" / "raw.bin"
    raw.write_bytes(np.full((6, 1, 8, 8), 7.0, np.float32).tobytes())
    path = tmp_path / "in.h5"
    dataset, options = "/pixels", []
    with h5py.File(path, "w") as h:
        if kind == "external-link":
            h["pixels"] = h5py.ExternalLink(str(secret), "pixels")
        elif kind == "group-external-link":
            h["g"] = h5py.ExternalLink(str(secret), "/")
            dataset = "/g/pixels"
        elif kind == "soft-to-external":
            h["g"] = h5py.ExternalLink(str(secret), "/")
            h["pixels"] = h5py.SoftLink("/g/pixels")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(6, 1, 8, 8), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(secret), "pixels", shape=(6, 1, 8, 8))
            h.create_virtual_dataset("pixels", layout)
        elif kind == "external-storage":
            h.create_dataset("pixels", shape=(6, 1, 8, 8), dtype=np.float32, external=[(str(raw), 0, 6 * 256)])
        else:
            h["pixels"] = np.zeros((6, 1, 8, 8), np.float32)
            h["ids"] = h5py.ExternalLink(str(secret), "ids")
            options = ["-I", "ids=/ids"]
    args = [ONNX, "-i", f"{path}:{dataset}", *options, "-o", tmp_path / "out.h5", "-q"]
    r = invoke("cka-extract", args)
    assert r.exit_code == 3, r.output
    line = error_line(r, "cka-extract")
    assert re.fullmatch(
        r".*in\.h5: /\S+ (is an external link to .*secret\.h5:/?\S*|is a virtual dataset .*|keeps its data in "
        r"external file\(s\) .*raw\.bin.*); files that point outside themselves are refused by default\. If you "
        r"trust the file, pass --allow-external to cka-extract .*",
        line,
    ), line
    assert not (tmp_path / "out.h5").exists()
    r = invoke("cka-extract", [*args, "--allow-external"])
    assert r.exit_code == 0, r.output
    with open_activations(tmp_path / "out.h5") as f:
        expected = np.arange(100, 106) if kind == "ids-link" else np.arange(6)
        np.testing.assert_array_equal(f.ids, expected)


def test_hdf5_inputs_soft_links_inside_the_file_are_followed(tmp_path):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as h:
        h["data/pixels"] = np.zeros((5, 1, 8, 8), np.float32)
        h["alias"] = h5py.SoftLink("data")  # a group alias, then a relative dataset link inside it
        h["data/again"] = h5py.SoftLink("pixels")
        h.create_dataset("names", data=[f"img{i}" for i in range(5)], dtype=h5py.string_dtype())
    r = invoke("cka-extract", [ONNX, "-i", f"{path}:/alias/again", "-I", "ids=/names", "-o", tmp_path / "o.h5", "-q"])
    assert r.exit_code == 0, r.output
    with open_activations(tmp_path / "o.h5") as f:
        assert f.ids.tolist() == [f"img{i}" for i in range(5)]  # variable-length string ids, as text


# -- example ids: stored faithfully or refused ------------------------------------------------------------------


def _digits_npz(path: Path, ids: np.ndarray) -> Path:
    np.savez(path, pixels=np.zeros((len(ids), 1, 8, 8), np.float32), ids=ids)
    return path


@pytest.mark.parametrize(
    "ids, stored",
    [
        (np.array([b"img0", b"img1", "é".encode()]), ["img0", "img1", "é"]),  # bytes: decoded, not "b'img0'"
        (np.array([1, 2**63 - 1, 0], np.uint64), [1, 2**63 - 1, 0]),  # unsigned ids that fit
    ],
)
def test_ids_are_stored_faithfully(tmp_path, ids, stored):
    args = [ONNX, "-i", _digits_npz(tmp_path / "in.npz", ids), "-o", tmp_path / "out.h5", "-q"]
    r = invoke("cka-extract", args)
    assert r.exit_code == 0, r.output
    with open_activations(tmp_path / "out.h5") as f:
        assert f.ids.tolist() == stored


@pytest.mark.parametrize(
    "ids, match",
    [
        (
            np.array([2**63 + 1, 1, 2], np.uint64),
            r".*in\.npz: example id 9223372036854775809 is above 2\*\*63-1, the largest id the format stores .*"
            r"give the ids as strings instead .*",
        ),
        (np.array([b"ok", b"\xffbad"]), r".*in\.npz: example id '\\xffbad' is not valid UTF-8; .*"),
        (np.array([0.5, 1.5]), r".*in\.npz: example ids must be integers or strings, got dtype float64"),
    ],
)
def test_ids_that_cannot_be_stored_faithfully_are_refused(tmp_path, ids, match):
    r = invoke("cka-extract", [ONNX, "-i", _digits_npz(tmp_path / "in.npz", ids), "-o", tmp_path / "out.h5"])
    assert r.exit_code == 3
    assert re.fullmatch(match, error_line(r, "cka-extract"))
    assert not (tmp_path / "out.h5").exists()


def test_activation_file_with_uint64_ids_above_int64_is_refused(tmp_path):
    path = acts(tmp_path / "a.h5", n=6)
    with h5py.File(path, "r+") as h:
        del h["ids"]
        h["ids"] = np.array([2**63 + 5, 1, 2, 3, 4, 5], np.uint64)
    r = invoke("cka-inspect", [path])
    assert r.exit_code == 3
    assert re.fullmatch(
        r".*a\.h5: example id 9223372036854775813 does not fit in 64-bit signed integers.*",
        error_line(r, "cka-inspect"),
    )


def test_non_utf8_names_and_ids_are_refused_with_escapes(tmp_path):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsencode(folder) + b"/caf\xe9.png")
    r = invoke(
        "cka-extract", [ONNX, "-i", folder, "-I", "grayscale=true", "-I", "name=pixels", "-o", tmp_path / "o.h5"]
    )
    assert r.exit_code == 3
    assert re.fullmatch(
        r"image file name 'caf\\xe9\.png' under .*img is not valid UTF-8; .*rename it.*", error_line(r, "cka-extract")
    )
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "fc.npy", np.zeros((2, 4), np.float32))
    (tmp_path / "ids.txt").write_bytes(b"one\ntw\xff\n")
    r = invoke("cka-extract", [tmp_path / "acts", "-X", f"ids={tmp_path / 'ids.txt'}", "-o", tmp_path / "o.h5"])
    assert r.exit_code == 3
    assert re.fullmatch(
        r"ids file .*ids\.txt: byte 6 is not valid UTF-8; save it as UTF-8 .*", error_line(r, "cka-extract")
    )
    assert not (tmp_path / "o.h5").exists()
