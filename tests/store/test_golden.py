"""Every release must read the golden files of every earlier format version, unchanged."""

import os

import numpy as np

from cka_offline.store.reader import open_activations

from ..data import make_golden

GOLDEN = os.path.join(os.path.dirname(make_golden.__file__), "golden_v1_0.h5")


def test_golden_v1_0_reads_with_the_values_it_was_written_with():
    with open_activations(GOLDEN) as f:
        assert f.version == (1, 0)
        assert f.n_examples == make_golden.N
        assert list(f.ids) == [f"ex-{k:03d}" for k in range(make_golden.N)]
        assert f.layer_names == [make_golden.CONV, "head"]
        conv = f.layer(make_golden.CONV)
        assert (conv.reduction, conv.original_shape, conv.features, conv.dtype) == ("mean", (6, 2, 2), 6, "float32")
        expected = make_golden.golden_rows()
        for name, rows in expected.items():
            np.testing.assert_array_equal(f.read(name, 0, make_golden.N), rows.astype(np.float32))
        assert f.provenance["extractor"] == "golden"
        assert f.provenance["extra"] == {"note": "golden file of format 1.0"}
        assert f.chunk_rows == 8
    assert [f.layer(n).alias for n in f.layer_names] == ["", ""]  # 1.0 has no aliases: read as ""


GOLDEN_V1_1 = os.path.join(os.path.dirname(make_golden.__file__), "golden_v1_1.h5")


def test_golden_v1_1_reads_its_values_and_the_alias_of_its_first_layer():
    with open_activations(GOLDEN_V1_1) as f:
        assert f.version == (1, 1)
        assert f.layer_names == [make_golden.CONV, "head"]
        assert f.layer(make_golden.CONV).alias == "block.conv.0"  # written by make_golden_v1_1.py
        assert f.layer("head").alias == ""  # no attribute: no alias
        for name, rows in make_golden.golden_rows().items():
            np.testing.assert_array_equal(f.read(name, 0, make_golden.N), rows.astype(np.float32))
        assert f.provenance["extractor"] == "golden"


GOLDEN_V1_2 = os.path.join(os.path.dirname(make_golden.__file__), "golden_v1_2.h5")


def test_golden_v1_2_reads_and_its_checksums_are_the_crc32_of_each_chunk():
    """1.2 adds /checksums: entry [c, k] is zlib.crc32 of chunk c's rows of layer k as stored (float32 bytes);
    computed here from the formula values, not by the writer."""
    import zlib

    import h5py

    with open_activations(GOLDEN_V1_2) as f:
        assert f.version == (1, 2) and f.chunk_rows == 8
        assert f.layer(make_golden.CONV).alias == "block.conv.0"
        for name, rows in make_golden.golden_rows().items():
            np.testing.assert_array_equal(f.read(name, 0, make_golden.N), rows.astype(np.float32))
    rows = list(make_golden.golden_rows().values())  # in layer order: L0000, L0001
    expected = [[zlib.crc32(r[c : c + 8].astype("<f4").tobytes()) for r in rows] for c in range(0, make_golden.N, 8)]
    with h5py.File(GOLDEN_V1_2, "r") as h:
        assert h["checksums"].dtype == np.uint32 and h["checksums"][()].tolist() == expected
