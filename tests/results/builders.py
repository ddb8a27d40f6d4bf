"""A small CKAResult for the results tests, and a comparison of two results."""

from __future__ import annotations

import numpy as np

from cka_offline.results import CKAResult, FileInfo


def make_result(layers_a=("conv1", "layer/1.relu", "fc"), layers_b=("c1", "c2", "c3"), seed=0) -> CKAResult:
    """Two files of three layers; layer 1 of A is constant (NaN row and column)."""
    rng = np.random.default_rng(seed)
    size = len(layers_a) + len(layers_b)
    cka = rng.uniform(0.1, 0.9, size=(size, size))
    cka = (cka + cka.T) / 2
    np.fill_diagonal(cka, 1.0)
    se = np.full((size, size), 0.01)
    cka[1, :] = cka[:, 1] = np.nan  # a constant layer
    se[1, :] = se[:, 1] = np.nan
    files = [
        FileInfo(
            "a.h5",
            ["/data/a.h5"],
            list(layers_a),
            {"model": "/models/resnet_a.onnx", "framework": "onnx"},
            ["0" * 64],
            100,
        ),
        FileInfo("b.h5", ["/data/b.h5"], list(layers_b), {"model": "resnet_b"}, ["1" * 64], 120),
    ]
    return CKAResult(
        files=files,
        cka=cka,
        se=se,
        low=cka - 0.02,
        high=cka + 0.02,
        pairs=[(0, 1)],
        params={
            "batch_size": 32,
            "epochs": 1,
            "seed": 0,
            "kernel": "linear",
            "estimator": "minibatch",
            "bandwidths": None,
            "ratio": float("nan"),
        },
        n_examples=100,
        n_minibatches=4,
        timing={"total": 1.5},
        warnings=["layer 'layer/1.relu' of a.h5 is constant"],
        version="0.1.0",
    )


def assert_same(r1: CKAResult, r2: CKAResult, *, metadata: bool = True) -> None:
    """The same numbers, files, layers and pairs (and, with ``metadata``, everything else)."""
    for name in ("cka", "se", "low", "high"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name))
    assert [f.label for f in r1.files] == [f.label for f in r2.files]
    assert [f.layers for f in r1.files] == [f.layers for f in r2.files]
    assert r1.pairs == r2.pairs
    if metadata:
        assert r1.files == r2.files
        assert r1.warnings == r2.warnings and r1.version == r2.version and r1.timing == r2.timing
        assert r1.n_examples == r2.n_examples and r1.n_minibatches == r2.n_minibatches
        assert r1.confidence == r2.confidence
        assert r1.params["batch_size"] == r2.params["batch_size"]
