"""The loops: stream the planned minibatches through a Gram engine into the accumulator, or compute the
exact full-data CKA; and the per-layer RBF bandwidths both kernels' paths need first."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..distributed import Distributed
from ..errors import ActivationValueError, ResourceError
from .batches import Batch, HDF5BatchReader, mapped_batches
from .grams import GramJob, NumpyGrams, TorchGrams, blas_threads, engine_for, torch_compute
from .plan import MinibatchPlan
from .stack import LayerStack

if TYPE_CHECKING:
    from ..cka.accumulator import CKAStats
    from ..cka.hsic import Blocks

ProgressCallback = Callable[[int, int], None]

#: examples sampled (at most) to estimate each layer's RBF bandwidth
BANDWIDTH_SAMPLE = 1000
#: examples sampled (at most) to find each layer's scale (linear kernel; RBF uses the bandwidth sample)
SCALE_SAMPLE = 64
#: layers whose root mean square is within 2^-20..2^20 are not rescaled
SCALE_FREE_EXPONENT = 20
#: memory the full-data estimators may use by default (their n x n Grams and scratch; ``--max-memory``)
FULL_DATA_BYTES = 8 * 2**30


@dataclass(frozen=True)
class LoopSettings:
    """How the minibatch loop runs: the resolved device, Gram dtype, per-layer RBF bandwidths (None:
    linear kernel), jackknife groups, interval level, reader prefetch, ``engine`` (``None``: the
    device's own, :func:`~cka_offline.analysis.grams.engine_for`; the tests run ``torch`` on the CPU),
    where compressed layers are decompressed for uniform minibatches, and the blocks of the ``L x L`` matrix
    whose HSIC terms are computed besides the diagonal (``None``: all; :func:`pair_blocks`)."""

    device: str
    gram_dtype: str
    bandwidths: Sequence[float] | None
    n_groups: int
    confidence: float
    prefetch: int
    engine: str | None = None
    scratch_dir: str | None = None
    scales: Sequence[float] | None = None
    blocks: Blocks | None = None


def pair_blocks(sizes: Sequence[int], all_pairs: bool = False) -> Blocks | None:
    """The blocks of the stacked ``L x L`` matrix whose HSIC terms the reported file pairs need, for files
    of ``sizes`` layers each: every file against every later one (one block per file, its rows against the
    columns of all later files: one product each), the diagonal being always computed. ``None`` (every
    pair) for one file (a self-comparison reports its whole block) or when ``all_pairs`` is asked for."""
    if all_pairs or len(sizes) < 2:
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    total = offsets[-1]
    return [((offsets[k], offsets[k + 1]), (offsets[k + 1], total)) for k in range(len(sizes) - 1)]


def layer_statistics(
    stack: LayerStack, positions: np.ndarray, rbf_fraction: float | None = None
) -> tuple[list[float], list[float] | None]:
    """From the aligned examples ``positions`` (ascending; the plan's
    :meth:`~cka_offline.analysis.plan.MinibatchPlan.sample`), each stacked layer's scale and, when
    ``rbf_fraction`` is given, its RBF bandwidth (NaN for a constant layer: its CKA is undefined).

    The scale is the power of two that brings the root mean square of the layer's centred sample into
    ``[1, 2)``, or 1 when that power is within ``2^-20..2^20`` (or the layer is constant): CKA does not
    depend on it (multiplying by a power of two is exact), but float32 Grams of a layer of scale 1e-25 would
    underflow to zero, and of 1e25 overflow, without it. The sample is gathered from the memory-mapped rows
    when the layers have them (HDF5 reads of scattered rows are slow).
    """
    from ..cka.hsic import rbf_bandwidth

    scales: list[float] = []
    bandwidths: list[float] = []
    mapped = stack.mapped()
    for i in range(len(stack)):
        if mapped is not None:
            layer = stack.layers[i]
            x = stack.gather(i, mapped[i], positions, np.empty((len(positions), layer.features), layer.dtype))
            stack.check_finite(i, x, positions)
        else:
            x = stack.read_checked(i, positions)
        centred = x.astype(np.float64)
        centred -= centred.mean(axis=0)
        rms = math.sqrt(float(np.vdot(centred, centred)) / centred.size) if centred.size else 0.0
        bandwidth = None
        if rbf_fraction is not None:
            constant = bool(np.all(x == x[:1]))  # CKA undefined; reported with the other constant layers
            bandwidth = math.nan if constant else rbf_bandwidth(x, rbf_fraction)
            bandwidths.append(bandwidth)
        # RBF: the Gram depends on x / sigma only, so the scale brings sigma (not the root mean square, which
        # a few outliers dominate) into [1, 2): -0.5 / (sigma * scale)^2 must be a float32 number too
        size = bandwidth if bandwidth is not None and math.isfinite(bandwidth) else rms
        exponent = 1 - math.frexp(size)[1] if size > 0 and math.isfinite(size) else 0
        # ordinary scales need no rescaling (and so cost no pass over the rows): float32 Grams of values of
        # root mean square 2^-20..2^20 are far from float32's limits
        scales.append(math.ldexp(1.0, exponent) if abs(exponent) > SCALE_FREE_EXPONENT else 1.0)
    return scales, bandwidths if rbf_fraction is not None else None


def estimate_bandwidths(stack: LayerStack, positions: np.ndarray, fraction: float) -> list[float]:
    """Each stacked layer's RBF bandwidth from the aligned examples ``positions`` (see :func:`layer_statistics`)."""
    bandwidths = layer_statistics(stack, positions, fraction)[1]
    assert bandwidths is not None
    return bandwidths


def run_minibatch(
    stack: LayerStack,
    plan: MinibatchPlan,
    settings: LoopSettings,
    *,
    progress: ProgressCallback | None = None,
    distributed: Distributed | None = None,
) -> tuple[CKAStats, int, dict[str, float]]:
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
    acc = MinibatchCKA(n_layers=len(stack), n_groups=settings.n_groups, blocks=settings.blocks)
    reader, source, compute = _pipeline(stack, plan, settings, share)
    done = n_batches = 0
    wait = 0.0
    t_start = time.perf_counter()

    def finish(batch: Batch, grams_of: Callable[[], Any]) -> None:
        nonlocal n_batches, done
        grams = grams_of()
        try:  # synchronizes: the device is done with the batch; the Grams are scratch, overwritten next time
            acc.update(grams, batch_index=batch.index, group=batch.group, overwrite=True)
        except ActivationValueError:
            raise_non_finite(stack, batch, settings.gram_dtype, grams)
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
    # uniform minibatches gather rows from anywhere: compressed layers are decompressed to a scratch file;
    # the block shuffle reads whole chunks, so it streams them through the HDF5 reader instead
    mapped = stack.mapped(decompress=plan.shuffle == "uniform", scratch_dir=settings.scratch_dir)
    reader = None
    if mapped is None:
        reader = HDF5BatchReader(
            stack, plan, share, prefetch=settings.prefetch, torch_device=settings.device if engine == "torch" else None
        )
    source: Any = reader if reader is not None else contextlib.nullcontext(mapped_batches(plan, share))
    job = GramJob(stack, settings.gram_dtype, settings.bandwidths, settings.scales, mapped, plan.largest)
    compute: Any = TorchGrams(job, settings.device) if engine == "torch" else NumpyGrams(job)
    return reader, source, compute


def raise_non_finite(stack: LayerStack, batch: Batch, gram_dtype: str, grams: Any = None) -> None:
    """The accumulator found a non-finite HSIC term in ``batch``: raise ActivationValueError naming the file,
    layer and example that caused it -- the first example holding NaN/Inf (file order), or, when the
    activations are finite, the layer whose ``gram_dtype`` Grams overflowed and its largest example.

    ``grams``: the minibatch's Grams (numpy or torch), to tell which layers are at fault; without them every
    layer is read again."""
    from ..store.writer import format_id

    suspects = _non_finite_layers(grams, len(stack))
    # the batch's arrays were centred in place (a NaN spreads over its column), so read the rows again
    for i in suspects:
        stack.read_checked(i, batch.positions)
    for i in suspects:
        x = np.abs(stack.read(i, batch.positions).astype(np.float64))
        row = int(np.argmax(x.max(axis=1))) if x.size else 0
        layer = stack.layers[i]
        file_row = int(stack.alignment.rows_of(layer.file, np.asarray(batch.positions))[row])
        raise ActivationValueError(
            f"{stack.labels[layer.file]}: layer {layer.name!r}: its {gram_dtype} Gram matrix of minibatch "
            f"{batch.index} overflows although the activations are finite (values up to {float(x.max()):.3g}, "
            f"largest for example id {format_id(stack.alignment.ids[batch.positions[row]])}, row {file_row}); "
            "use --precision float64"
        )
    raise ActivationValueError(  # pragma: no cover - the HSIC sums overflowed float64 from finite Grams
        f"minibatch {batch.index}: the HSIC terms overflow float64 although the activations and Grams are finite; "
        "rescale the activations"
    )


def _non_finite_layers(grams: Any, n_layers: int) -> list[int]:
    """The stacked layers whose Grams hold NaN or Inf off the diagonal (all layers when that cannot be
    told)."""
    if grams is None:
        return list(range(n_layers))
    finite: Any
    if isinstance(grams, np.ndarray):
        with np.errstate(all="ignore"):
            finite = np.isfinite(grams).reshape(n_layers, -1).all(axis=1)
    else:  # a torch tensor, on its device
        import torch

        finite = torch.isfinite(grams).reshape(n_layers, -1).all(dim=1).cpu().numpy()
    bad = [i for i in range(n_layers) if not finite[i]]
    return bad or list(range(n_layers))


def run_full(
    stack: LayerStack,
    *,
    debiased: bool,
    device: str,
    bandwidths: Sequence[float] | None = None,
    max_bytes: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Exact full-data CKA (biased, or debiased) of every pair of stacked layers: ``(cka, timing)``; linear,
    or RBF with each layer's recorded bandwidth (``bandwidths``; NaN: a constant layer).

    Each layer's rows are read, its centred float64 ``n x n`` Gram built (:func:`~cka_offline.cka.hsic.full_gram`)
    into a stack and the rows dropped; all pairs' HSIC terms are then one product of the flattened stack
    (:func:`~cka_offline.cka.hsic.full_hsic`): ``L`` Gram builds, not ``L^2``. On the CPU the builds run on a
    pool of one thread per core, each with single-threaded BLAS, as the minibatch loop's do (the RBF kernel's
    elementwise work would otherwise use one core); rows are read by this thread. When the ``L`` Grams do
    not fit ``max_bytes`` (default :data:`FULL_DATA_BYTES`) with the scratch of the builds, the layers go in
    blocks: each block's Grams are built once, and each later block's again for every pair of blocks.

    Raises:
        ResourceError: not even two Grams and the scratch fit ``max_bytes``, naming ``--max-memory``.
    """
    from ..cka.hsic import cka_from_hsic, full_gram, full_hsic

    limit = FULL_DATA_BYTES if max_bytes is None else max_bytes
    n, size = stack.n, len(stack)
    cuda = device != "cpu"
    workers = 1 if cuda else max(1, min(blas_threads(), size))
    block = _full_block(stack, limit, rbf=bandwidths is not None, builds=workers)
    blocks = [list(range(lo, min(size, lo + block))) for lo in range(0, size, block)]
    builds, done = len(blocks) * (len(blocks) + 1) // 2, 0
    positions = np.arange(n)
    timing = {"read_wait": 0.0, "compute": 0.0}
    t_start = time.perf_counter()
    buffers: list[Any]
    if cuda:
        import torch

        buffers = [torch.empty((block, n, n), dtype=torch.float64, device=device) for _ in blocks[:2]]
    else:
        buffers = [np.empty((block, n, n), dtype=np.float64) for _ in blocks[:2]]
    pool: Any = None  # CPU: the thread pool of the Gram builds, started below

    def build(buffer: Any, layers: list[int]) -> Any:
        nonlocal done
        running: deque[Any] = deque()
        for k in sorted(range(len(layers)), key=lambda k: -stack.layers[layers[k]].features):  # largest first
            i = layers[k]
            t_read = time.perf_counter()
            x: Any = stack.read_checked(i, positions)
            if cuda:
                x = torch.from_numpy(x).to(device)
            timing["read_wait"] += time.perf_counter() - t_read
            sigma = None if bandwidths is None else float(bandwidths[i])
            if pool is None:
                full_gram(x, debiased=debiased, sigma=sigma, out=buffer[k])
                continue
            running.append(pool.submit(full_gram, x, debiased=debiased, sigma=sigma, out=buffer[k]))
            if len(running) >= workers:  # bounded: the rows of at most `workers` layers wait or run
                running.popleft().result()
        while running:
            running.popleft().result()
        done += 1
        if progress is not None:
            progress(n * done // builds, n)
        return buffer[: len(layers)]

    hsic = np.empty((size, size))
    with contextlib.ExitStack() as context:
        if cuda:
            context.enter_context(torch_compute())
        elif workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import threadpool_limits

            context.enter_context(threadpool_limits(max(1, blas_threads() // workers), user_api="blas"))
            pool = context.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="cka-full-gram"))
        for a, rows in enumerate(blocks):
            grams_a = build(buffers[0], rows)
            hsic[np.ix_(rows, rows)] = full_hsic(grams_a, debiased=debiased)
            for cols in blocks[a + 1 :]:
                h = full_hsic(grams_a, build(buffers[1], cols), debiased=debiased)
                hsic[np.ix_(rows, cols)] = h
                hsic[np.ix_(cols, rows)] = h.T
    del buffers
    diagonal = np.diagonal(hsic).copy()
    cka = cka_from_hsic(hsic, diagonal, diagonal)
    timing["compute"] = time.perf_counter() - t_start - timing["read_wait"]
    return cka, timing


def _full_block(stack: LayerStack, limit: int, *, rbf: bool, builds: int) -> int:
    """Layers whose Grams :func:`run_full` holds at once: all of them if they fit ``limit`` with the scratch
    of ``builds`` concurrent Gram builds (each: the widest layer's rows as stored and in float64, and
    ``n x n`` temporaries, one for linear, four for RBF), else half of what fits (two blocks are held for
    each pair of blocks)."""
    n, size = stack.n, len(stack)
    gram = 8 * n * n
    widest = max(layer.features * (layer.itemsize + 8) for layer in stack.layers)
    scratch = builds * (n * widest + (4 if rbf else 1) * gram)
    fits = max(0, limit - scratch) // gram
    if fits >= size:
        return size
    if fits >= 2:
        return int(fits // 2)
    need, whole = scratch + 2 * gram, scratch + size * gram
    raise ResourceError(
        f"the full-data estimator holds all {n} examples' {n}x{n} float64 Gram matrices in memory: two of them "
        f"and the scratch of building them need {need / 2**30:.2f} GiB, above the limit of {limit / 2**30:.2f} GiB; "
        f"raise it with --max-memory (full_max_bytes), to at least {math.ceil(need / 2**20)}M (all {size} layers "
        f"at once: {math.ceil(whole / 2**20)}M), or use --estimator minibatch"
    )


__all__ = [
    "BANDWIDTH_SAMPLE",
    "FULL_DATA_BYTES",
    "LoopSettings",
    "SCALE_SAMPLE",
    "estimate_bandwidths",
    "layer_statistics",
    "pair_blocks",
    "raise_non_finite",
    "run_full",
    "run_minibatch",
]
