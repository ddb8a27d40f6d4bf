"""/checksums (format 1.2): each chunk's CRC-32 per layer, as zlib.crc32 of the stored rows' bytes, whether
the rows came in small batches (CRCs continued across batches, inline) or in stores of several MiB (computed
on the writer's CRC thread beside the writes), for every stored dtype and compression."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from cka_offline.store import writer as writer_module
from cka_offline.store.writer import ActivationWriter, LayerSpec


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("batch", [7, 300])
def test_checksums_are_the_crc32_of_each_chunk(tmp_path, dtype, compression, batch):
    rng = np.random.default_rng(0)
    n, chunk = 300, 64
    rows = {"wide": rng.standard_normal((n, 4096)), "narrow": rng.standard_normal((n, 3))}
    path = tmp_path / "a.h5"
    specs = [LayerSpec(name, (v.shape[1],), "flatten", v.shape[1]) for name, v in rows.items()]
    with ActivationWriter(
        path, ids=np.arange(n), layers=specs, provenance={}, dtype=dtype, chunk_rows=chunk, compression=compression
    ) as w:
        for start in range(0, n, batch):
            w.write({name: v[start : start + batch] for name, v in rows.items()})
    stored = [v.astype(dtype) for v in rows.values()]
    expected = [
        [zlib.crc32(np.ascontiguousarray(s[c : c + chunk]).tobytes()) for s in stored] for c in range(0, n, chunk)
    ]
    with h5py.File(path, "r") as h:
        assert h["checksums"][()].tolist() == expected


def test_large_stores_use_the_crc_thread_and_small_ones_do_not(tmp_path, monkeypatch):
    """The thread is only worth its hand-over for stores of CRC_THREAD_BYTES or more (300 rows x 4096
    float32 = 4.7 MiB here); it ends with the writer."""
    threads = []
    original = writer_module.ThreadPoolExecutor

    def counting(*args, **kwargs):
        threads.append(original(*args, **kwargs))
        return threads[-1]

    monkeypatch.setattr(writer_module, "ThreadPoolExecutor", counting)
    x = np.ones((300, 4096), dtype=np.float32)
    for batch, made in ((10, 0), (300, 1)):
        threads.clear()
        with ActivationWriter(
            tmp_path / f"b{batch}.h5",
            ids=np.arange(300),
            layers=[LayerSpec("x", (4096,), "flatten", 4096)],
            provenance={},
        ) as w:
            for start in range(0, 300, batch):
                w.write({"x": x[start : start + batch]})
        assert len(threads) == made
        assert all(t._shutdown for t in threads)


def test_the_checksum_example_in_docs_format_runs(tmp_path, monkeypatch):
    """The h5py example of docs/format.md's /checksums section, run on the 1.2 golden file."""
    import os
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    doc = open(os.path.join(root, "docs", "format.md"), encoding="utf-8").read()
    code = doc.split("## `/checksums`", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(os.path.join(root, "tests", "data", "golden_v1_2.h5"), tmp_path / "acts.h5")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/format.md", "exec"), {})
