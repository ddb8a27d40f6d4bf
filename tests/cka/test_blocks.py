"""Only the requested blocks: hsic1_matrix(blocks=...) and MinibatchCKA(blocks=...) against the float64
reference and against the all-pairs computation (equal up to float64 rounding: the block products sum in
another order than the product of all layers), NaN where nothing is computed, jackknife and merge alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cka_offline.cka import MinibatchCKA, gram_linear
from cka_offline.cka.hsic import hsic1_matrix

from . import reference as ref
from .conftest import as_lib, relu_chain

M = 32
#: 7 stacked layers of three "files" of 3, 2 and 2 layers: each file against every later one
SIZES = (3, 2, 2)
BLOCKS = [((0, 3), (3, 7)), ((3, 5), (5, 7))]


def _layers(n: int = 256) -> list[np.ndarray]:
    a, b = relu_chain(n, seed=0), relu_chain(n, seed=1)
    return [a[0], a[1], a[2], b[1], b[3], a[3], b[4]]  # related and unrelated layers across the "files"


def _computed() -> np.ndarray:
    """Written from SIZES (not from BLOCKS): the cross-file entries and the diagonal."""
    owner = np.repeat(np.arange(len(SIZES)), SIZES)
    return (owner[:, None] != owner[None, :]) | np.eye(len(owner), dtype=bool)


def _grams(layers: list[np.ndarray], rows: slice, lib: str = "numpy"):
    grams = [gram_linear(as_lib(lib, x[rows]), "float64") for x in layers]
    return torch.stack(grams) if lib == "torch" else np.stack(grams)


def test_hsic_blocks_match_the_reference_and_all_pairs(lib):
    layers = _layers()
    grams = _grams(layers, slice(0, M), lib)
    got = np.asarray(hsic1_matrix(grams, blocks=BLOCKS))
    every = np.asarray(hsic1_matrix(grams))
    computed = _computed()
    assert np.isnan(got[~computed]).all() and np.isfinite(got[computed]).all()
    want = np.array([[ref.hsic1(np.asarray(gi), np.asarray(gj)) for gj in grams] for gi in grams])
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[computed], want[computed], rtol=0, atol=1e-12 * scale)
    # the same entries as all pairs up to float64 rounding (a few ulps of the largest term)
    np.testing.assert_allclose(got[computed], every[computed], rtol=0, atol=1e-14 * scale)
    np.testing.assert_array_equal(got, got.T)


def _accumulate(layers, blocks, lib="numpy", n_groups=4) -> MinibatchCKA:
    acc = MinibatchCKA(n_layers=len(layers), n_groups=n_groups, blocks=blocks)
    for b, start in enumerate(range(0, layers[0].shape[0], M)):
        acc.update(_grams(layers, slice(start, start + M), lib), batch_index=b)
    return acc


def test_accumulator_blocks_equal_all_pairs_and_the_jackknife_reference(lib):
    layers = _layers()
    part, every = _accumulate(layers, BLOCKS, lib), _accumulate(layers, None, lib)
    computed = _computed()
    np.testing.assert_array_equal(part.computed, computed)
    s_part, s_all = part.compute_stats(), every.compute_stats()
    for name in ("cka", "se", "low", "high"):
        got, want = getattr(s_part, name), getattr(s_all, name)
        assert np.isnan(got[~computed]).all(), name  # not computed: NaN, never 0
        np.testing.assert_allclose(got[computed], want[computed], rtol=0, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(part.compute(), s_part.cka)
    assert s_part.n_groups == s_all.n_groups == 4 and s_part.degenerate_layers == []
    # one cross-file entry against the reference jackknife over the per-group sums
    i, j = 1, 4
    per_group = []
    for g in range(4):
        sums = np.zeros(3)
        for b, start in enumerate(range(0, 256, M)):
            if b % 4 == g:
                ki = ref.linear_gram(layers[i][start : start + M])
                kj = ref.linear_gram(layers[j][start : start + M])
                sums += [ref.hsic1(ki, kj), ref.hsic1(ki, ki), ref.hsic1(kj, kj)]
        per_group.append(tuple(sums))
    theta, se = ref.jackknife(per_group)
    assert s_part.cka[i, j] == pytest.approx(theta, abs=1e-12) and s_part.se[i, j] == pytest.approx(se, abs=1e-12)


def test_uncomputed_sums_stay_zero_so_state_sums_and_merges_alike():
    """What the all-reduce of a distributed run sums: the state of two halves equals one pass."""
    layers = _layers()
    whole = _accumulate(layers, BLOCKS)
    assert not whole.hsic_sum[:, ~_computed()].any()
    first = MinibatchCKA(len(layers), 4, blocks=BLOCKS)
    second = MinibatchCKA(len(layers), 4, blocks=BLOCKS)
    for b, start in enumerate(range(0, 256, M)):
        (first if b < 4 else second).update(_grams(layers, slice(start, start + M)), batch_index=b)
    summed = {k: first.state_dict()[k] + second.state_dict()[k] for k in first.state_dict()}
    loaded = MinibatchCKA(len(layers), 4, blocks=BLOCKS)
    loaded.load_state_dict(summed)
    np.testing.assert_allclose(loaded.compute(), whole.compute(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(first.merge(second).compute_stats().se, whole.compute_stats().se, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"cannot merge MinibatchCKA\(n_layers=7, n_groups=4\) into .*blocks"):
        MinibatchCKA(len(layers), 4, blocks=BLOCKS).merge(MinibatchCKA(len(layers), 4))


def test_nan_activations_in_a_computed_entry_are_still_refused():
    from cka_offline.errors import ActivationValueError

    layers = _layers(64)
    grams = _grams(layers, slice(0, M))
    grams[4, 0, 1] = grams[4, 1, 0] = math.nan
    acc = MinibatchCKA(len(layers), 2, blocks=BLOCKS)
    with pytest.raises(ActivationValueError, match=r"layer indices \[.*4.*\]"):
        acc.update(grams, batch_index=0)
    assert int(acc.n_batches.sum()) == 0 and not acc.hsic_sum.any()


@pytest.mark.parametrize(
    "blocks, match",
    [
        ([((0, 3), (3, 9))], r"not within 0\.\.7 layers"),
        ([((2, 2), (3, 4))], "non-empty"),
        ([(0, 3)], r"must be \(\(r0, r1\), \(c0, c1\)\)"),
    ],
)
def test_bad_blocks(blocks, match):
    with pytest.raises(ValueError, match=match):
        MinibatchCKA(7, 2, blocks=blocks)
