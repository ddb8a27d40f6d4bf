import json

import h5py
import numpy as np
import pytest

from cka_offline.store import schema
from cka_offline.store.reader import open_activations
from cka_offline.store.writer import ActivationWriter

from .conftest import make_layers, specs_for, write_file


def test_round_trip_values_names_and_provenance(small_file):
    path, arrays = small_file
    with open_activations(path) as f:
        assert f.version == (schema.FORMAT_MAJOR, schema.FORMAT_MINOR)
        assert f.n_examples == 50
        assert f.layer_names == list(arrays)
        np.testing.assert_array_equal(f.ids, np.arange(50))
        for name, a in arrays.items():
            np.testing.assert_array_equal(f.read(name, 0, 50), a)
            assert f.layer(name).features == a.shape[1]
        assert f.provenance["model"] == "m"
        assert f.chunk_rows == 8


def test_names_never_become_hdf5_paths(small_file):
    path, arrays = small_file
    with h5py.File(path, "r") as h:
        keys = list(h[schema.LAYERS_GROUP])
        assert keys == ["L0000", "L0001", "L0002"]
        assert [h[schema.LAYERS_GROUP][k].attrs["name"] for k in keys] == list(arrays)


@pytest.mark.parametrize("compression", [None, "gzip", "lz4"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtypes_and_compression(tmp_path, compression, dtype):
    arrays = make_layers(30, seed=3)
    path = write_file(tmp_path / "c.h5", arrays, dtype=dtype, compression=compression)
    with open_activations(path) as f:
        for name, a in arrays.items():
            got = f.read(name, 0, 30)
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, a.astype(dtype))
            assert f.layer(name).dtype == dtype


def test_string_ids_and_extras(tmp_path):
    arrays = make_layers(10)
    ids = np.array([f"img/{i:03d}.png" for i in range(10)])
    path = write_file(tmp_path / "s.h5", arrays, ids=ids, provenance={"model": "x", "opset": 17, "options": {"a": 1}})
    with open_activations(path) as f:
        assert f.ids.dtype.kind == "U"
        assert list(f.ids) == list(ids)
        assert f.provenance["extra"] == {"opset": 17}
        assert json.loads(f.provenance["options"]) == {"a": 1}


def test_read_rows_any_order_and_blocks(small_file):
    path, arrays = small_file
    rng = np.random.default_rng(1)
    idx = rng.permutation(50)[:23]
    with open_activations(path) as f:
        for name, a in arrays.items():
            np.testing.assert_array_equal(f.read_rows(name, idx), a[idx])
        seen = []
        for start, stop, block in f.iter_blocks(["fc"], block_rows=16):
            np.testing.assert_array_equal(block["fc"], arrays["fc"][start:stop])
            seen.append((start, stop))
        assert seen == [(0, 16), (16, 32), (32, 48), (48, 50)]
        with pytest.raises(IndexError, match="out of range"):
            f.read_rows("fc", [50])


def test_default_chunk_rows_bounded():
    assert schema.default_chunk_rows(4096, 4) == 256
    assert schema.default_chunk_rows(10, 4) == schema.MAX_CHUNK_ROWS
    assert schema.default_chunk_rows(10**7, 4) == schema.MIN_CHUNK_ROWS


def test_writer_does_not_replace_existing_until_complete(tmp_path):
    arrays = make_layers(20)
    path = write_file(tmp_path / "o.h5", arrays)
    before = open(path, "rb").read()
    w = ActivationWriter(path, ids=np.arange(20), layers=specs_for(arrays), provenance={}, overwrite=True)
    w.write({k: v[:5] for k, v in arrays.items()})
    w.abort()
    assert open(path, "rb").read() == before  # the old complete file is untouched by an aborted overwrite


def test_read_into_a_reused_buffer(tmp_path):
    arrays = make_layers(30, seed=4)
    bounds = [(0, 12, 0), (12, 30, 12)]
    paths = [
        write_file(
            tmp_path / f"s{i}.h5", {k: v[a:b] for k, v in arrays.items()}, ids=np.arange(a, b), shard=(i, 2, off)
        )
        for i, (a, b, off) in enumerate(bounds)
    ]
    with open_activations(paths) as f:
        out = np.full((15, 5), np.nan, np.float32)
        assert f.read("fc", 5, 20, out=out) is out  # across the shard boundary
        np.testing.assert_array_equal(out, arrays["fc"][5:20])
        with pytest.raises(ValueError, match=r"out must be \(15, 5\) float32"):
            f.read("fc", 5, 20, out=np.empty((15, 5), np.float64))
