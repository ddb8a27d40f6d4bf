"""The terminal summary: best matches, layer identification, many pairs and NaN rows."""

from __future__ import annotations

import numpy as np

from cka_offline.results import CKAResult, FileInfo, layer_identification

from .builders import make_result


def test_summary_best_match_and_layer_identification():
    names = ["l0", "l1", "l2", "l3"]
    block = np.array(
        [
            [0.9, 0.2, 0.1, 0.0],
            [0.3, 0.4, 0.8, 0.1],  # best at depth 2: within one, not same
            [0.1, 0.2, 0.7, 0.3],
            [0.9, 0.1, 0.2, 0.3],
        ],  # best at depth 0: neither
    )
    size = 8
    cka = np.eye(size)
    cka[:4, 4:] = block
    cka[4:, :4] = block.T
    files = [FileInfo("a.h5", layers=names, provenance={"model": "net_a"}), FileInfo("b.h5", layers=list(names))]
    r = CKAResult(
        files=files,
        cka=cka,
        se=np.zeros((size, size)),
        low=cka - 0.05,
        high=cka + 0.05,
        pairs=[(0, 1)],
        params={"kernel": "linear", "estimator": "minibatch", "batch_size": 8, "epochs": 1, "seed": 0},
        n_examples=40,
        n_minibatches=5,
    )
    assert layer_identification(r.pair(0, 1)) == (2, 3, 4)
    text = r.summary()
    assert "A = a.h5 (net_a)" in text and "B = b.h5" in text
    assert "l1          l2                0.800  [0.750, 0.850]" in text
    assert "2/4 layers of A match the B layer at the same depth, 3/4 within one layer" in text
    assert "5 minibatches of 8 examples (batch size 8)" in text
    assert layer_identification(r.pair(0, 0)) is None  # a file against itself


def test_summary_many_pairs_and_nan_rows():
    r = make_result()
    text = r.summary()
    assert "layer/1.relu" in text and "undefined: constant layer" in text
    assert "warnings:\n  - layer 'layer/1.relu' of a.h5 is constant" in text
    assert "1/2 layers of A" not in text  # the NaN row is left out: 2 defined layers
    files = [FileInfo(f"c{k}.h5", layers=["x", "y"]) for k in range(4)]
    size = 8
    many = CKAResult(
        files=files,
        cka=np.eye(size),
        se=np.zeros((size, size)),
        low=np.eye(size),
        high=np.eye(size),
        pairs=[(i, j) for i in range(4) for j in range(i + 1, 4)],
    )
    text = many.summary(max_detailed_pairs=2)
    assert text.count("A = ") == 2
    assert "c1.h5 vs c3.h5: 0.000; 1/2 same depth, 2/2 within one" in text


def test_summary_keeps_the_part_of_long_names_that_differs():
    names = [f"transformer.encoder.layer_{k}.attention.output" for k in range(1, 13)]
    size = 24
    cka = np.eye(size)
    block = np.eye(12) * 0.5 + 0.25  # each layer of A matches the B layer at its depth
    cka[:12, 12:] = block
    cka[12:, :12] = block.T
    files = [FileInfo("a.h5", layers=names), FileInfo("b.h5", layers=list(names))]
    r = CKAResult(files=files, cka=cka, se=np.zeros((size, size)), low=cka, high=cka, pairs=[(0, 1)])
    rows = [line.split() for line in r.summary().splitlines() if line.startswith("  …layer_")]
    assert [row[:2] for row in rows] == [[f"…layer_{k}.attention.output"] * 2 for k in range(1, 13)]


def test_display_names():
    from cka_offline.results.summary import display_names

    names = [f"transformer.encoder.layer_{k}.attention.output" for k in (1, 2, 12)]
    assert display_names(names, 40) == [
        "…layer_1.attention.output",
        "…layer_2.attention.output",
        "…layer_12.attention.output",
    ]
    assert display_names(names, 16) == ["…layer_1.attent…", "…layer_2.attent…", "…layer_12.atten…"]
    onnx = [f"/encoder/layer.{k}/attention/output/MatMul_output_0" for k in (0, 1)]
    assert display_names(onnx, 32) == ["…0/attention/output/MatMul_outp…", "…1/attention/output/MatMul_outp…"]
    assert display_names(["conv1", "fc"]) == ["conv1", "fc"]  # short names stay as they are
    assert display_names(["x" * 80]) == ["x" * 15 + "…" + "x" * 16]  # one name: cut in the middle
