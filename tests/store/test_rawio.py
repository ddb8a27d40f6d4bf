"""The writer's whole-chunk path (store/rawio.py): same file content as the normal HDF5 write path, for
every way rows can meet chunk boundaries, and it is really taken."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cka_offline.store import rawio, schema

from ..hardening.builders import full_content
from .conftest import make_layers, write_file


@pytest.mark.parametrize(
    ("n", "chunk_rows", "batch"),
    [
        (50, 8, 16),  # batches of whole chunks, a short last chunk
        (50, 8, 7),  # batches that start and end inside chunks
        (48, 8, 48),  # one write of every chunk
        (5, 8, 2),  # chunks longer than the file: no whole chunk at all
        (33, 4, 13),
    ],
)
def test_whole_chunks_write_the_same_file(tmp_path, monkeypatch, n, chunk_rows, batch):
    arrays = make_layers(n, seed=n + batch)
    calls = []
    write_chunk = rawio._write_chunk
    monkeypatch.setattr(rawio, "_write_chunk", lambda ds, row, rows: calls.append(row) or write_chunk(ds, row, rows))
    fast = write_file(tmp_path / "fast.h5", arrays, chunk_rows=chunk_rows, batch=batch)
    # every whole chunk, and nothing else, went through write_direct_chunk
    whole = [
        row
        for row in range(0, n // chunk_rows * chunk_rows, chunk_rows)
        if any(start <= row and row + chunk_rows <= start + batch for start in range(0, n, batch))
    ]
    assert sorted(calls) == sorted(whole * len(arrays))
    monkeypatch.setattr(rawio, "unfiltered", lambda ds: False)  # the normal path for everything
    slow = write_file(tmp_path / "slow.h5", arrays, chunk_rows=chunk_rows, batch=batch)
    assert full_content(fast) == full_content(slow)
    with h5py.File(fast, "r") as f:
        for order, (name, values) in enumerate(arrays.items()):
            ds = f[schema.LAYERS_GROUP][schema.layer_key(order)]
            assert str(ds.attrs[schema.LAYER_ATTR_NAME]) == name
            np.testing.assert_array_equal(ds[()], values)  # against the arrays themselves, not the other file


def test_compressed_layers_keep_the_filter_path(tmp_path, monkeypatch):
    calls = []
    write_rows = rawio.write_rows
    monkeypatch.setattr(
        rawio, "write_rows", lambda ds, rows, start, direct: calls.append(direct) or write_rows(ds, rows, start, direct)
    )
    arrays = make_layers(32)
    write_file(tmp_path / "gz.h5", arrays, chunk_rows=8, batch=8, compression="gzip")
    assert calls and not any(calls)


def test_start_writeback_is_harmless(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100_000)
    rawio.start_writeback(str(path))
    rawio.start_writeback(str(tmp_path / "missing"))  # a missing file: nothing, no error
    assert path.read_bytes() == b"x" * 100_000


def test_writer_starts_write_back_every_16_mib(tmp_path, monkeypatch):
    kicks = []
    monkeypatch.setattr(rawio, "start_writeback", kicks.append)
    rows = np.random.default_rng(1).normal(size=(96, 1 << 16)).astype(np.float32)  # 256 KiB a row, 24 MiB
    out = write_file(tmp_path / "big.h5", {"wide": rows}, chunk_rows=16, batch=16)  # 4 MiB a store
    assert kicks == [out + ".partial"] * (96 * (1 << 18) // rawio.WRITEBACK_BYTES)
    kicks.clear()
    write_file(tmp_path / "small.h5", make_layers(200), chunk_rows=8, batch=8)  # a few KiB: never
    assert kicks == []
