"""Small activation files for the analyze / results / plot / CLI tests, and the stacked-layer reference.

The reference math is tests/cka/reference.py (plain numpy float64 from the formulas, sharing nothing with
``cka_offline.cka``); :func:`ref_minibatch` adds the grouped jackknife over stacked layers that analyze reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cka_offline.analysis import MinibatchPlan
from cka_offline.analysis.plan import canonical_order

from .activation_files import write_acts
from .cka import reference

__all__ = [
    "chain_activations",
    "not_computed",
    "plan_of",
    "ref_full_linear",
    "ref_hsic1",
    "ref_minibatch",
    "write_acts",
]


def chain_activations(
    n: int, widths: Sequence[int] = (6, 5, 4), seed: int = 0, d_in: int = 7, input_seed: int = 1234
) -> dict[str, np.ndarray]:
    """Activations of a random linear+ReLU chain (weights from ``seed``) on the same Gaussian inputs (from
    ``input_seed``): ``{"layer<k>": (n, width_k) float32}``."""
    h = np.random.default_rng(input_seed).normal(size=(n, d_in))
    rng = np.random.default_rng(seed)
    out = {}
    for k, width in enumerate(widths):
        w = rng.normal(size=(h.shape[1], width)) / math.sqrt(h.shape[1])
        h = np.maximum(h @ w + 0.1 * rng.normal(size=width), 0.0)
        out[f"layer{k}"] = h.astype(np.float32)
    return out


# ---------------------------------------------------------------- reference math
# The formulas live once, in tests/cka/reference.py; this adds the stacked-layer jackknife analyze reports.
ref_hsic1 = reference.hsic1
ref_full_linear = reference.cka_biased


def ref_minibatch(
    layers: Sequence[np.ndarray],
    batches: Sequence[np.ndarray],
    n_groups: int = 16,
    sigmas: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(CKA, jackknife SE) over the stacked ``layers`` (each (n, d)) for the given minibatches of row indices.

    CKA_ij = sum_b H_ij,b / sqrt(sum_b H_ii,b sum_b H_jj,b); the SE is the grouped leave-one-group-out
    jackknife over the groups ``groups[b]`` (default b % n_groups)."""
    size = len(layers)
    if groups is not None:
        n_groups = max(n_groups, max(groups) + 1)
    sums = np.zeros((n_groups, size, size))
    for b, rows in enumerate(batches):
        group = b % n_groups if groups is None else groups[b]
        grams = [
            reference.linear_gram(x[rows]) if sigmas is None else reference.rbf_gram(x[rows], sigmas[i])
            for i, x in enumerate(layers)
        ]
        for i in range(size):
            for j in range(size):
                sums[group, i, j] += ref_hsic1(grams[i], grams[j])

    def cka(h: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.diag(h))
        return h / np.outer(d, d)

    total = sums.sum(0)
    used = [g for g in range(n_groups) if np.any(sums[g])]
    g = len(used)
    if g < 2:
        return cka(total), np.full((size, size), np.nan)
    loo = np.stack([cka(total - sums[g_]) for g_ in used])
    se = np.sqrt((g - 1) / g * ((loo - loo.mean(0)) ** 2).sum(0))
    return cka(total), se


def not_computed(sizes: Sequence[int], all_pairs: bool = False) -> np.ndarray:
    """``(L, L)`` bool: the entries a minibatch analysis of files of ``sizes`` layers leaves uncomputed (NaN):
    the off-diagonal entries of each file's own block, for two or more files without ``all_pairs``."""
    total = sum(sizes)
    mask = np.zeros((total, total), dtype=bool)
    if all_pairs or len(sizes) < 2:
        return mask
    start = 0
    for size in sizes:
        mask[start : start + size, start : start + size] = ~np.eye(size, dtype=bool)
        start += size
    return mask


def plan_of(result, ids=None):
    """The MinibatchPlan a result used, rebuilt from its recorded parameters (``ids``: the aligned ids,
    which fix the ranks; default 0..n-1, as the test files hold)."""
    p = result.params
    ids = np.arange(result.n_examples) if ids is None else ids
    return MinibatchPlan(
        result.n_examples,
        p["batch_size"],
        seed=p["seed"],
        epochs=p["epochs"],
        n_groups=p["n_groups"],
        shuffle=p["shuffle"],
        block_rows=p.get("block_rows", 1024),
        buffer_blocks=p.get("buffer_blocks", 8),
        canonical=canonical_order(ids),
    )
