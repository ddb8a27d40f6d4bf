"""The CPU Gram product (cka_offline.cka.products, through gram_linear and cka-analyze) against a float64
reference written here from the formula K = Xc Xc^T, Xc = X - 1 mean(X, 0): float32 noise at most, and
exactly symmetric, whatever the shape, layout, stored dtype or tile size."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cka_offline.cka import gram_linear, gram_rbf, products
from cka_offline.cka.products import symmetric_product
from cka_offline.cli.analyze import main
from cka_offline.results import load_result

from ..analyze_fixtures import chain_activations, plan_of, write_acts
from . import reference as ref


def gram64(x: np.ndarray) -> np.ndarray:
    """sum_k (x_ik - mean_k)(x_jk - mean_k), in float64, one entry at a time along the rows."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.sum(axis=0) / x.shape[0]
    m = x.shape[0]
    k = np.empty((m, m))
    for i in range(m):
        k[i] = (xc * xc[i]).sum(axis=1)
    return k


# shapes: m not a multiple of the tile, m < tile, m = 1 and 2, d = 1
SHAPES = [(1, 3), (2, 1), (7, 1), (37, 5), (64, 9), (65, 16), (130, 3), (200, 70)]
TILES = [None, 1, 16, 64, 500]


def check(gram: np.ndarray, want: np.ndarray, eps: float) -> None:
    assert np.array_equal(gram, gram.T), "not exactly symmetric"
    scale = max(np.abs(np.diag(want)).max(), 1e-300)
    np.testing.assert_allclose(gram, want, rtol=0, atol=eps * scale)


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("rows", TILES)
@pytest.mark.parametrize("dtype,eps", [("float32", 2e-6), ("float64", 1e-13)])
def test_product_equals_the_float64_formula_and_is_exactly_symmetric(m, d, rows, dtype, eps):
    rng = np.random.default_rng(m * 1000 + d)
    x = (rng.standard_normal((m, d)) * 3 + 1).astype(dtype)
    want = x.astype(np.float64) @ x.astype(np.float64).T  # the uncentred product, here the formula itself
    for out in (None, np.empty((m, m)), np.empty((m, m), dtype=dtype), np.empty((2, m + 3, m))[1, :m]):
        got = symmetric_product(x, out, rows=rows)
        if out is not None:
            assert got is out
        assert got.dtype == (np.dtype(dtype) if out is None else out.dtype)
        check(got, want, eps)


@pytest.mark.parametrize("rows", [None, 64])
@pytest.mark.parametrize("layout", ["C", "F", "strided", "float16"])
@pytest.mark.parametrize("gram_dtype,eps", [("float32", 2e-6), ("float64", 1e-13)])
def test_gram_linear_centres_then_multiplies(monkeypatch, rows, layout, gram_dtype, eps):
    """The engine's call (inplace, into a float64 buffer) and the plain call agree with the formula, for C,
    Fortran-ordered, non-contiguous (every other column) and float16 stored rows."""
    monkeypatch.setattr(products, "TILE_ROWS", rows)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((97, 22)) + 50.0  # a large mean: centring must come first
    x = {
        "C": base.astype(np.float32),
        "F": np.asfortranarray(base.astype(np.float32)),
        "strided": base.astype(np.float32)[:, ::2],
        "float16": base.astype(np.float16),
    }[layout]
    want = gram64(x)
    eps16 = eps if layout != "float16" else max(eps, 2e-6)
    plain = gram_linear(x.copy(), gram_dtype)
    assert plain.dtype == np.dtype(gram_dtype)
    check(plain, want, eps16 * 10)  # float32: a few units of rounding of |x|^2, scaled by the mean's 50^2
    grams = np.full((3, 97, 97), np.nan)
    scratch = x.copy() if layout != "strided" else x
    got = gram_linear(scratch, gram_dtype, inplace=True, out=grams[1])
    assert got is grams[1] or np.shares_memory(got, grams[1])
    check(grams[1], want, eps16 * 10)
    assert np.isnan(grams[0]).all() and np.isnan(grams[2]).all()  # only its own Gram was written
    if layout != "strided":  # the same numbers in the same order: the same bits (strided rows are copied first)
        np.testing.assert_array_equal(grams[1], plain)


def test_widening_scratch_is_not_shared_between_calls():
    """Float16 rows are widened into a per-thread scratch: a second call must not change the first's result."""
    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((40, 12)).astype(np.float16) for _ in range(2))
    ka = gram_linear(a, "float64", inplace=True)
    copy = ka.copy()
    kb = gram_linear(b, "float64", inplace=True)
    np.testing.assert_array_equal(ka, copy)
    check(ka, gram64(a), 1e-13)
    check(kb, gram64(b), 1e-13)


def test_rbf_still_matches_the_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((33, 6)).astype(np.float32) + 4.0
    got = gram_rbf(x, 1.7, "float64")
    assert np.array_equal(got, got.T) and np.all(np.diag(got) == 1.0)
    np.testing.assert_allclose(got, ref.rbf_gram(x, 1.7), rtol=0, atol=1e-12)


def test_bad_tile_rows_are_refused():
    x = np.ones((5, 2), dtype=np.float32)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="rows per tile"):
            symmetric_product(x, rows=bad)
    with pytest.raises(ValueError, match="shape"):
        symmetric_product(x, np.empty((4, 4)))


@pytest.mark.parametrize("rows", [None, 16])
@pytest.mark.parametrize("precision,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_cka_analyze_matches_the_float64_reference(tmp_path, monkeypatch, rows, precision, tol):
    """Through the command, with minibatches of 37 (not a multiple of the tile), float16 stored rows in one
    file: each minibatch's CKA terms from Grams written here from the formula."""
    monkeypatch.setattr(products, "TILE_ROWS", rows)
    a = chain_activations(111, seed=1)
    b = {k: v.astype(np.float16) for k, v in chain_activations(111, widths=(9, 2), seed=2).items()}
    pa, pb = write_acts(tmp_path / "a.h5", a), write_acts(tmp_path / "b.h5", b, model="other")
    out = tmp_path / "r.json"
    args = [pa, pb, "-m", "37", "--seed", "4", "--precision", precision, "--device", "cpu", "-o", out, "--quiet"]
    res = CliRunner().invoke(main, [str(v) for v in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = load_result(out)
    batches = plan_of(r).minibatches()  # the plan rebuilt from the recorded parameters
    assert sorted(len(x) for x in batches)[0] >= 37 and r.n_minibatches == len(batches)
    layers = [*a.values(), *b.values()]
    la = len(a)
    num = np.zeros((la, len(b)))
    self_a, self_b = np.zeros(la), np.zeros(len(b))
    for rows_of in batches:
        ka = [gram64(z[rows_of]) for z in layers[:la]]
        kb = [gram64(z[rows_of]) for z in layers[la:]]
        num += [[ref.hsic1(x, y) for y in kb] for x in ka]
        self_a += [ref.hsic1(x, x) for x in ka]
        self_b += [ref.hsic1(y, y) for y in kb]
    want = num / np.sqrt(np.outer(self_a, self_b))
    np.testing.assert_allclose(r.matrix(0, 1), want, rtol=0, atol=tol)
