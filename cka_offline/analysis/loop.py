"""The loops: stream the planned minibatches through a Gram engine into the accumulator, or compute the
exact full-data CKA; and the per-layer RBF bandwidths both kernels' paths need first."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..distributed import Distributed
from ..errors import ActivationValueError, ResourceError
from .batches import Batch, HDF5BatchReader, mapped_batches
from .grams import NumpyGrams, TorchGrams, engine_for, torch_compute
from .plan import MinibatchPlan
from .stack import LayerStack

if TYPE_CHECKING:
    from ..cka.accumulator import CKAStats

ProgressCallback = Callable[[int, int], None]

#: examples sampled (at most) to estimate each layer's RBF bandwidth
BANDWIDTH_SAMPLE = 1000
#: memory the full-data estimators may use to hold the data of all selected layers
FULL_DATA_BYTES = 4 * 2**30


@dataclass(frozen=True)
class LoopSettings:
    """How the minibatch loop runs: the resolved device, Gram dtype, per-layer RBF bandwidths (None:
    linear kernel), jackknife groups, interval level, reader prefetch, and ``engine`` (``None``: the
    device's own, :func:`~cka_offline.analysis.grams.engine_for`; the tests run ``torch`` on the CPU)."""

    device: str
    gram_dtype: str
    bandwidths: Sequence[float] | None
    n_groups: int
    confidence: float
    prefetch: int
    engine: str | None = None


def estimate_bandwidths(stack: LayerStack, seed: int, fraction: float) -> list[float]:
    """Each stacked layer's RBF bandwidth from a sample of up to 1000 aligned examples
    (``default_rng([seed, 1])``); NaN for a constant layer (its CKA is undefined)."""
    from ..cka.hsic import rbf_bandwidth

    n = stack.n
    size = min(n, BANDWIDTH_SAMPLE)
    positions = np.sort(np.random.default_rng([seed, 1]).choice(n, size=size, replace=False))
    out = []
    for i in range(len(stack)):
        x = stack.read_checked(i, positions)
        if np.all(x == x[:1]):
            out.append(math.nan)  # constant: CKA undefined; reported with the other constant layers
            continue
        out.append(rbf_bandwidth(x, fraction))
    return out


def run_minibatch(
    stack: LayerStack, plan: MinibatchPlan, settings: LoopSettings, *,
    progress: ProgressCallback | None = None, distributed: Distributed | None = None,
) -> tuple["CKAStats", int, dict[str, float]]:
    """The minibatch loop: ``(stats, minibatches, timing)``.

    CPU: numpy throughout (no torch import). Each layer's work for a minibatch -- gather its rows, centre
    them, one syrk for the Gram -- is a task for a pool of one thread per core, each running single-threaded
    BLAS; rows come straight from memory-mapped files (:meth:`ActivationFile.mapped_rows`) when the layers
    are stored uncompressed, else from the background HDF5 reader. Independent tasks on separate cores beat
    one multi-threaded BLAS call per layer, whose threads wait for each other at every step (badly so on a
    busy machine), and the gathered rows are still in cache for the product.
    CUDA: rows are gathered the same way (or read by the background HDF5 reader) into pinned tensors,
    copied to the device once per minibatch; the next minibatch is gathered while the device computes.
    Under torchrun each rank runs its share of the plan and the float64 sums are all-reduced.
    """
    from ..cka.accumulator import MinibatchCKA

    ctx = distributed if distributed is not None else Distributed()
    total = stack.n * plan.epochs
    share = plan.share(ctx.rank, ctx.world_size)
    # rank 0 draws the bar for everyone, scaling its own share up to the total (the ranks run in step)
    own_total = plan.examples_in(share)
    if not ctx.is_main:
        progress = None
    acc = MinibatchCKA(n_layers=len(stack), n_groups=settings.n_groups)
    reader, source, compute = _pipeline(stack, plan, settings, share)
    done = n_batches = 0
    wait = 0.0
    t_start = time.perf_counter()

    def finish(batch: Batch, grams_of: Callable[[], Any]) -> None:
        nonlocal n_batches, done
        grams = grams_of()
        try:  # synchronizes: the device is done with the batch; the Grams are scratch, overwritten next time
            acc.update(grams, batch_index=batch.index, overwrite=True)
        except ActivationValueError:
            raise_non_finite(stack, batch, settings.gram_dtype)
        if reader is not None:
            reader.release(batch)
        n_batches += 1
        done += len(batch.positions)
        if progress is not None:
            progress(done if not ctx.enabled else done * total // max(own_total, 1), total)
        ctx.poll()

    # up to compute.depth minibatches in flight: on the CPU the next one's Grams are computed while this
    # thread sums the HSIC terms of the previous one. NaN/Inf activations and Gram overflow are reported by
    # the accumulator (naming layer and example), so numpy's RuntimeWarnings about them would only be noise.
    pending: deque[tuple[Batch, Callable[[], Any]]] = deque()
    with ctx.checked("computing the minibatches"), source as batches, compute, np.errstate(all="ignore"):
        batches = iter(batches)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t_wait
            if batch is None:
                break
            pending.append((batch, compute.submit(batch)))
            if len(pending) >= compute.depth:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    elapsed = time.perf_counter() - t_start
    if ctx.enabled:
        state = acc.state_dict()
        ctx.all_reduce_sum(list(state.values()))
        acc.load_state_dict(state)
        n_batches = int(acc.n_batches.sum())
    stats = acc.compute_stats(confidence=settings.confidence)
    return stats, n_batches, {"read_wait": wait, "compute": elapsed - wait}


def _pipeline(
    stack: LayerStack, plan: MinibatchPlan, settings: LoopSettings, share: tuple[int, int]
) -> tuple[HDF5BatchReader | None, Any, Any]:
    """The batch source (memory-mapped positions, or the HDF5 reader thread, also returned on its own so
    its slots can be released) and the Gram engine, both context managers."""
    engine = settings.engine or engine_for(settings.device)
    mapped = stack.mapped()
    reader = None
    if mapped is None:
        reader = HDF5BatchReader(stack, plan, share, prefetch=settings.prefetch,
                                 torch_device=settings.device if engine == "torch" else None)
    source: Any = reader if reader is not None else contextlib.nullcontext(mapped_batches(plan, share))
    compute: Any = (
        TorchGrams(stack, settings.device, settings.gram_dtype, settings.bandwidths, mapped, plan.largest)
        if engine == "torch" else NumpyGrams(stack, settings.gram_dtype, settings.bandwidths, mapped, plan.largest)
    )
    return reader, source, compute


def raise_non_finite(stack: LayerStack, batch: Batch, gram_dtype: str) -> None:
    """The accumulator found a non-finite Gram: name the layer and example holding NaN/Inf, else say the
    Grams overflowed ``gram_dtype``."""
    # the batch's arrays were centred in place (a NaN spreads over its column), so read the rows again
    for i in range(len(stack)):
        stack.read_checked(i, batch.positions)
    raise ActivationValueError(
        f"minibatch {batch.index}: the Grams overflow {gram_dtype} although the "
        "activations are finite (very large values); use --precision float64"
    )


def run_full(
    stack: LayerStack, *, debiased: bool, device: str, progress: ProgressCallback | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """Exact full-data linear CKA (biased, or debiased) of every pair of stacked layers: ``(cka, timing)``.

    Raises:
        ResourceError: the data of all selected layers exceeds :data:`FULL_DATA_BYTES`.
    """
    from ..cka.hsic import cka_linear_full

    n = stack.n
    need = n * stack.row_bytes
    if need > FULL_DATA_BYTES:
        raise ResourceError(
            f"the full-data estimator holds all {n} examples of the {len(stack)} selected layers in memory "
            f"({need / 2**30:.1f} GiB, limit {FULL_DATA_BYTES / 2**30:.0f} GiB); select fewer layers or use "
            "--estimator minibatch"
        )
    t_read = time.perf_counter()
    positions = np.arange(n)
    data: list[Any] = []
    for i in range(len(stack)):
        x = stack.read_checked(i, positions)
        if device != "cpu":
            import torch

            data.append(torch.from_numpy(x).to(device))
        else:
            data.append(x)
    t_compute = time.perf_counter()
    size = len(stack)
    cka = np.full((size, size), np.nan)
    with torch_compute() if device != "cpu" else contextlib.nullcontext():
        for i in range(size):
            for j in range(i, size):
                cka[i, j] = cka[j, i] = cka_linear_full(data[i], data[j], debiased=debiased)
            if progress is not None:
                progress(n * (i + 1) // size, n)
    return cka, {"read_wait": t_compute - t_read, "compute": time.perf_counter() - t_compute}


__all__ = ["BANDWIDTH_SAMPLE", "FULL_DATA_BYTES", "LoopSettings", "estimate_bandwidths", "raise_non_finite",
           "run_full", "run_minibatch"]
