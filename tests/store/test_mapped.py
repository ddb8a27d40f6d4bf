"""Memory-mapped rows (the CPU analysis's read path) show exactly what HDF5 reads, or step aside."""

from __future__ import annotations

import numpy as np
import pytest

from cka_offline.store.reader import open_activations

from ..analyze_fixtures import chain_activations, write_acts


def _check_all_orders(f, name):
    mapped = f.mapped_rows(name)
    assert mapped is not None
    rng = np.random.default_rng(0)
    n = f.n_examples
    width = f.layer(name).features
    for rows in (
        np.arange(n),
        np.sort(rng.choice(n, 13, replace=False)),
        rng.permutation(n)[:17],
        np.array([n - 1, 0, n - 1]),
        np.array([], dtype=np.int64),
    ):
        out = np.full((len(rows), width), np.nan, dtype=f.layer(name).dtype)
        assert mapped.gather(rows.astype(np.int64), out) is out
        np.testing.assert_array_equal(out, f.read_rows(name, rows))
    with pytest.raises(IndexError):
        mapped.gather(np.array([n]), np.empty((1, width), dtype=f.layer(name).dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk_rows", [7, 16, 64])
def test_gather_equals_hdf5_reads(tmp_path, dtype, chunk_rows):
    acts = chain_activations(45, widths=(6, 1, 9))  # 45 rows: the last chunk is partly filled
    with open_activations(write_acts(tmp_path / "a.h5", acts, chunk_rows=chunk_rows, dtype=dtype)) as f:
        for name in f.layer_names:
            _check_all_orders(f, name)


def test_gather_across_shards_equals_the_whole_file(tmp_path):
    acts = chain_activations(50)
    cut = 23
    write_acts(tmp_path / "p-0.h5", {k: v[:cut] for k, v in acts.items()}, ids=np.arange(cut), shard=(0, 2, 0))
    write_acts(tmp_path / "p-1.h5", {k: v[cut:] for k, v in acts.items()}, ids=np.arange(cut, 50), shard=(1, 2, cut))
    with open_activations(str(tmp_path / "p-*.h5")) as f:
        for name in f.layer_names:
            _check_all_orders(f, name)
            out = np.empty((50, acts[name].shape[1]), np.float32)
            np.testing.assert_array_equal(f.mapped_rows(name).gather(np.arange(50), out), acts[name])


@pytest.mark.parametrize("compression", ["gzip", "lz4"])
def test_compressed_layers_are_not_mapped(tmp_path, compression):
    acts = chain_activations(30)
    with open_activations(write_acts(tmp_path / "c.h5", acts, compression=compression)) as f:
        assert all(f.mapped_rows(name) is None for name in f.layer_names)


def test_views_stay_valid_after_release_and_close_is_safe(tmp_path):
    acts = chain_activations(40)
    f = open_activations(write_acts(tmp_path / "a.h5", acts, chunk_rows=7))
    mapped = f.mapped_rows("layer1")
    out = np.empty((40, acts["layer1"].shape[1]), np.float32)
    for rows in (np.arange(3, 30), np.random.default_rng(2).permutation(40), np.arange(40)):
        np.testing.assert_array_equal(mapped.gather(rows, out[: len(rows)]), acts["layer1"][rows])
        f.release_mapped()  # drops the resident pages read so far; the next gather maps them again
    f.close()  # a view is still referenced: the map is left to close with it, no error
    del mapped
