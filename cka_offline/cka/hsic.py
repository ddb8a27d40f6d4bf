"""Kernel matrices and HSIC estimators: pure torch math, no files, no printing.

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
"""

from __future__ import annotations

import logging
import math

import torch

from cka_offline.errors import ActivationValueError, AlignmentError, InsufficientDataError, ResourceError

__all__ = [
    "center_columns",
    "gram_linear",
    "gram_rbf",
    "rbf_bandwidth",
    "hsic1_matrix",
    "cka_linear_full",
]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAM_DTYPES = (torch.float32, torch.float64)


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (m, d), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (m, d), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def _check_gram_dtype(dtype: torch.dtype) -> None:
    if dtype not in _GRAM_DTYPES:
        raise ValueError(f"Gram dtype must be torch.float32 or torch.float64, got {dtype}")


def center_columns(x: torch.Tensor, dtype: torch.dtype | None = None, *, inplace: bool = False) -> torch.Tensor:
    """Subtract each column's mean: ``x - 1 mean(x, 0)``, shape ``(m, d)`` -> ``(m, d)``.

    The mean is taken in the working precision (the wider of ``x``'s dtype and ``dtype``, at least
    float32) with torch's cascaded summation, so the residual offset of a column is a few ulps of its mean
    (about 1e-5 for a mean of 50 in float32). That residual is harmless: HSIC_1 is exactly invariant to it,
    and it is far too small to cause cancellation in the Gram; a float64 mean would cost a float64 copy of
    the minibatch for no measurable gain. When ``x`` is float64 and ``dtype`` float32, the subtraction is
    done in float64 before rounding, so a large common offset (e.g. +50) costs no precision at all.
    The result has dtype ``dtype`` (default: ``x.dtype``, at least float32). ``inplace=True`` lets it
    overwrite ``x`` when ``x`` already has the working dtype (a streaming caller's scratch buffer: no new
    ``m x d`` allocation per minibatch).
    """
    _check_matrix(x, "x")
    if dtype is None:
        dtype = torch.promote_types(x.dtype, torch.float32)
    work = torch.promote_types(torch.promote_types(x.dtype, dtype), torch.float32)
    xw = x.to(work)
    mean = xw.mean(dim=0, keepdim=True)
    xc = xw.sub_(mean) if inplace or xw is not x else xw - mean
    return xc.to(dtype)


def gram_linear(x: torch.Tensor, dtype: torch.dtype = torch.float32, *, inplace: bool = False) -> torch.Tensor:
    """Linear Gram matrix of the column-centred minibatch: ``K = Xc Xc^T``, ``(m, d)`` -> ``(m, m)``.

    Centring first changes no HSIC_1 value (Song et al. 2012: HSIC_1 is invariant to a constant shift
    of the features) but keeps the float32 product accurate. ``dtype`` selects the Gram precision
    (float32 default, float64 on request); ``x`` may be float16/bfloat16/float32/float64 on any device,
    and the Gram is computed on ``x``'s device. The result is exactly symmetric. On CUDA, float32 Grams are
    only as accurate as stated if TF32 matmuls stay off (PyTorch's default; ``set_float32_matmul_precision``
    "high" would round the factors to 10-bit mantissas). ``inplace=True`` allows centring ``x`` in place
    (see :func:`center_columns`).
    """
    _check_gram_dtype(dtype)
    xc = center_columns(x, dtype, inplace=inplace)
    gram = xc @ xc.T
    # A blocked matmul need not be bit-symmetric; hsic1_matrix relies on symmetry.
    return (gram + gram.T) * 0.5


def _sq_distances(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - x_j||^2``, ``(m, d)`` -> ``(m, m)``, exact zeros on the diagonal."""
    xc = center_columns(x, dtype)  # distances are shift invariant; centring keeps the norms small
    gram = xc @ xc.T
    gram = (gram + gram.T) * 0.5
    sq_norms = gram.diagonal()
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    # A squared distance is >= 0 by definition; rounding of the expansion above can make it -1e-7.
    dist = dist.clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def rbf_bandwidth(sample: torch.Tensor, fraction: float) -> float:
    """RBF bandwidth ``sigma = fraction * median_{i<j} ||x_i - x_j||``, from a sample ``(n, d)``.

    Computed once, in float64, from a sample of the data and recorded by the caller, so that every minibatch
    uses the same kernel (minibatch CKA needs one fixed kernel). The median is over the ``n(n-1)/2`` distinct
    pairs (average of the two middle values when their number is even). Kornblith et al. 2019 use
    ``fraction`` (their "threshold") times the median including the zero self-distances; ours excludes them.
    Memory: ``n x n`` float64 on ``sample``'s device.

    Raises InsufficientDataError when ``n < 2`` or when all sample rows are identical (median distance 0).
    """
    _check_matrix(sample, "sample")
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"RBF bandwidth fraction must be a finite number > 0, got {fraction!r}")
    n = sample.shape[0]
    if n < 2:
        raise InsufficientDataError(
            f"RBF bandwidth needs at least 2 sample examples to measure a distance, got {n}; use a larger sample"
        )
    dist2 = _sq_distances(sample, torch.float64)
    iu = torch.triu_indices(n, n, offset=1, device=dist2.device)
    dist = dist2[iu[0], iu[1]].sqrt()
    n_pairs = dist.numel()
    # Median with the two middle values averaged (numpy's convention); kthvalue is 1-based.
    lo = torch.kthvalue(dist, (n_pairs + 1) // 2).values
    hi = torch.kthvalue(dist, n_pairs // 2 + 1).values
    median = float((lo + hi) * 0.5)
    if not math.isfinite(median):
        raise ValueError("RBF bandwidth: the sample holds NaN or Inf; check the activations")
    if median == 0.0:
        raise InsufficientDataError(
            f"RBF bandwidth: all {n} sample examples are identical (median pairwise distance 0); "
            "use a larger or different sample, or the linear kernel"
        )
    return float(fraction) * median


def gram_rbf(x: torch.Tensor, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RBF Gram matrix ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))``, ``(m, d)`` -> ``(m, m)``.

    ``sigma`` must be the same for every minibatch (take it from :func:`rbf_bandwidth` on a sample).
    Distances come from the column-centred minibatch in ``dtype`` (float32 default, float64 on request),
    on ``x``'s device; the diagonal is exactly 1 and the result exactly symmetric.
    """
    _check_gram_dtype(dtype)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"RBF sigma must be a finite number > 0, got {sigma!r}")
    dist2 = _sq_distances(x, dtype)
    return torch.exp(dist2 * (-0.5 / (float(sigma) ** 2)))


def _hsic1_inplace(k: torch.Tensor) -> torch.Tensor:
    """HSIC_1 matrix of float64 Grams ``k`` ``(L, m, m)``; zeroes ``k``'s diagonals in place."""
    n_layers, m, _ = k.shape
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(n_layers, m * m)
    trace = flat @ flat.T  # tr(K~_i K~_j) = <K~_i, K~_j>_F for symmetric K~
    total = flat.sum(dim=1)  # 1'K~_i 1
    rows = k.sum(dim=2)  # K~_i 1, (L, m)
    cross = rows @ rows.T  # 1'K~_i K~_j 1
    hsic = (trace + torch.outer(total, total) / ((m - 1) * (m - 2)) - cross * (2.0 / (m - 2))) / (m * (m - 3))
    return (hsic + hsic.T) * 0.5


def hsic1_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 between every pair of ``L`` Grams of one minibatch: ``(L, m, m)`` -> ``(L, L)`` float64.

    ``out[i, j] = HSIC_1(K_i, K_j)`` (Song et al. 2012; formula in the module docstring). All pairs at once:
    ``tr(K~_i K~_j)`` as one product of the flattened Grams, ``1'K~_i 1`` as sums and ``1'K~_i K~_j 1`` as
    dot products of row sums; ``O(L^2 m^2)`` work, no ``m^3`` product. The Grams must be symmetric; they may
    be float32 or float64 and are promoted to a float64 copy (``8 L m^2`` bytes) on their own device, where
    the result stays. Raises InsufficientDataError for ``m < 4`` (HSIC_1 divides by ``m(m-3)``).
    """
    if not isinstance(grams, torch.Tensor):
        raise TypeError(f"grams must be a torch.Tensor of shape (L, m, m), got {type(grams).__name__}")
    if grams.ndim != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must have shape (L, m, m), got shape {tuple(grams.shape)}")
    if not grams.is_floating_point():
        raise ValueError(f"grams must be floating point, got {grams.dtype}")
    m = grams.shape[1]
    if m < 4:
        raise InsufficientDataError(
            f"unbiased HSIC needs a minibatch of at least 4 examples, got {m}; use a larger batch size"
        )
    return _hsic1_inplace(grams.to(torch.float64, copy=True))


def cka_linear_full(
    x: torch.Tensor, y: torch.Tensor, *, debiased: bool, max_bytes: int = 2**31
) -> float:
    """Exact linear CKA on all ``n`` examples at once (Kornblith et al. 2019), in float64.

    ``x``: ``(n, d1)``, ``y``: ``(n, d2)``, same examples in the same order, any float dtype and device
    (computed on ``x``'s device). With ``K = Xc Xc^T``, ``L = Yc Yc^T`` (column-centred, so ``HKH = K``):

    - ``debiased=False``: ``CKA = <K, L>_F / (||K||_F ||L||_F)`` (biased HSIC, Kornblith et al. 2019, eq. 2-4).
    - ``debiased=True``: ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with the unbiased HSIC_1 of
      Song et al. 2012 over one ``n x n`` Gram (the estimator Nguyen et al. 2020 apply per minibatch).

    Holds two ``n x n`` float64 Grams (``16 n^2`` bytes); raises ResourceError when that exceeds
    ``max_bytes``, InsufficientDataError for ``n < 4`` and ActivationValueError for NaN/Inf input. Returns NaN, with a logged warning, when a
    self term is ``<= 0`` (a constant layer; CKA is undefined there).
    """
    _check_matrix(x, "x")
    _check_matrix(y, "y")
    n = x.shape[0]
    if y.shape[0] != n:
        raise AlignmentError(
            f"full CKA needs the same examples in x and y, got {n} rows in x and {y.shape[0]} in y"
        )
    if n < 4:
        raise InsufficientDataError(f"full CKA needs at least 4 examples, got {n}")
    needed = 2 * 8 * n * n
    if needed > max_bytes:
        raise ResourceError(
            f"exact full-data CKA on n={n} examples needs {needed} bytes ({needed / 2**30:.2f} GiB) for two "
            f"{n}x{n} float64 Gram matrices, above the limit max_bytes={max_bytes}; use minibatch CKA "
            "(MinibatchCKA) or raise max_bytes"
        )
    k = torch.empty((2, n, n), dtype=torch.float64, device=x.device)
    for i, z in enumerate((x, y)):
        zc = center_columns(z.to(x.device), torch.float64)
        torch.matmul(zc, zc.T, out=k[i])
        del zc
    if debiased:
        h = _hsic1_inplace(k)
    else:
        flat = k.reshape(2, n * n)
        h = flat @ flat.T
    hxx, hyy, hxy = float(h[0, 0]), float(h[1, 1]), float(h[0, 1])
    if not math.isfinite(hxx + hyy + hxy):
        raise ActivationValueError(
            "full CKA: the HSIC terms are not finite, so x or y hold NaN or Inf (or overflow float64); "
            "check the activations"
        )
    if hxx <= 0 or hyy <= 0:
        logger.warning(
            "full CKA undefined: self-HSIC of x is %r and of y is %r (a constant layer?); returning NaN", hxx, hyy
        )
        return math.nan
    return hxy / math.sqrt(hxx * hyy)

