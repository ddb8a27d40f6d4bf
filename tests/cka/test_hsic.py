"""Grams, HSIC_1 and the exact full-data estimator against the float64 numpy reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from cka_offline.cka import center_columns, cka_linear_full, gram_linear, gram_rbf, hsic1_matrix, rbf_bandwidth
from cka_offline.cka.hsic import cka_from_hsic, cka_full, full_gram, full_hsic
from cka_offline.errors import ActivationValueError, AlignmentError, InsufficientDataError, ResourceError

from . import reference as ref
from .conftest import as_lib


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


@pytest.mark.parametrize("m", [4, 5, 37])
def test_hsic1_matrix_matches_reference_every_pair(m, lib):
    rng = np.random.default_rng(m)
    layers = [rng.standard_normal((m, d)) + 2.0 for d in (3, 8, 1)] + [rng.standard_normal((m, 4)) ** 2]
    grams = [gram_linear(as_lib(lib, z), "float64") for z in layers]
    got = hsic1_matrix(torch.stack(grams) if lib == "torch" else np.stack(grams))
    got = got.numpy() if lib == "torch" else got
    want = np.array([[ref.hsic1(ref.linear_gram(a), ref.linear_gram(b)) for b in layers] for a in layers])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, got.T)


def test_numpy_grams_are_the_same_numbers_as_torch_grams(chain):
    """The two libraries run the same formulas: equal to float64 rounding, and numpy stays numpy."""
    x = chain[2][:40] + 3.0
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        k_np = gram_linear(x, dtype)
        k_t = gram_linear(t64(x), dtype)
        assert isinstance(k_np, np.ndarray) and k_np.dtype == np.dtype(dtype) and np.array_equal(k_np, k_np.T)
        np.testing.assert_allclose(k_np, k_t.numpy(), rtol=0, atol=tol * np.abs(k_np).max())
        strided = np.array(x, dtype=dtype)[:, ::2]  # not contiguous: a general product, then symmetrized
        k_s = gram_linear(strided, dtype, inplace=True)
        assert np.array_equal(k_s, k_s.T)
        np.testing.assert_allclose(
            k_s, gram_linear(t64(x[:, ::2]), dtype).numpy(), rtol=0, atol=tol * np.abs(k_s).max()
        )
        r_np, r_t = gram_rbf(x, 2.0, dtype), gram_rbf(t64(x), 2.0, dtype)
        assert isinstance(r_np, np.ndarray) and np.all(np.diag(r_np) == 1.0)
        np.testing.assert_allclose(r_np, r_t.numpy(), rtol=0, atol=tol)


def test_center_columns_inplace_overwrites_a_scratch_buffer_only_when_asked():
    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 100.0
    keep = x.copy()
    xc = center_columns(x, "float32")
    assert np.array_equal(x, keep) and np.allclose(xc, keep - keep.mean(0))
    xc = center_columns(x, "float32", inplace=True)
    assert xc is x and np.allclose(x, keep - keep.mean(0))


def test_hsic1_matrix_overwrite_uses_float64_scratch_in_place_only():
    grams = np.stack([gram_linear(np.random.default_rng(k).standard_normal((9, 4)), "float64") for k in range(3)])
    want = hsic1_matrix(grams)
    f32 = grams.astype(np.float32)
    before = f32.copy()
    np.testing.assert_allclose(hsic1_matrix(f32, overwrite=True), hsic1_matrix(before), rtol=0, atol=0)
    assert np.array_equal(f32, before)  # not float64: worked on a copy
    got = hsic1_matrix(grams, overwrite=True)
    np.testing.assert_array_equal(got, want)
    assert np.all(np.einsum("lii->li", grams) == 0.0)  # the diagonals were zeroed in place


def test_hsic1_matrix_does_not_modify_its_input():
    grams = torch.stack([gram_linear(torch.randn(6, 3, dtype=torch.float64), torch.float64) for _ in range(2)])
    before = grams.clone()
    hsic1_matrix(grams)
    assert torch.equal(grams, before)
    grams = grams.numpy().copy()
    before = grams.copy()
    hsic1_matrix(grams)
    assert np.array_equal(grams, before)


def test_gram_linear_is_the_centred_product_and_symmetric(chain, lib):
    x = chain[1][:50]
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        k = gram_linear(as_lib(lib, x.astype(np.float16 if dtype == "float32" else np.float64)), dtype)
        k = k.numpy() if lib == "torch" else k
        assert k.dtype == np.dtype(dtype)
        assert np.array_equal(k, k.T)
        xin = x.astype(np.float16).astype(np.float64) if dtype == "float32" else x
        want = ref.linear_gram(xin)
        np.testing.assert_allclose(k.astype(np.float64), want, atol=tol * np.abs(want).max())


def test_center_columns_removes_the_mean_in_float64_before_rounding(lib):
    x = 50.0 + 1e-3 * np.random.default_rng(1).standard_normal((40, 3))
    xc = center_columns(as_lib(lib, x), "float32")
    xc = xc.numpy() if lib == "torch" else xc
    assert xc.dtype == np.float32
    exact = x - x.mean(0)
    # rounding only the small centred values: relative error of float32, not of 50
    np.testing.assert_allclose(xc.astype(np.float64), exact, rtol=1e-7, atol=0)


def test_reference_hsic1_is_shift_invariant():
    """The reference centres features; check with uncentred float64 Grams on mild data that this changes nothing."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, 3)) + 0.7, rng.standard_normal((12, 5)) - 0.4
    a = ref.hsic1(ref.linear_gram(x, center=False), ref.linear_gram(y, center=False))
    b = ref.hsic1(ref.linear_gram(x), ref.linear_gram(y))
    assert a == pytest.approx(b, rel=1e-10)


def test_rbf_bandwidth_is_fraction_of_median_distance(chain, lib):
    sample = chain[2]
    for n in (40, 6):  # 780 pairs (median averages the two middle ones), 15 pairs (the middle one)
        got = rbf_bandwidth(as_lib(lib, sample[:n]), 0.7)
        assert got == pytest.approx(0.7 * ref.median_pairwise_distance(sample[:n]), rel=1e-12)


def test_gram_rbf_matches_reference(chain):
    x = chain[1][:30]
    sigma = 1.3
    want = ref.rbf_gram(x, sigma)
    got64 = gram_rbf(t64(x), sigma, torch.float64).numpy()
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-13)
    assert np.all(np.diag(got64) == 1.0)
    got32 = gram_rbf(t64(x).float(), sigma)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_full_estimator_matches_reference(chain, debiased, lib):
    x, y = chain[1][:120] + 5.0, chain[2][:120]
    want = ref.cka_debiased(x, y) if debiased else ref.cka_biased(x, y)
    got = cka_linear_full(as_lib(lib, x.astype(np.float32)), as_lib(lib, y), debiased=debiased)
    want32 = (ref.cka_debiased if debiased else ref.cka_biased)(x.astype(np.float32), y)
    assert abs(got - want32) <= 1e-10
    assert abs(cka_linear_full(as_lib(lib, x), as_lib(lib, y), debiased=debiased) - want) <= 1e-10


def test_full_biased_equals_feature_space_formula(chain):
    """Kornblith et al. 2019 eq. 5: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on centred features."""
    x, y = (z - z.mean(0) for z in (chain[0], chain[3]))
    want = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert cka_linear_full(t64(x), t64(y), debiased=False) == pytest.approx(want, rel=1e-12)


def test_full_estimator_constant_layer_is_nan_with_warning(caplog, lib):
    x = as_lib(lib, np.random.default_rng(0).standard_normal((10, 3)))
    with caplog.at_level(logging.WARNING, logger="cka_offline.cka.hsic"):
        assert math.isnan(cka_linear_full(x, as_lib(lib, np.full((10, 2), 3.0)), debiased=True))
    assert "constant layer" in caplog.text


def test_full_estimator_resource_error_says_how_to_fix():
    x = torch.randn(100, 3)
    with pytest.raises(
        ResourceError,
        match=r"n=100 .*160000 bytes.*max_bytes=1000.*minibatch CKA.*raise max_bytes"
        r".*--max-memory",
    ):
        cka_linear_full(x, x, debiased=False, max_bytes=1000)
    assert cka_linear_full(x, x, debiased=False, max_bytes=160000) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ResourceError, match=r"240000 bytes .* for 3 100x100 float64 Gram matrices.*max_bytes=239999"):
        cka_full([x, x, x], debiased=True, max_bytes=239999)


# ---------------------------------------------------------------- full data: each Gram once, all pairs at once
def _full_layers(chain: list[np.ndarray], n: int = 60) -> list[np.ndarray]:
    return [chain[0][:n] + 5.0, chain[1][:n], chain[2][:n] * 1e-3, chain[4][:n]]


SIGMAS = (3.0, 2.0, 0.004, 1.5)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_full_gram_inner_products_are_the_reference_hsic(chain, debiased, kernel, lib):
    """<HKH, HLH> = (n-1)^2 HSIC_0 and <U(K), U(L)> = n(n-3) HSIC_1 (Song et al. 2012), for every pair."""
    layers = _full_layers(chain)
    sigmas = SIGMAS if kernel == "rbf" else (None,) * len(layers)
    grams = [full_gram(as_lib(lib, z), debiased=debiased, sigma=s) for z, s in zip(layers, sigmas)]
    got = full_hsic(torch.stack(grams) if lib == "torch" else np.stack(grams), debiased=debiased)
    ref_grams = [ref.linear_gram(z, center=False) if s is None else ref.rbf_gram(z, s) for z, s in zip(layers, sigmas)]
    hsic = ref.hsic1 if debiased else ref.hsic0
    want = np.array([[hsic(k, l) for l in ref_grams] for k in ref_grams])
    assert got.dtype == np.float64 and isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    if debiased:
        assert all(np.all(np.diag(to_np(g)) == 0.0) for g in grams)
    else:  # HKH: rows and columns sum to zero
        assert max(np.abs(to_np(g).sum(0)).max() / np.abs(to_np(g)).max() for g in grams) < 1e-12


def to_np(a) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_full_matches_reference_every_pair(chain, debiased, kernel, lib):
    layers = _full_layers(chain)
    sigmas = SIGMAS if kernel == "rbf" else None
    got = cka_full([as_lib(lib, z.astype(np.float32)) for z in layers], debiased=debiased, sigmas=sigmas)
    layers32 = [z.astype(np.float32) for z in layers]
    if sigmas is None:
        pair = ref.cka_debiased if debiased else ref.cka_biased
        want = np.array([[pair(x, y) for y in layers32] for x in layers32])
    else:
        want = np.array(
            [
                [ref.cka_rbf_full(x, y, sx, sy, debiased) for y, sy in zip(layers32, sigmas)]
                for x, sx in zip(layers32, sigmas)
            ]
        )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)


def test_cka_full_rbf_is_the_minibatch_estimate_with_one_minibatch(chain):
    """Debiased full-data CKA = minibatch CKA whose one minibatch holds every example, same kernel."""
    from cka_offline.cka import MinibatchCKA

    layers = _full_layers(chain)
    acc = MinibatchCKA(n_layers=len(layers), n_groups=2)
    acc.update(np.stack([gram_rbf(z, s, "float64") for z, s in zip(layers, SIGMAS)]), batch_index=0)
    np.testing.assert_allclose(cka_full(layers, debiased=True, sigmas=SIGMAS), acc.compute_stats().cka, atol=1e-12)


def test_cka_full_constant_layer_and_nan_bandwidth_are_nan_with_warning(chain, caplog, lib):
    layers = [as_lib(lib, z) for z in (chain[1][:20], np.full((20, 3), 2.5), chain[2][:20])]
    with caplog.at_level(logging.WARNING, logger="cka_offline.cka.hsic"):
        got = cka_full(layers, debiased=True)
        got_rbf = cka_full(layers, debiased=False, sigmas=[1.0, math.nan, 1.0])
    for m in (got, got_rbf):
        assert np.all(np.isnan(m[1])) and np.all(np.isnan(m[:, 1])) and np.isfinite(m[np.ix_([0, 2], [0, 2])]).all()
    assert "constant layer" in caplog.text and "[1]" in caplog.text


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: cka_full([], debiased=True), ValueError, "at least one layer"),
        (
            lambda: cka_full([np.ones((5, 2)), np.ones((6, 2))], debiased=True),
            AlignmentError,
            "5 rows in layer 0 and 6 in layer 1",
        ),
        (
            lambda: cka_full([np.ones((5, 2))], debiased=True, sigmas=[1.0, 2.0]),
            ValueError,
            "one RBF bandwidth per layer, got 2 for 1",
        ),
        (lambda: cka_full([np.ones((3, 2))], debiased=True), InsufficientDataError, "at least 4 examples, got 3"),
        (
            lambda: cka_full([np.array([[1.0], [np.inf], [2.0], [3.0]])], debiased=True),
            ActivationValueError,
            "layer 0 holds NaN or Inf",
        ),
        (lambda: full_gram(torch.ones(3, 2), debiased=False), InsufficientDataError, "at least 4 examples, got 3"),
        (
            lambda: cka_from_hsic(np.array([[np.nan]]), np.ones(1), np.ones(1)),
            ActivationValueError,
            "HSIC terms are not finite",
        ),
    ],
)
def test_full_data_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: cka_linear_full(torch.randn(3, 2), torch.randn(3, 2), debiased=True),
            InsufficientDataError,
            "at least 4 examples, got 3",
        ),
        (
            lambda: cka_linear_full(torch.randn(5, 2), torch.randn(6, 2), debiased=True),
            AlignmentError,
            "5 rows in x and 6 in y",
        ),
        (
            lambda: cka_linear_full(torch.tensor([[math.nan], [1.0], [2.0], [3.0]]), torch.randn(4, 2), debiased=False),
            ActivationValueError,
            "NaN or Inf",
        ),
        (lambda: hsic1_matrix(torch.zeros(2, 3, 3)), InsufficientDataError, "at least 4 examples, got 3"),
        (lambda: hsic1_matrix(torch.zeros(4, 4)), ValueError, r"shape \(L, m, m\), got shape \(4, 4\)"),
        (lambda: hsic1_matrix(torch.zeros(1, 4, 5)), ValueError, r"shape \(L, m, m\)"),
        (lambda: hsic1_matrix(torch.zeros(1, 4, 4, dtype=torch.int64)), ValueError, "floating point"),
        (lambda: hsic1_matrix([[[0.0]]]), TypeError, "numpy array or torch.Tensor"),
        (lambda: hsic1_matrix(np.zeros((1, 4, 4), dtype=np.int64)), ValueError, "floating point"),
        (lambda: gram_linear([[0.0, 1.0]]), TypeError, "numpy array or torch.Tensor"),
        (lambda: gram_linear(torch.zeros(4)), ValueError, r"shape \(m, d\)"),
        (lambda: gram_linear(np.zeros(4)), ValueError, r"shape \(m, d\)"),
        (lambda: gram_linear(torch.zeros(4, 2, dtype=torch.int32)), ValueError, "floating point"),
        (lambda: gram_linear(np.zeros((4, 2), dtype=np.int32)), ValueError, "floating point"),
        (lambda: gram_linear(torch.zeros(4, 2), torch.float16), ValueError, "float32 or float64, got float16"),
        (lambda: gram_linear(np.zeros((4, 2)), "float16"), ValueError, "float32 or float64, got float16"),
        (lambda: gram_rbf(torch.zeros(4, 2), 0.0), ValueError, "sigma must be a finite number > 0"),
        (lambda: gram_rbf(torch.zeros(4, 2), math.nan), ValueError, "sigma must be a finite number > 0"),
        (lambda: rbf_bandwidth(torch.randn(5, 2), -1.0), ValueError, "fraction must be a finite number > 0"),
        (
            lambda: rbf_bandwidth(torch.randn(1, 2), 1.0),
            InsufficientDataError,
            "at least 2 sample examples to measure a distance, got 1",
        ),
        (lambda: rbf_bandwidth(torch.ones(5, 2), 1.0), InsufficientDataError, "all 5 sample examples are identical"),
        (lambda: rbf_bandwidth(torch.tensor([[0.0], [math.inf], [1.0]]), 1.0), ValueError, "NaN or Inf"),
        (lambda: rbf_bandwidth(np.array([[0.0], [math.nan], [1.0]]), 1.0), ValueError, "NaN or Inf"),
        (
            lambda: cka_linear_full(np.ones((3, 2)), np.ones((3, 2)), debiased=True),
            InsufficientDataError,
            "at least 4 examples, got 3",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
