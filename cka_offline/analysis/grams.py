"""The Gram engines: each minibatch's Gram matrices of every stacked layer, with numpy (CPU) or torch (CUDA).

An engine is a context manager with ``submit(batch) -> wait()``: ``submit`` starts the work of one
minibatch and returns a function that waits for it and gives the ``(L, m, m)`` Grams (valid until
``depth`` more minibatches are submitted). Both engines use one per-layer formula, :func:`gram_into`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .batches import Batch
from .stack import LayerStack

if TYPE_CHECKING:
    from ..store.reader import MappedRows

log = logging.getLogger(__name__)

#: environment variables that set the number of compute threads, first found wins
THREAD_VARIABLES = ("CKA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_threads() -> int:
    """Compute threads for the CPU loop: ``CKA_NUM_THREADS``, else the usual BLAS/OpenMP variables (torchrun
    sets ``OMP_NUM_THREADS=1`` for each of its processes), else the cores this process may run on."""
    for name in THREAD_VARIABLES:
        text = os.environ.get(name, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                log.warning("ignoring %s=%r: not an integer", name, text)
                continue
            if value >= 1:
                return value
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def engine_for(device: str) -> str:
    """``torch`` for CUDA devices, ``numpy`` (no torch import) for the CPU."""
    return "torch" if device.startswith("cuda") else "numpy"


def gram_into(
    grams: Any, i: int, x: Any, gram_dtype: str, bandwidths: Sequence[float] | None, scale: float = 1.0
) -> None:
    """Layer ``i``'s Gram of the minibatch rows ``x`` (this batch's scratch copy: scaled and centred in
    place) into ``grams[i]``: linear, or RBF with the layer's recorded bandwidth; a constant layer (NaN
    bandwidth) gets a zero Gram, whose zero self-HSIC marks it undefined. ``scale`` is the layer's power of
    two (:func:`~cka_offline.analysis.loop.layer_statistics`): multiplying by it is exact, changes no CKA
    value, and keeps float32 Grams of very small or very large activations from underflowing or
    overflowing."""
    from ..cka.hsic import gram_linear, gram_rbf

    if bandwidths is not None and math.isnan(bandwidths[i]):
        grams[i] = 0.0
        return
    x = _scaled(x, scale)
    if bandwidths is None:
        gram_linear(x, dtype=gram_dtype, inplace=True, out=grams[i])
    else:
        grams[i] = gram_rbf(x, bandwidths[i] * scale, dtype=gram_dtype)


#: a layer's power of two is applied in factors of at most 2**64: every factor is a finite float32 (the scale
#: of float32 subnormals, about 2**133, is not), and the products stay exact and in range
_SCALE_STEP = 64


def _scaled(x: Any, scale: float) -> Any:
    """``x * scale`` (``scale`` a power of two), in place when ``x`` is float32 or wider (the caller's
    scratch); float16 rows are widened to float32 first (a power of two can leave float16's range)."""
    if scale == 1.0:
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        for factor in _factors(scale):
            x *= x.dtype.type(factor)
        return x
    if x.element_size() < 4:
        x = x.float()
    for factor in _factors(scale):
        x.mul_(factor)
    return x


def _factors(scale: float) -> list[float]:
    """Powers of two of at most ``2**±64`` whose product is ``scale`` (itself a power of two)."""
    exponent = math.frexp(scale)[1] - 1
    factors = []
    while exponent:
        step = max(-_SCALE_STEP, min(_SCALE_STEP, exponent))
        factors.append(math.ldexp(1.0, step))
        exponent -= step
    return factors


@dataclass(frozen=True)
class GramJob:
    """What both engines need: the layers, the Gram dtype, the per-layer RBF bandwidths (None: linear) and
    scales (None: 1), the layers' memory-mapped rows (None: the HDF5 reader fills each batch) and the
    largest minibatch (the size of the reused buffers)."""

    stack: LayerStack
    gram_dtype: str
    bandwidths: Sequence[float] | None
    scales: Sequence[float] | None
    mapped: list[MappedRows] | None
    largest: int

    def gram(self, grams: Any, i: int, x: Any) -> None:
        """Layer ``i``'s Gram of the rows ``x`` into ``grams[i]`` (:func:`gram_into`)."""
        scale = 1.0 if self.scales is None else self.scales[i]
        gram_into(grams, i, x, self.gram_dtype, self.bandwidths, scale)


class NumpyGrams:
    """CPU Grams of one minibatch: one task per layer (gather, centre, product:
    :func:`~cka_offline.cka.products.symmetric_product`) on a pool of one thread per core, each with
    single-threaded BLAS (``threadpoolctl``); the largest layers go first. With fewer layers than cores, the
    spare cores go to BLAS threads instead. Buffers are allocated once and reused.
    Each new shuffle buffer unmaps the pages read from the files so far, so resident memory stays flat
    however large the files are."""

    #: minibatches in flight: the next one's tasks run while the caller sums the previous one's HSIC terms
    depth = 2

    def __init__(self, job: GramJob) -> None:
        self.job, self.stack, self.mapped, self.largest = job, job.stack, job.mapped, job.largest
        stack = job.stack
        cores = blas_threads()
        self.workers = max(1, min(cores, len(stack)))
        self.blas_threads = max(1, cores // self.workers)
        self.order = sorted(range(len(stack)), key=lambda i: -stack.layers[i].features)
        self.scratch: dict[int, list[np.ndarray]] = {}  # per buffer set (depth of them): one per layer
        self.grams: dict[tuple[int, int], np.ndarray] = {}
        self.submitted = 0

    def __enter__(self) -> NumpyGrams:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(self.blas_threads, user_api="blas")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cka-gram")
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._limits.restore_original_limits()

    def submit(self, batch: Batch) -> Callable[[], np.ndarray]:
        """Start the Gram tasks of ``batch``; the returned function waits for them and gives the Grams."""
        m = len(batch.positions)
        slot = self.submitted % self.depth
        self.submitted += 1
        grams = self.grams.get((slot, m))
        if grams is None:  # float64: each task converts its Gram, so the caller's HSIC sums need no copy
            grams = self.grams[(slot, m)] = np.empty((len(self.stack), m, m), dtype=np.float64)
        mapped = self.mapped
        if mapped is not None and batch.new_buffer:
            self.stack.release_mapped()
        if mapped is not None and slot not in self.scratch:
            self.scratch[slot] = [
                np.empty((self.largest, layer.features), dtype=layer.dtype) for layer in self.stack.layers
            ]
        scratch = self.scratch.get(slot)

        def task(i: int) -> None:
            if mapped is not None and scratch is not None:
                x = self.stack.gather(i, mapped[i], batch.positions, scratch[i][:m])
            else:
                x = batch.arrays[i]
            # NaN/Inf and overflow are reported by the accumulator, naming the layer and example: numpy's
            # RuntimeWarnings from this thread (np.errstate is per thread) would only be noise before it
            with np.errstate(all="ignore"):
                self.job.gram(grams, i, x)

        futures = [self._pool.submit(task, i) for i in self.order]

        def result() -> np.ndarray:
            for future in futures:
                future.result()
            return grams

        return result


class TorchGrams:
    """Torch Grams of one minibatch (the CUDA path; runs on CPU tensors too, which the tests use): each
    layer's rows in host memory -- pinned for CUDA -- gathered from the memory maps by a thread per core, or
    filled by the HDF5 reader thread; copied to the device, Grams computed there. Two minibatches are in
    flight: the next one is gathered while the device works on the last."""

    #: the slot of a minibatch is reused two minibatches later, after the caller has synchronized on it
    depth = 2

    def __init__(self, job: GramJob, device: str) -> None:
        self.job, self.stack, self.mapped, self.largest = job, job.stack, job.mapped, job.largest
        self.device, self.gram_dtype = device, job.gram_dtype
        self.pin = device.startswith("cuda")
        self.slots: dict[int, list[Any]] = {}
        self.submitted = 0
        self._compute = torch_compute()

    def __enter__(self) -> TorchGrams:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(blas_threads(), thread_name_prefix="cka-gather") if self.mapped else None
        self._compute.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        try:
            if exc[0] is None and self.pin:
                torch.cuda.synchronize(self.device)
        finally:
            self._compute.__exit__(*exc)
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, batch: Batch) -> Callable[[], Any]:
        grams = self._grams(batch)
        return lambda: grams

    def _arrays(self, batch: Batch) -> list[Any]:
        if self.mapped is None or self._pool is None:
            return batch.arrays
        import torch

        if batch.new_buffer:
            self.stack.release_mapped()
        slot = self.submitted % self.depth
        self.submitted += 1
        if slot not in self.slots:
            self.slots[slot] = [
                torch.empty((self.largest, layer.features), dtype=getattr(torch, layer.dtype), pin_memory=self.pin)
                for layer in self.stack.layers
            ]
        m = len(batch.positions)
        arrays = [t[:m] for t in self.slots[slot]]
        futures = [
            self._pool.submit(self.stack.gather, i, self.mapped[i], batch.positions, arrays[i].numpy())
            for i in range(len(self.stack))
        ]
        for future in futures:
            future.result()
        return arrays

    def _grams(self, batch: Batch) -> Any:
        import torch

        m = len(batch.positions)
        grams = torch.empty((len(self.stack), m, m), dtype=getattr(torch, self.gram_dtype), device=self.device)
        for i, x in enumerate(self._arrays(batch)):
            self.job.gram(grams, i, x.to(self.device, non_blocking=True))
        return grams


@contextlib.contextmanager
def torch_compute() -> Iterator[None]:
    """For torch: no autograd, and float32 Grams kept float32: TF32 (``set_float32_matmul_precision("high")``,
    which another library in the process may have set) rounds the factors to 10-bit mantissas. Restored
    afterwards."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_float32_matmul_precision(before)


__all__ = [
    "GramJob",
    "NumpyGrams",
    "THREAD_VARIABLES",
    "TorchGrams",
    "blas_threads",
    "engine_for",
    "gram_into",
    "torch_compute",
]
