"""Reductions against plain float64 loops."""

from __future__ import annotations

import numpy as np
import pytest

from cka_offline.errors import InputError, LayerSelectionError
from cka_offline.extractor import LayerInfo
from cka_offline.reduce import concrete_reduction, reduce, reduced_features, resolve_reductions

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


def test_mean_of_a_vector_keeps_it_and_of_a_2d_output_follows_the_layout():
    fc = RNG.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(reduce("fc", "mean", fc), fc)  # no positions: kept as it is
    assert reduced_features("fc", "mean", (6,)) == 6 and concrete_reduction("fc", "mean", (6,)) == "none"
    x = RNG.normal(size=(3, 5, 7))  # (B, 5, 7) read two ways, each against a float64 loop
    conv1d = np.array([[x[b, c].sum() / 7 for c in range(5)] for b in range(3)])
    tokens = np.array([[sum(x[b, t, d] for t in range(5)) / 5 for d in range(7)] for b in range(3)])
    np.testing.assert_allclose(reduce("c", "mean", x, layout="channels_first"), conv1d, rtol=1e-12)
    np.testing.assert_allclose(reduce("t", "mean", x, layout="tokens_first"), tokens, rtol=1e-12)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # tokens-first: padding is skipped
    masked = np.stack([x[b][mask[b] == 1].sum(axis=0) / mask[b].sum() for b in range(3)])
    np.testing.assert_allclose(reduce("t", "mean", x, mask, layout="tokens_first"), masked, rtol=1e-12)
    assert [concrete_reduction("l", "mean", (5, 7), lay) for lay in ("channels_first", "tokens_first")] == [
        "mean",
        "token_mean",
    ]
    assert reduced_features("t", "mean", (5, 7), "tokens_first") == 7
    assert reduced_features("c", "mean", (5, 7), "channels_first") == 5
    assert concrete_reduction("l", "mean", (2, 3, 4), "tokens_first") == "mean"  # 3-D maps stay channels first
    assert concrete_reduction("l", "flatten", (5, 7)) == "flatten"
    with pytest.raises(
        LayerSelectionError,
        match=r"'mean' is ambiguous for layer 'blk': its per-example shape \(5, 7\) may be \(channels, length\) "
        r"or \(tokens, features\).*--reduction 'blk=token_mean'.*--reduction 'blk=flatten'",
    ):
        reduce("blk", "mean", x)
    with pytest.raises(LayerSelectionError, match="layer 'l' reports layout 'NCHW'"):
        concrete_reduction("l", "mean", (5, 7), "NCHW")


def test_shape_errors_name_the_layer():
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


def test_reduction_patterns_match_what_layers_matches():
    infos = [
        LayerInfo("/fc/Gemm_output_0", "Gemm", aliases=("fc",)),
        LayerInfo("layer1", "Sequential"),
        LayerInfo("layer1.0.relu:1", "ReLU", group="layer1.0.relu"),
        LayerInfo("layer1.0.relu:2", "ReLU", group="layer1.0.relu"),
        LayerInfo("layer1.0.conv1", "Conv2d"),
    ]
    got = resolve_reductions({"fc": "none", "layer*": "mean", "layer1.0.relu": "flatten", "*": "token_mean"}, infos)
    assert got == {
        "/fc/Gemm_output_0": "none",  # by its alias
        "layer1": "mean",  # '*' stays within one component
        "layer1.0.relu:1": "flatten",  # the module name selects each call
        "layer1.0.relu:2": "flatten",
        "layer1.0.conv1": "token_mean",
    }
    # an exact name wins over an earlier glob; kind: works as in --layers; '**' crosses components
    assert resolve_reductions({"**": "mean", "layer1.0.relu:2": "none"}, infos)["layer1.0.relu:2"] == "none"
    assert resolve_reductions({"kind:Conv*": "mean"}, infos)["layer1.0.conv1"] == "mean"
    # plain names NAME:N of a file are calls of NAME
    assert resolve_reductions({"b": "mean"}, ["a", "b:1", "b:2"]) == {"a": "flatten", "b:1": "mean", "b:2": "mean"}
