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
