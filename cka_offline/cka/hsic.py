"""Kernel matrices and HSIC estimators: pure array math on numpy arrays or torch tensors, no files, no printing.

Notation (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited", ICML;
Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?", ICLR, arXiv 2020;
Song et al. 2012, "Feature Selection via Dependence Maximization", JMLR):

- ``x``: activations of one layer for one minibatch, shape ``(m, d)`` (m examples, d features).
- ``K = X X^T`` (linear) or ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` (RBF), shape ``(m, m)``.
- ``K~``: ``K`` with its diagonal set to zero.
- Unbiased HSIC (Song et al. 2012, eq. 5), for ``m >= 4``::

      HSIC_1(K, L) = [ tr(K~ L~) + (1'K~1)(1'L~1) / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1 ] / (m(m-3))

- Minibatch CKA (Nguyen et al.): ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b HSIC_1(L_b, L_b))``,
  accumulated by :class:`cka_offline.cka.accumulator.MinibatchCKA` from :func:`hsic1_matrix`.

HSIC_1 of linear Grams is exactly invariant to subtracting a constant vector from every row of ``x``;
:func:`gram_linear` does so (column means of the minibatch) before the product, because a float32 Gram of
activations with a large mean (after ReLU, or shifted by +50) loses the whole signal to cancellation.

Every function takes numpy arrays or torch tensors and computes with the library (and, for torch, on the
device) of its input, returning the same kind. numpy on the CPU is what ``cka-analyze --device cpu`` uses:
it needs no torch import (about a second of start-up), and a Gram ``X X^T`` costs about half the
multiply-adds of a general product (:mod:`cka_offline.cka.products`: one syrk, or GEMM tiles of the upper
triangle). Torch tensors are for CUDA (or for callers who hold tensors already); torch is imported only
when one is passed. Dtype arguments accept a name (``"float32"``), a numpy dtype or a torch dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cka_offline.cka.arrays import FLOAT_NAMES, astype, dtype_name, is_tensor, name_of, to_numpy, wider
from cka_offline.cka.products import scratch, symmetric_product
from cka_offline.errors import ActivationValueError, AlignmentError, InsufficientDataError, ResourceError

__all__ = [
    "center_columns",
    "gram_linear",
    "gram_rbf",
    "rbf_bandwidth",
    "hsic1_matrix",
    "cka_linear_full",
    "cka_full",
    "full_gram",
    "full_hsic",
    "cka_from_hsic",
]

logger = logging.getLogger(__name__)

#: a numpy array or a torch tensor
Array = Any

_GRAM_NAMES = ("float32", "float64")


def _check_matrix(x: Array, name: str) -> None:
    if not (isinstance(x, np.ndarray) or is_tensor(x)):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor of shape (m, d), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (m, d), got shape {tuple(x.shape)}")
    if name_of(x) not in FLOAT_NAMES:
        raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {name_of(x)}")


def _gram_name(dtype: Any) -> str:
    name = dtype_name(dtype)
    if name not in _GRAM_NAMES:
        raise ValueError(f"Gram dtype must be float32 or float64, got {name}")
    return name


def _symmetrize(gram: Array) -> Array:
    # A blocked product need not be bit-symmetric (numpy's syrk is; averaging it changes nothing);
    # hsic1_matrix relies on symmetry.
    return (gram + gram.T) * 0.5


def center_columns(x: Array, dtype: Any = None, *, inplace: bool = False) -> Array:
    """Subtract each column's mean: ``x - 1 mean(x, 0)``, shape ``(m, d)`` -> ``(m, d)``.

    The mean is taken in the working precision (the wider of ``x``'s dtype and ``dtype``, at least
    float32), so the residual offset of a column is a small multiple of its mean's rounding error (about
    1e-4 for a mean of 50 over 256 float32 rows). That residual is harmless: HSIC_1 is exactly invariant
    to it, and it is far too small to cause cancellation in the Gram; a float64 mean would cost a float64
    pass over the minibatch for no measurable gain. When ``x`` is float64 and ``dtype`` float32, the
    subtraction is done in float64 before rounding, so a large common offset (e.g. +50) costs no
    precision at all. The result has dtype ``dtype`` (default: ``x``'s, at least float32) and is of
    ``x``'s kind (numpy or torch, same device). ``inplace=True`` lets it overwrite ``x`` when ``x`` already
    has the working dtype (a streaming caller's scratch buffer: no new ``m x d`` allocation per minibatch).
    """
    _check_matrix(x, "x")
    source = name_of(x)
    out = dtype_name(dtype) if dtype is not None else wider(source, "float32")
    work = wider(source, out, "float32")
    xw = astype(x, work)
    if is_tensor(xw):
        mean = xw.mean(dim=0, keepdim=True)
    else:  # a matrix-vector product: several times faster than numpy's column-wise mean
        mean = (np.ones(xw.shape[0], dtype=work) @ xw) / np.array(xw.shape[0], dtype=work)
    if inplace or xw is not x:
        xw -= mean
    else:
        xw = xw - mean
    return astype(xw, out)


def gram_linear(x: Array, dtype: Any = "float32", *, inplace: bool = False, out: Array | None = None) -> Array:
    """Linear Gram matrix of the column-centred minibatch: ``K = Xc Xc^T``, ``(m, d)`` -> ``(m, m)``.

    Centring first changes no HSIC_1 value (Song et al. 2012: HSIC_1 is invariant to a constant shift
    of the features) but keeps the float32 product accurate. ``dtype`` selects the Gram precision
    (float32 default, float64 on request); ``x`` may be float16/bfloat16/float32/float64, a numpy array
    (the product is then :func:`~cka_offline.cka.products.symmetric_product`: one syrk, measured faster
    than GEMM tiles of the upper triangle in the engine) or a tensor on any device (the Gram is computed there).
    The result is exactly symmetric. On CUDA, float32 Grams are only as accurate as stated if TF32 matmuls
    stay off (PyTorch's default; ``set_float32_matmul_precision("high")`` would round the factors to 10-bit
    mantissas). ``inplace=True`` allows centring ``x`` in place (see :func:`center_columns`). ``out``: an
    ``(m, m)`` array (numpy: unit stride along its rows) or tensor of ``x``'s kind to write the Gram into,
    converted to its dtype (a float64 buffer takes a float32 Gram without a temporary); it is returned.
    """
    name = _gram_name(dtype)
    if isinstance(x, np.ndarray) and inplace:
        _check_matrix(x, "x")
        work = wider(name_of(x), name, "float32")
        if name_of(x) != work:  # widened into this thread's scratch, not a new array per minibatch
            wide = scratch(x.shape, work, "gram_linear")
            np.copyto(wide, x)
            x = wide
    xc = center_columns(x, name, inplace=inplace)
    if isinstance(xc, np.ndarray):
        return symmetric_product(xc, out)
    gram = _symmetrize(xc @ xc.T)
    if out is None:
        return gram
    out.copy_(gram)
    return out


def _sq_distances(x: Array, dtype: str) -> Array:
    """Squared Euclidean distances ``||x_i - x_j||^2``, ``(m, d)`` -> ``(m, m)``, exact zeros on the diagonal."""
    xc = center_columns(x, dtype)  # distances are shift invariant; centring keeps the norms small
    gram = symmetric_product(xc) if isinstance(xc, np.ndarray) else _symmetrize(xc @ xc.T)
    if is_tensor(gram):
        sq_norms = gram.diagonal()
    else:
        sq_norms = np.diagonal(gram)
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    # A squared distance is >= 0 by definition; rounding of the expansion above can make it -1e-7.
    if is_tensor(dist):
        dist.clamp_min_(0.0)
        dist.fill_diagonal_(0.0)
    else:
        np.maximum(dist, 0.0, out=dist)
        np.fill_diagonal(dist, 0.0)
    return dist


def rbf_bandwidth(sample: Array, fraction: float) -> float:
    """RBF bandwidth ``sigma = fraction * median_{i<j} ||x_i - x_j||``, from a sample ``(n, d)``.

    Computed once, in float64 with numpy (a tensor is copied to the host), from a sample of the data and
    recorded by the caller, so that every minibatch uses the same kernel (minibatch CKA needs one fixed
    kernel). The median is over the ``n(n-1)/2`` distinct pairs (average of the two middle values when
    their number is even). Kornblith et al. 2019 use ``fraction`` (their "threshold") times the median
    including the zero self-distances; ours excludes them. Memory: ``n x n`` float64.

    Raises InsufficientDataError when ``n < 2`` or when all sample rows are identical (median distance 0),
    ValueError when the sample holds NaN or Inf.
    """
    _check_matrix(sample, "sample")
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"RBF bandwidth fraction must be a finite number > 0, got {fraction!r}")
    n = sample.shape[0]
    if n < 2:
        raise InsufficientDataError(
            f"RBF bandwidth needs at least 2 sample examples to measure a distance, got {n}; use a larger sample"
        )
    x = to_numpy(astype(sample, "float64") if is_tensor(sample) else sample).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("RBF bandwidth: the sample holds NaN or Inf; check the activations")
    dist2 = _sq_distances(x, "float64")
    median = float(np.median(np.sqrt(dist2[np.triu_indices(n, k=1)])))
    if median == 0.0:
        raise InsufficientDataError(
            f"RBF bandwidth: all {n} sample examples are identical (median pairwise distance 0); "
            "use a larger or different sample, or the linear kernel"
        )
    return float(fraction) * median


def gram_rbf(x: Array, sigma: float, dtype: Any = "float32") -> Array:
    """RBF Gram matrix ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))``, ``(m, d)`` -> ``(m, m)``.

    ``sigma`` must be the same for every minibatch (take it from :func:`rbf_bandwidth` on a sample).
    Distances come from the column-centred minibatch in ``dtype`` (float32 default, float64 on request),
    with ``x``'s library and device; the diagonal is exactly 1 and the result exactly symmetric.
    """
    name = _gram_name(dtype)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"RBF sigma must be a finite number > 0, got {sigma!r}")
    dist2 = _sq_distances(x, name)
    dist2 *= -0.5 / (float(sigma) ** 2)
    if is_tensor(dist2):
        return dist2.exp_()
    return np.exp(dist2, out=dist2)


#: blocks of an HSIC_1 matrix: ``((r0, r1), (c0, c1))`` half-open ranges of rows and columns
Blocks = Sequence[tuple[tuple[int, int], tuple[int, int]]]


def _hsic1_inplace(k: Array, blocks: Blocks | None = None) -> Array:
    """HSIC_1 matrix of float64 C-contiguous Grams ``k`` ``(L, m, m)``; zeroes ``k``'s diagonals in place.

    ``blocks``: compute only these blocks (and their mirror images) and the diagonal; every other entry is
    NaN (see :func:`hsic1_matrix`)."""
    n_layers, m, _ = k.shape
    flat = k.reshape(n_layers, m * m)  # a view
    flat[:, :: m + 1] = 0.0  # the diagonals
    rows = k.sum(2)  # K~_i 1, (L, m)
    total = rows.sum(1)  # 1'K~_i 1
    cross = rows @ rows.T  # 1'K~_i K~_j 1: L^2 m, cheap next to the traces
    outer = total[:, None] * total[None, :]
    if blocks is None:
        trace = flat @ flat.T  # tr(K~_i K~_j) = <K~_i, K~_j>_F for symmetric K~
    else:
        trace = _block_traces(flat, blocks)
    hsic = (trace + outer / ((m - 1) * (m - 2)) - cross * (2.0 / (m - 2))) / (m * (m - 3))
    return (hsic + hsic.T) * 0.5


def _block_traces(flat: Array, blocks: Blocks) -> Array:
    """``flat @ flat.T`` on ``blocks`` (mirrored) and the diagonal only, NaN elsewhere: ``2 |block| m^2``
    FLOPs per block instead of ``2 L^2 m^2`` for all pairs."""
    n_layers = flat.shape[0]
    trace: Any
    idx: Any
    if is_tensor(flat):
        import torch

        trace = torch.full((n_layers, n_layers), math.nan, dtype=flat.dtype, device=flat.device)
        idx = torch.arange(n_layers, device=flat.device)
        trace[idx, idx] = torch.linalg.vecdot(flat, flat)
    else:
        trace = np.full((n_layers, n_layers), math.nan)
        idx = np.arange(n_layers)
        trace[idx, idx] = np.einsum("ij,ij->i", flat, flat)
    for (r0, r1), (c0, c1) in blocks:
        product = flat[r0:r1] @ flat[c0:c1].T
        trace[r0:r1, c0:c1] = product
        trace[c0:c1, r0:r1] = product.T
    return trace


def hsic1_matrix(grams: Array, *, overwrite: bool = False, blocks: Blocks | None = None) -> Array:
    """Unbiased HSIC_1 between every pair of ``L`` Grams of one minibatch: ``(L, m, m)`` -> ``(L, L)`` float64.

    ``out[i, j] = HSIC_1(K_i, K_j)`` (Song et al. 2012; formula in the module docstring). All pairs at once:
    ``tr(K~_i K~_j)`` as one product of the flattened Grams, ``1'K~_i 1`` as sums and ``1'K~_i K~_j 1`` as
    dot products of row sums; ``O(L^2 m^2)`` work, no ``m^3`` product. The Grams must be symmetric; they may
    be float32 or float64, numpy or torch, and are promoted to a float64 copy (``8 L m^2`` bytes) in their
    own library and device, where the result stays. ``overwrite=True`` skips that copy when the Grams are
    float64 and C-contiguous already, zeroing their diagonals in place (a caller's scratch buffer).
    ``blocks``: only these blocks of the result, ``((r0, r1), (c0, c1))`` half-open ranges of layers (and
    their mirror images), and the diagonal (every layer's self-HSIC) are computed; every other entry is NaN.
    The products of the traces are then ``2 m^2`` FLOPs per computed entry: two files of ``L/2`` layers
    compared with each other cost a quarter of all ``L^2`` pairs. The computed entries equal the all-pairs
    ones up to float64 rounding (a block product sums in another order than the product of all layers).
    Raises InsufficientDataError for ``m < 4`` (HSIC_1 divides by ``m(m-3)``).
    """
    if not (isinstance(grams, np.ndarray) or is_tensor(grams)):
        raise TypeError(f"grams must be a numpy array or torch.Tensor of shape (L, m, m), got {type(grams).__name__}")
    if grams.ndim != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must have shape (L, m, m), got shape {tuple(grams.shape)}")
    if name_of(grams) not in FLOAT_NAMES:
        raise ValueError(f"grams must be floating point, got {name_of(grams)}")
    m = grams.shape[1]
    if m < 4:
        raise InsufficientDataError(
            f"unbiased HSIC needs a minibatch of at least 4 examples, got {m}; use a larger batch size"
        )
    if is_tensor(grams):
        k = (
            grams
            if overwrite and grams.dtype == _torch_float64() and grams.is_contiguous()
            else (astype(grams, "float64", copy=True).contiguous())
        )
    elif overwrite and grams.dtype == np.float64 and grams.flags.c_contiguous:
        k = grams
    else:
        k = np.array(grams, dtype=np.float64, order="C")
    return _hsic1_inplace(k, blocks)


def _torch_float64() -> Any:
    import torch

    return torch.float64


def full_gram(x: Array, *, debiased: bool, sigma: float | None = None, out: Array | None = None) -> Array:
    """The centred float64 Gram of all ``n`` examples of one layer, ``(n, d)`` -> ``(n, n)``, whose Frobenius
    inner products are the exact full-data HSIC terms (:func:`full_hsic`).

    ``K = Xc Xc^T`` (column-centred ``x``; ``sigma=None``) or the RBF Gram of bandwidth ``sigma``
    (:func:`gram_rbf`, the minibatch estimator's kernel), in float64, then centred:

    - ``debiased=False``: ``HKH`` with ``H = I - 11'/n``, so ``<HKH, HLH>_F = tr(KHLH) = (n-1)^2 HSIC_0(K, L)``,
      the biased HSIC of Kornblith et al. 2019 (eq. 3).
    - ``debiased=True``: the U-centred ``U(K)``, zero diagonal and, off it,
      ``K~_ij - (K~1)_i/(n-2) - (K~1)_j/(n-2) + 1'K~1/((n-1)(n-2))`` (Szekely & Rizzo 2014, "Partial distance
      correlation with methods for dissimilarities", Ann. Statist., sec. 2.3), so
      ``<U(K), U(L)>_F = n(n-3) HSIC_1(K, L)``, the unbiased HSIC_1 of Song et al. 2012 (module docstring).

    Centring the Gram, like centring the features, subtracts the large common part before the products sum it.
    ``x``: numpy or torch (computed there, on its device); the result is of ``x``'s kind, written into ``out``
    (a float64 ``(n, n)`` C-contiguous array or tensor of that kind) when given. ``sigma=NaN`` (a constant
    layer) gives a zero Gram, whose zero self-HSIC marks the layer undefined. Memory: the Gram, the
    float64 centred rows and, for RBF, a few ``n x n`` temporaries. Needs ``n >= 4``.
    """
    _check_matrix(x, "x")
    n = x.shape[0]
    if n < 4:
        raise InsufficientDataError(f"full CKA needs at least 4 examples, got {n}")
    tensor = is_tensor(x)
    gram: Any = out
    if gram is None:
        if tensor:
            import torch

            gram = torch.empty((n, n), dtype=torch.float64, device=x.device)
        else:
            gram = np.empty((n, n), dtype=np.float64)
    if sigma is None:
        xc = center_columns(x, "float64")
        if tensor:
            import torch

            torch.matmul(xc, xc.T, out=gram)
            gram.add_(gram.T.clone()).mul_(0.5)  # a GPU product need not be bit-symmetric
        else:
            np.matmul(xc, xc.T, out=gram)  # numpy runs a syrk: exactly symmetric
        del xc
    elif math.isnan(sigma):
        gram[...] = 0.0
        return gram
    else:
        gram[...] = gram_rbf(x, sigma, "float64")
    return _center_gram(gram, debiased)


def _center_gram(k: Array, debiased: bool) -> Array:
    """``HKH`` or ``U(K)`` (:func:`full_gram`) of a symmetric float64 ``(n, n)`` ``k``, in place."""
    n = k.shape[0]
    zero_diagonal = k.fill_diagonal_ if is_tensor(k) else lambda value: np.fill_diagonal(k, value)
    if debiased:
        zero_diagonal(0.0)
        rows = k.sum(1)
        total = rows.sum()
        rows /= n - 2
        k -= rows[:, None]
        k -= rows[None, :]
        k += total / ((n - 1) * (n - 2))
        zero_diagonal(0.0)
    else:
        rows = k.sum(1) / n
        total = rows.sum() / n
        k -= rows[:, None]
        k -= rows[None, :]
        k += total
    return k


def full_hsic(grams_a: Array, grams_b: Array | None = None, *, debiased: bool) -> np.ndarray:
    """Exact full-data HSIC of every pair of two stacks of centred Grams from :func:`full_gram` (same
    ``debiased``): ``(La, n, n)``, ``(Lb, n, n)`` -> ``(La, Lb)`` float64 numpy; ``grams_b=None``: ``grams_a``
    with itself.

    ``out[i, j] = <A_i, B_j>_F / c``, ``c = n(n-3)`` (debiased: HSIC_1) or ``(n-1)^2`` (biased: HSIC_0): one
    product of the flattened Grams for all pairs, ``O(La Lb n^2)`` work (a syrk for one stack), in the
    stacks' library and device.
    """
    count, n = grams_a.shape[0], grams_a.shape[1]
    flat_a = grams_a.reshape(count, n * n)
    flat_b = flat_a if grams_b is None else grams_b.reshape(grams_b.shape[0], n * n)
    scale = float(n * (n - 3)) if debiased else float((n - 1) ** 2)
    return to_numpy(flat_a @ flat_b.T) / scale


def cka_from_hsic(hsic: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """CKA ``hsic[i, j] / sqrt(self_a[i] self_b[j])`` from full-data HSIC terms, ``(La, Lb)`` -> ``(La, Lb)``.

    NaN, with a logged warning, in the rows and columns of a self term ``<= 0`` (a constant layer; CKA is
    undefined there). Raises ActivationValueError when a term is not finite (NaN/Inf input or float64 overflow).
    """
    hsic, self_a, self_b = (np.asarray(v, dtype=np.float64) for v in (hsic, self_a, self_b))
    if not (np.isfinite(hsic).all() and np.isfinite(self_a).all() and np.isfinite(self_b).all()):
        raise ActivationValueError(
            "full CKA: the HSIC terms are not finite, so the activations hold NaN or Inf (or overflow float64); "
            "check the activations"
        )
    bad_a, bad_b = self_a <= 0, self_b <= 0
    if bad_a.any() or bad_b.any():
        logger.warning(
            "full CKA undefined: self-HSIC %s of layer(s) %s and %s of layer(s) %s (a constant layer?); returning NaN",
            self_a[bad_a].tolist(),
            np.flatnonzero(bad_a).tolist(),
            self_b[bad_b].tolist(),
            np.flatnonzero(bad_b).tolist(),
        )
    with np.errstate(invalid="ignore"):
        cka = hsic / np.sqrt(np.outer(np.where(bad_a, np.nan, self_a), np.where(bad_b, np.nan, self_b)))
    return cka


def cka_full(
    layers: Sequence[Array], *, debiased: bool, sigmas: Sequence[float] | None = None, max_bytes: int = 2**31
) -> np.ndarray:
    """Exact CKA on all ``n`` examples between every pair of ``L`` layers: ``L`` arrays ``(n, d_i)`` -> ``(L, L)``.

    Linear (``sigmas=None``) or RBF with bandwidth ``sigmas[i]`` for layer ``i``; biased (Kornblith et al.
    2019: ``<HKH, HLH>_F / (||HKH||_F ||HLH||_F)``) or debiased (``HSIC_1(K, L) / sqrt(HSIC_1(K, K)
    HSIC_1(L, L))``, the unbiased HSIC_1 of Song et al. 2012 over one ``n x n`` Gram, the estimator Nguyen
    et al. 2020 apply per minibatch), all in float64: each layer's centred Gram once (:func:`full_gram`),
    all pairs as one product (:func:`full_hsic`). Computed with the first layer's library, on its device.

    Holds ``L`` ``n x n`` float64 Grams (``8 L n^2`` bytes); raises ResourceError when that exceeds
    ``max_bytes``, InsufficientDataError for ``n < 4``, AlignmentError for different ``n`` and
    ActivationValueError for NaN/Inf input. NaN, with a logged warning, for a constant layer
    (:func:`cka_from_hsic`).
    """
    if not layers:
        raise ValueError("full CKA needs at least one layer")
    for i, z in enumerate(layers):
        _check_matrix(z, f"layer {i}")
    first = layers[0]
    n = first.shape[0]
    for i, z in enumerate(layers):
        if z.shape[0] != n:
            raise AlignmentError(
                f"full CKA needs the same examples in every layer, got {n} rows in layer 0 and {z.shape[0]} in layer {i}"
            )
    if n < 4:
        raise InsufficientDataError(f"full CKA needs at least 4 examples, got {n}")
    if sigmas is not None and len(sigmas) != len(layers):
        raise ValueError(f"full CKA needs one RBF bandwidth per layer, got {len(sigmas)} for {len(layers)} layers")
    count = len(layers)
    grams: Any
    needed = 8 * count * n * n
    if needed > max_bytes:
        raise ResourceError(
            f"exact full-data CKA on n={n} examples needs {needed} bytes ({needed / 2**30:.2f} GiB) for {count} "
            f"{n}x{n} float64 Gram matrices, above the limit max_bytes={max_bytes}; use minibatch CKA "
            "(MinibatchCKA) or raise max_bytes (cka-analyze: --max-memory, which also splits the layers into blocks)"
        )
    if is_tensor(first):
        import torch

        grams = torch.empty((count, n, n), dtype=torch.float64, device=first.device)
        layers = [(z if is_tensor(z) else torch.from_numpy(np.asarray(z))).to(first.device) for z in layers]
    else:
        grams = np.empty((count, n, n), dtype=np.float64)
        layers = [to_numpy(z) for z in layers]
    for i, z in enumerate(layers):
        if not bool(z.isfinite().all() if is_tensor(z) else np.isfinite(z).all()):
            raise ActivationValueError(f"full CKA: layer {i} holds NaN or Inf; check the activations")
        full_gram(z, debiased=debiased, sigma=None if sigmas is None else float(sigmas[i]), out=grams[i])
    hsic = full_hsic(grams, debiased=debiased)
    diagonal = np.diagonal(hsic).copy()
    return cka_from_hsic(hsic, diagonal, diagonal)


def cka_linear_full(x: Array, y: Array, *, debiased: bool, max_bytes: int = 2**31) -> float:
    """Exact linear CKA of two layers on all ``n`` examples at once (Kornblith et al. 2019), in float64:
    :func:`cka_full` of ``[x, y]``.

    ``x``: ``(n, d1)``, ``y``: ``(n, d2)``, same examples in the same order, any float dtype; numpy arrays
    or tensors (computed with ``x``'s library, on ``x``'s device). With ``K = Xc Xc^T``, ``L = Yc Yc^T``:

    - ``debiased=False``: ``CKA = <K, L>_F / (||K||_F ||L||_F)`` (biased HSIC, Kornblith et al. 2019, eq. 2-4).
    - ``debiased=True``: ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with the unbiased HSIC_1 of
      Song et al. 2012 over one ``n x n`` Gram (the estimator Nguyen et al. 2020 apply per minibatch).

    Holds two ``n x n`` float64 Grams (``16 n^2`` bytes); raises ResourceError when that exceeds
    ``max_bytes``, InsufficientDataError for ``n < 4`` and ActivationValueError for NaN/Inf input. Returns
    NaN, with a logged warning, when a self term is ``<= 0`` (a constant layer; CKA is undefined there).
    """
    _check_matrix(x, "x")
    _check_matrix(y, "y")
    n = x.shape[0]
    if y.shape[0] != n:
        raise AlignmentError(f"full CKA needs the same examples in x and y, got {n} rows in x and {y.shape[0]} in y")
    return float(cka_full([x, y], debiased=debiased, max_bytes=max_bytes)[0, 1])
