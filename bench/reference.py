"""Float64 reference of minibatch CKA, written from the formulas (independent of cka_offline.cka).

For minibatches ``b`` (lists of row positions) and layers ``i``:

    Xc   = X_b,i - mean over the minibatch's rows          (float64; HSIC_1 is shift invariant)
    K~   = Xc Xc^T with the diagonal set to 0              (m x m)
    HSIC_1(K, L) = [ tr(K~ L~) + (1'K~1)(1'L~1) / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1 ] / (m(m-3))
    CKA_ij = sum_b HSIC_1(K_bi, K_bj) / sqrt(sum_b HSIC_1(K_bi, K_bi) * sum_b HSIC_1(K_bj, K_bj))

(Song et al. 2012, eq. 5; Nguyen, Raghu & Kornblith 2021.) The products are float64 matmuls; they go through
torch's BLAS when torch is importable because numpy's BLAS on the benchmark machine is throttled by its
OPENBLAS settings (4 GFLOP/s); pass ``use_torch=False`` for pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RowsFn = Callable[[np.ndarray], Sequence[np.ndarray]]


def _matmul_t(use_torch: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if use_torch:
        try:
            import torch

            return lambda a, b: (torch.from_numpy(a) @ torch.from_numpy(b).T).numpy()
        except ImportError:
            pass
    return lambda a, b: a @ b.T


def hsic1_matrix(grams: np.ndarray, mm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(L, m, m) float64 Grams -> (L, L) unbiased HSIC_1 of every pair (the diagonal of each Gram is ignored)."""
    mm = mm or (lambda a, b: a @ b.T)
    n_layers, m, _ = grams.shape
    kt = grams.copy()
    idx = np.arange(m)
    kt[:, idx, idx] = 0.0
    flat = kt.reshape(n_layers, m * m)
    trace = mm(flat, flat)  # tr(K~ L~) = sum(K~ * L~) for symmetric Grams
    total = flat.sum(axis=1)
    rows = kt.sum(axis=2)  # K~ 1
    cross = mm(rows, rows)  # 1'K~L~1 = (K~1)'(L~1)
    return (trace + np.outer(total, total) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * cross) / (m * (m - 3))


def minibatch_cka(rows: RowsFn, n_layers: int, batches: Sequence[np.ndarray], *, use_torch: bool = True) -> np.ndarray:
    """(L, L) float64 minibatch CKA of the layers ``rows(positions)`` returns, over ``batches``.

    ``rows(positions)`` gives one (len(positions), d_i) array per layer (any float dtype). NaN where a layer's
    self-HSIC sum is 0 (constant layer).
    """
    mm = _matmul_t(use_torch)
    total = np.zeros((n_layers, n_layers))
    for positions in batches:
        arrays = rows(np.asarray(positions))
        m = len(positions)
        grams = np.empty((n_layers, m, m))
        for i, x in enumerate(arrays):
            x = np.asarray(x, dtype=np.float64)
            xc = x - x.mean(axis=0, keepdims=True)
            grams[i] = mm(xc, xc)
        total += hsic1_matrix(grams, mm)
    diag = np.diag(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / np.sqrt(np.outer(diag, diag))
    bad = diag <= 0
    out[bad, :] = np.nan
    out[:, bad] = np.nan
    return out


def npy_rows(paths: Sequence[str]) -> RowsFn:
    """Row reader over per-layer ``.npy`` files (memory-mapped)."""
    arrays = [np.load(p, mmap_mode="r") for p in paths]

    def rows(positions: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(positions, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return [np.asarray(a[positions[order]])[inverse] for a in arrays]

    return rows


def h5_rows(paths: Sequence[str]) -> tuple[RowsFn, int]:
    """Row reader over activation files (all layers of all files, stacked in order) and the layer count."""
    from cka_offline.store.reader import open_activations

    files = [open_activations(p) for p in paths]
    names = [(f, name) for f in files for name in f.layer_names]

    def rows(positions: np.ndarray) -> list[np.ndarray]:
        return [f.read_rows(name, positions) for f, name in names]

    return rows, len(names)
