"""Every compression a file can use is read the same way by the reader, the analysis' reader threads and
--resume (cka_offline.store.filters): hdf5plugin's filters (Zstd here; LZ4 in tests/store/test_crash.py and
the kill loop) are loaded when a file needs them, and a filter that is not available is one line naming the
file, the layer, the filter and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cka_offline.errors import FormatError
from cka_offline.store.reader import open_activations
from cka_offline.store.schema import layer_key

from .builders import BIN, acts, error_line, invoke


def _recompress(src: str, dst: Path, **filter_kwargs) -> str:
    """A copy of the activation file ``src`` whose layers are stored with ``filter_kwargs``."""
    import hdf5plugin  # noqa: F401 - this builder writes with hdf5plugin's filters

    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for key, value in a.attrs.items():
            b.attrs[key] = value
        a.copy(a["ids"], b, name="ids")
        group = b.create_group("layers")
        for key, ds in a["layers"].items():
            new = group.create_dataset(key, shape=ds.shape, dtype=ds.dtype, chunks=ds.chunks, **filter_kwargs)
            new[...] = ds[...]
            for k, v in ds.attrs.items():
                new.attrs[k] = v
    return str(dst)


@pytest.fixture
def zstd_file(tmp_path):
    import hdf5plugin

    plain = acts(tmp_path / "plain.h5", n=64)
    return plain, _recompress(plain, tmp_path / "zstd.h5", **hdf5plugin.Zstd())


def test_zstd_layers_through_the_installed_commands(zstd_file, tmp_path):
    """A fresh process, where nothing has imported hdf5plugin: cka-inspect and cka-analyze (whose reader
    thread decompresses the blocks, --shuffle blocks) read the Zstd layers as the plain ones."""
    plain, zstd = zstd_file
    r = subprocess.run([str(BIN / "cka-inspect"), zstd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "conv1" in r.stdout, r.stderr
    results = {}
    for name, path in (("zstd", zstd), ("plain", plain)):
        out = tmp_path / f"{name}.json"
        r = subprocess.run(
            [str(BIN / "cka-analyze"), path, plain, "-m", "16", "--shuffle", "blocks", "--device", "cpu", "-q"]
            + ["-o", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr
        results[name] = json.loads(out.read_text())
    # the same rows; the plain file is read through its memory map, the Zstd one through HDF5 (another order
    # of the float64 sums)
    # entries not computed (pairs within one file) are null in the JSON: NaN in both
    cka_zstd, cka_plain = (np.array(results[k]["cka"], dtype=float) for k in ("zstd", "plain"))
    assert np.isfinite(cka_zstd).any()
    np.testing.assert_allclose(cka_zstd, cka_plain, rtol=1e-7, atol=1e-9)
    with open_activations(plain) as a, open_activations(zstd) as b:
        for layer in a.layer_names:
            np.testing.assert_array_equal(a.read(layer, 0, 64), b.read(layer, 0, 64))


def test_hdf5plugin_missing_is_one_line(zstd_file):
    """Without hdf5plugin (its import blocked in a fresh process): the file is refused when it is opened."""
    _, zstd = zstd_file
    code = (
        "import sys; sys.modules['hdf5plugin'] = None\n"
        "from cka_offline.cli.inspect import inspect\n"
        f"inspect([{zstd!r}], prog_name='cka-inspect')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stderr == (
        f"cka-inspect: error: {zstd}: layer 'conv1' is compressed with zstd (HDF5 filter id 32015), which is not "
        "available here; install hdf5plugin, which provides it (pip install hdf5plugin), and run the command again\n"
    )


def test_a_filter_nobody_provides_is_one_line(tmp_path):
    """A layer stored with a filter id no library here knows (its chunks written raw, as its author's
    program would): one line from the commands and from the library, no traceback from a reader thread."""
    plain = acts(tmp_path / "plain.h5", n=16)
    odd = tmp_path / "odd.h5"
    with h5py.File(plain, "r") as a, h5py.File(odd, "w") as b:
        for key, value in a.attrs.items():
            b.attrs[key] = value
        a.copy(a["ids"], b, name="ids")
        a.copy(a["layers"], b, name="layers")
        key = layer_key(1)  # layer fc
        ds = a["layers"][key]
        del b["layers"][key]
        new = b["layers"].create_dataset(
            key, shape=ds.shape, dtype=ds.dtype, chunks=ds.chunks, compression=65000, allow_unknown_filter=True
        )
        for start in range(0, ds.shape[0], ds.chunks[0]):
            new.id.write_direct_chunk((start, 0), ds[start : start + ds.chunks[0]].tobytes())
        for k, v in ds.attrs.items():
            new.attrs[k] = v
    expected = (
        f"{odd}: layer 'fc' is compressed with an unknown HDF5 filter (id 65000), which is not available here; no "
        "installed package provides it: ask the file's author for a copy stored with gzip, lz4 or no compression "
        "(cka-extract --compression)"
    )
    with pytest.raises(FormatError) as info:
        open_activations(str(odd))
    assert str(info.value) == expected
    r = invoke("cka-analyze", [odd, plain, "--device", "cpu"])
    assert r.exit_code == 3 and error_line(r, "cka-analyze") == expected
