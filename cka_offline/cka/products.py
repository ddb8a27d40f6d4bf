"""Exactly symmetric products ``X X^T`` on the CPU (numpy): one syrk, or GEMM tiles of the upper triangle.

A Gram ``K = X X^T`` of ``m`` rows needs ``m(m+1)/2`` dot products, about half the ``2 m^2 d`` FLOPs of a general
product. numpy computes ``x @ x.T`` as one symmetric rank-k update (BLAS syrk) and mirrors its triangle. The
alternative here: row tiles of ``b`` rows whose products cover the upper triangle -- tile ``I`` times all rows
from ``I`` on, one GEMM each, ``(m/b + 1) / (2 m/b)`` of the general product's work (``m = 256``, ``b = 64``:
5/8) at GEMM speed -- with the lower triangle mirrored from the upper (a copy of ``m^2/2`` values, which the
conversion of a float32 Gram into a float64 buffer does on the way).

Measured on one core as the analysis engine runs each layer (OpenBLAS 0.3.31, AVX2; docs/benchmarks.md,
section 2, and ``bench/bench_floor.py``, which times both at workload W's shapes every run): with one
minibatch of all of W's layers in turn (the rows coming from memory, as in the engine), the syrk takes 0.6 of
the general product's time, tiles of 64 rows 0.77, in float32 and float64 alike. Only with one layer's rows
hot in cache do float32 tiles beat the syrk (by about 10% at ``m = 256``, ``d >= 1024``). So the syrk is the
default; tiles are kept for measuring (``rows=``) and for machines whose BLAS has a slow syrk.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["SCRATCH_LIMIT", "TILE_ROWS", "scratch", "symmetric_product"]

#: rows per GEMM tile when :func:`symmetric_product` is not told: None, one syrk (measured faster, see above)
TILE_ROWS: int | None = None


_local = threading.local()


def _scratch(m: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread ``(m, m)`` buffer of ``dtype``, reused between calls (no allocation per minibatch)."""
    return scratch((m, m), dtype, "product")


#: largest per-thread scratch kept between calls; a larger one is allocated per call, as before
SCRATCH_LIMIT = 64 * 2**20


def scratch(shape: tuple[int, int], dtype: Any, tag: str) -> np.ndarray:
    """A C-contiguous per-thread buffer of ``shape`` and ``dtype`` for the caller ``tag``, reused between calls
    of this thread: a minibatch's temporaries then cost no allocation (page faults of fresh memory cost a
    Gram of float64 rows about a tenth of its time). Its contents are overwritten by this thread's next call
    with the same ``tag``: use it only inside one computation. At most :data:`SCRATCH_LIMIT` bytes are kept
    per tag and thread; a larger buffer is a new array."""
    dtype = np.dtype(dtype)
    size = shape[0] * shape[1]
    if size * dtype.itemsize > SCRATCH_LIMIT:
        return np.empty(shape, dtype=dtype)
    buffers: dict[tuple[str, str], np.ndarray] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (tag, dtype.str)
    flat = buffers.get(key)
    if flat is None or flat.size < size:
        flat = buffers[key] = np.empty(size, dtype=dtype)
    return flat[:size].reshape(shape)


_masks: dict[int, np.ndarray] = {}


def _strict_lower(b: int) -> np.ndarray:
    mask = _masks.get(b)
    if mask is None:
        mask = _masks[b] = np.tril(np.ones((b, b), dtype=bool), -1)
    return mask


def symmetric_product(
    x: np.ndarray, out: np.ndarray | None = None, *, rows: int | None | str = "default"
) -> np.ndarray:
    """``x @ x.T`` of a float32/float64 numpy ``x`` ``(m, d)``, exactly symmetric, in ``x``'s precision.

    ``out``: an ``(m, m)`` float array with unit stride along its rows (e.g. one Gram of a float64 ``(L, m, m)``
    buffer): the product is written there, converted to its dtype; otherwise a new array of ``x``'s dtype is
    returned. ``rows``: rows per GEMM tile of the upper triangle, None for one syrk, ``"default"`` for
    :data:`TILE_ROWS` (None: the syrk, measured faster). A float32 product into a float64 ``out`` is
    computed in a per-thread float32 buffer, then converted (tiles: mirrored while converted)."""
    m, _ = x.shape
    if rows == "default":
        rows = TILE_ROWS
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"rows per tile must be a positive integer or None (one syrk), got {rows!r}")
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x)  # BLAS needs one unit stride; without it numpy loops without BLAS
    dtype = x.dtype
    if out is None:
        out = np.empty((m, m), dtype=dtype)
    if out.shape != (m, m) or out.strides[1] != out.itemsize:
        raise ValueError(f"out must have shape ({m}, {m}) and unit stride along its rows, got {out.shape}")
    direct = out.dtype == dtype
    work = out if direct else _scratch(m, dtype)
    if rows is None or rows >= m:
        np.matmul(x, x.T, out=work)  # numpy runs a syrk and mirrors its triangle: exactly symmetric
        if not direct:
            np.copyto(out, work)
        return out
    b = rows
    for i0 in range(0, m, b):
        i1 = min(m, i0 + b)
        # tile I times every row from I on: K[I, i0:], one GEMM with its own rows' diagonal block
        np.matmul(x[i0:i1], x[i0:].T, out=work[i0:i1, i0:])
        if not direct:
            out[i0:i1, i0:] = work[i0:i1, i0:]
        out[i1:, i0:i1] = work[i0:i1, i1:].T
        block = out[i0:i1, i0:i1]  # a GEMM's diagonal block need not be bit-symmetric: mirror it too
        np.copyto(block, block.T.copy(), where=_strict_lower(i1 - i0))
    return out
