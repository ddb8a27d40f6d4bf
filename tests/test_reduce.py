"""Reductions against plain float64 loops."""

from __future__ import annotations

import numpy as np
import pytest

from cka_offline.errors import InputError, LayerSelectionError
from cka_offline.reduce import reduce, reduced_features, resolve_reductions

RNG = np.random.default_rng(2)


def test_flatten_mean_none():
    x = RNG.normal(size=(3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(reduce("l", "flatten", x), x.reshape(3, 120))
    ref = np.array([[x[b, c].astype(np.float64).mean() for c in range(4)] for b in range(3)])
    # float32 input: one float32 matrix-vector product: error a few float32 ulps of the mean |value|
    got = reduce("l", "mean", x)
    assert got.dtype == np.float32
    scale = np.abs(x.astype(np.float64)).mean(axis=(2, 3))
    assert np.all(np.abs(got - ref) <= 1e-6 * scale)
    np.testing.assert_allclose(reduce("l", "mean", x.astype(np.float64)), ref, rtol=1e-12)  # float64: exact
    np.testing.assert_allclose(
        reduce("l", "mean", x.astype(np.float16)),
        [[x[b, c].astype(np.float16).astype(np.float64).mean() for c in range(4)] for b in range(3)],
        rtol=1e-6,
    )
    big = np.maximum(RNG.normal(size=(8, 16, 32, 32)) + 0.5, 0).astype(np.float32)  # 1024 positions, ReLU-like
    want = big.astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(reduce("l", "mean", big), want, rtol=1e-6)  # a few float32 ulps
    y = RNG.normal(size=(3, 7))
    np.testing.assert_array_equal(reduce("l", "none", y), y)
    assert reduced_features("l", "flatten", (4, 5, 6)) == 120
    assert reduced_features("l", "mean", (4, 5, 6)) == 4
    assert reduced_features("l", "token_mean", (9, 8)) == 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_reductions_skip_padding(side):
    b, t, f = 6, 7, 5
    x = RNG.normal(size=(b, t, f)).astype(np.float32)
    lengths = [1, 7, 3, 4, 2, 6]
    mask = np.zeros((b, t), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    if side == "left":
        mask = mask[:, ::-1].copy()
    tokens = [np.flatnonzero(mask[i]) for i in range(b)]
    ref_mean = np.stack([x[i, tokens[i]].astype(np.float64).sum(axis=0) / len(tokens[i]) for i in range(b)])
    np.testing.assert_allclose(reduce("h", "token_mean", x, mask), ref_mean, rtol=1e-12)
    np.testing.assert_array_equal(reduce("h", "first_token", x, mask), np.stack([x[i, tokens[i][0]] for i in range(b)]))
    np.testing.assert_array_equal(reduce("h", "last_token", x, mask), np.stack([x[i, tokens[i][-1]] for i in range(b)]))


def test_token_reductions_without_mask():
    x = RNG.normal(size=(2, 3, 4))
    np.testing.assert_allclose(reduce("h", "token_mean", x), x.mean(axis=1))
    np.testing.assert_array_equal(reduce("h", "first_token", x), x[:, 0])
    np.testing.assert_array_equal(reduce("h", "last_token", x), x[:, -1])


def test_shape_errors_name_the_layer():
    with pytest.raises(
        LayerSelectionError,
        match="'mean' needs a \\(batch, channels, \\*spatial\\) output, but layer 'fc'.*--reduction 'fc=none'",
    ):
        reduce("fc", "mean", np.zeros((2, 3)))
    with pytest.raises(
        LayerSelectionError, match="'token_mean' needs a \\(batch, tokens, features\\) output, but layer 'conv'"
    ):
        reduced_features("conv", "token_mean", (3, 4, 4))
    with pytest.raises(LayerSelectionError, match="'none' needs a \\(batch, features\\) output, but layer 'seq'"):
        reduce("seq", "none", np.zeros((2, 3, 4)))
    with pytest.raises(LayerSelectionError, match="unknown reduction 'max'"):
        reduce("x", "max", np.zeros((2, 3)))


def test_mask_errors():
    x = np.zeros((2, 3, 4))
    with pytest.raises(InputError, match="mask has shape \\(2, 4\\).*expected mask shape \\(2, 3\\)"):
        reduce("h", "token_mean", x, np.ones((2, 4)))
    with pytest.raises(InputError, match="no token of example id 'b' as real"):
        reduce("h", "last_token", x, np.array([[1, 0, 0], [0, 0, 0]]), ids=["a", "b"])
    with pytest.raises(InputError, match="no token of batch row 0"):
        reduce("h", "token_mean", x, np.zeros((2, 3)))


def test_resolve_reductions():
    layers = ["enc.0", "enc.1", "head"]
    assert resolve_reductions("mean", layers) == dict.fromkeys(layers, "mean")
    assert resolve_reductions({"enc.*": "token_mean", "head": "none"}, layers) == {
        "enc.0": "token_mean",
        "enc.1": "token_mean",
        "head": "none",
    }
    assert resolve_reductions({"head": "none"}, layers)["enc.0"] == "flatten"
    assert resolve_reductions({"enc.1": "mean", "*": "none"}, layers) == {
        "enc.0": "none",
        "enc.1": "mean",
        "head": "none",
    }
    with pytest.raises(LayerSelectionError, match="reduction given for 'dec.\\*', which matches no selected layer"):
        resolve_reductions({"dec.*": "mean"}, layers)
    with pytest.raises(LayerSelectionError, match="unknown reduction 'avg'"):
        resolve_reductions({"head": "avg"}, layers)
