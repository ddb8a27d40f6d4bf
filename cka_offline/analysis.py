"""Compare the layers of activation files with CKA: files -> aligned minibatches -> accumulator -> result.

:func:`analyze` opens every file, aligns their example ids, cuts the examples into random minibatches
(:func:`plan_minibatches`), reads them on a background thread while the Grams and HSIC sums are computed on
the device, and returns a :class:`~cka_offline.results.CKAResult`.

All selected layers of all files are stacked into one list of ``L`` layers and fed to one
:class:`~cka_offline.cka.accumulator.MinibatchCKA`, so each file's Grams are computed once per minibatch and
shared by every pair of files; a pair's CKA matrix is a block of the ``L x L`` result. One file is compared
with itself (the matrix is symmetric by construction).

What is random (docs paragraph, kept in step with :func:`plan_minibatches`)
---------------------------------------------------------------------------
Only the *composition and order of the minibatches* is random; which examples are used is not (all aligned
examples are used exactly once per epoch). Positions ``0..n-1`` index the aligned examples in the order of
the first file. Epoch ``e`` (``0 <= e < epochs``) draws everything from ``numpy.random.default_rng(seed + e)``:
(1) the positions are cut into consecutive blocks of ``block_rows`` positions (the first file's HDF5 chunk
rows, so a block is one chunk read; fewer when one chunk of all selected layers exceeds the buffer budget,
``buffer_bytes``, 256 MiB by default) and the order of the blocks is shuffled (``rng.permutation``);
(2) consecutive shuffled blocks are grouped ``buffer_blocks`` at a time (8, or enough for two minibatches,
as far as the budget allows) into a shuffle buffer and the positions inside each buffer are shuffled
(``rng.permutation``); (3) the concatenated shuffled positions
are cut into ``k = max(1, min(ceil(n / m), n // 4))`` consecutive minibatches whose sizes differ by at most
one (the first ``n mod k`` have one more), so no minibatch has fewer than 4 examples (the unbiased HSIC_1
needs 4) and none more than ``m`` unless ``m < 8``. Minibatches are numbered globally across epochs; minibatch
``b`` goes to jackknife group ``b mod n_groups``. The CKA estimate does not depend on the order in which
minibatches are processed, only on their composition. ``block_rows`` and ``buffer_blocks`` are recorded in
the result's ``params`` so a run can be reproduced exactly; with the RBF kernel, the bandwidth sample of
up to 1000 positions is drawn with ``numpy.random.default_rng([seed, 1]).choice(n, k, replace=False)``.

Several processes (``torchrun``, :mod:`cka_offline.distributed`): every rank forms the same plan; of the
``B`` minibatches of all epochs, rank ``r`` of ``K`` processes the contiguous run ``r*B//K .. (r+1)*B//K - 1``
(:func:`own_minibatches`) and reads only their rows; jackknife groups stay ``b mod n_groups`` by global index,
so after the sums are all-reduced every rank holds the single-process sums (up to float64 summation order).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import __version__
from .errors import (
    ActivationValueError,
    AlignmentError,
    DeviceError,
    DistributedError,
    InsufficientDataError,
    ResourceError,
)
from .distributed import Distributed
from .results import CKAResult, FileInfo

if TYPE_CHECKING:
    from .store.reader import ActivationFile

log = logging.getLogger(__name__)

KERNELS = ("linear", "rbf")
PRECISIONS = ("float32", "float64")
ESTIMATORS = ("minibatch", "full", "full-debiased")
MIN_BATCH = 4
#: examples sampled (at most) to estimate each layer's RBF bandwidth
BANDWIDTH_SAMPLE = 1000
#: preferred number of chunk-aligned blocks in one shuffle buffer
BUFFER_BLOCKS = 8
#: memory the shuffle buffer may use for all layers of all files together
BUFFER_BYTES = 256 * 2**20
#: memory the full-data estimators may use to hold the data of all selected layers
FULL_DATA_BYTES = 4 * 2**30

ProgressCallback = Callable[[int, int], None]



# ====================================================================== the minibatch plan
def batch_sizes(n: int, m: int) -> list[int]:
    """Sizes of the minibatches one epoch of ``n`` examples is cut into, for batch size ``m``.

    ``k = max(1, min(ceil(n / m), n // 4))`` minibatches whose sizes differ by at most one, larger ones
    first. No size is below 4 when ``n >= 4``; sizes exceed ``m`` only when ``m < 8`` would otherwise leave
    a minibatch smaller than 4.
    """
    if n < MIN_BATCH:
        raise InsufficientDataError(
            f"CKA needs at least {MIN_BATCH} examples (the unbiased HSIC_1 is undefined below), got {n}"
        )
    if m < MIN_BATCH:
        raise InsufficientDataError(f"batch size must be at least {MIN_BATCH} (unbiased HSIC_1), got {m}; use -m 256")
    k = max(1, min(math.ceil(n / m), n // MIN_BATCH))
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def _epoch_order(n: int, seed: int, epoch: int, block_rows: int, buffer_blocks: int) -> tuple[np.ndarray, list[int]]:
    """Shuffled positions of one epoch and the end offsets (into them) of its shuffle buffers."""
    rng = np.random.default_rng(seed + epoch)
    n_blocks = math.ceil(n / block_rows)
    blocks = rng.permutation(n_blocks)
    parts: list[np.ndarray] = []
    ends: list[int] = []
    done = 0
    for start in range(0, n_blocks, buffer_blocks):
        rows = np.concatenate(
            [np.arange(b * block_rows, min(n, (b + 1) * block_rows)) for b in blocks[start : start + buffer_blocks]]
        )
        parts.append(rows[rng.permutation(len(rows))])
        done += len(rows)
        ends.append(done)
    return np.concatenate(parts), ends


def plan_minibatches(
    n: int,
    m: int = 256,
    *,
    seed: int = 0,
    epochs: int = 1,
    block_rows: int = 1024,
    buffer_blocks: int = BUFFER_BLOCKS,
) -> list[np.ndarray]:
    """The minibatches :func:`analyze` forms: a list (all epochs, in global minibatch order) of int64 arrays
    of positions into the aligned examples (``0..n-1`` in the first file's order).

    See the module docstring ("What is random") for the exact procedure; :func:`batch_sizes` for the sizes.
    ``block_rows`` and ``buffer_blocks`` are the values recorded in ``CKAResult.params``.
    """
    _check_plan_args(epochs, block_rows, buffer_blocks)
    sizes = batch_sizes(n, m)
    out: list[np.ndarray] = []
    for epoch in range(epochs):
        order, _ = _epoch_order(n, seed, epoch, block_rows, buffer_blocks)
        out.extend(np.split(order, np.cumsum(sizes)[:-1]))
    return out


def _check_plan_args(epochs: int, block_rows: int, buffer_blocks: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if block_rows < 1 or buffer_blocks < 1:
        raise ValueError(f"block_rows and buffer_blocks must be >= 1, got {block_rows} and {buffer_blocks}")


# ====================================================================== alignment
@dataclass
class _Alignment:
    ids: np.ndarray  # the aligned example ids, in the first file's order
    rows: list[np.ndarray | None]  # per file: row of each aligned example, None = identity


def _describe_ids(ids: np.ndarray, limit: int = 3) -> str:
    from .store.writer import format_id  # error path only: keeps h5py out of this module's import

    shown = ", ".join(format_id(x) for x in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def align_ids(id_lists: Sequence[np.ndarray], labels: Sequence[str], *, intersect: bool = False) -> _Alignment:
    """Match the example ids of every file to the first file's.

    Same ids in the same order: identity. Same set in another order: row maps. Different sets: AlignmentError
    saying how many ids each side lacks (with examples), unless ``intersect`` (then the common ids, in the
    first file's order).
    """
    ref = np.asarray(id_lists[0])
    kinds = {np.asarray(ids).dtype.kind in "iu" for ids in id_lists}
    if len(kinds) > 1:
        kind = ["integers" if np.asarray(i).dtype.kind in "iu" else "strings" for i in id_lists]
        raise AlignmentError(
            "example ids are integers in some files and strings in others ("
            + ", ".join(f"{lab}: {k}" for lab, k in zip(labels, kind))
            + "); extract all files from the same inputs"
        )
    if intersect:
        common = ref
        for ids in id_lists[1:]:
            common = common[np.isin(common, ids)]
        ref_rows: np.ndarray | None = None if len(common) == len(ref) else np.flatnonzero(np.isin(ref, common))
        if ref_rows is not None:
            log.info("using the %d example ids common to all files (%d in %s)", len(common), len(ref), labels[0])
    else:
        common, ref_rows = ref, None
        for ids, label in zip(id_lists[1:], labels[1:]):
            ids = np.asarray(ids)
            if len(ids) == len(ref) and np.array_equal(ids, ref):
                continue
            only_ref = ref[~np.isin(ref, ids)]
            only_other = ids[~np.isin(ids, ref)]
            if len(only_ref) or len(only_other):
                raise AlignmentError(
                    f"{labels[0]} and {label} hold different examples: {len(only_ref)} id(s) of {labels[0]} are "
                    f"missing from {label} (e.g. {_describe_ids(only_ref) or '-'}), {len(only_other)} id(s) of "
                    f"{label} are missing from {labels[0]} (e.g. {_describe_ids(only_other) or '-'}); extract both "
                    "from the same inputs, or use the common examples with --intersection"
                )
    rows: list[np.ndarray | None] = [ref_rows]
    for ids in id_lists[1:]:
        ids = np.asarray(ids)
        if len(ids) == len(common) and np.array_equal(ids, common):
            rows.append(None)
            continue
        sorter = np.argsort(ids, kind="stable")
        rows.append(sorter[np.searchsorted(ids, common, sorter=sorter)].astype(np.int64))
    return _Alignment(ids=common, rows=rows)


# ====================================================================== devices and options
#: device files whose presence means a GPU driver is loaded (NVIDIA, WSL2's GPU bridge, AMD ROCm)
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


def _gpu_driver_present() -> bool:
    """Whether CUDA could be available, without importing torch (about a second): no GPU driver, no CUDA."""
    import sys

    if "torch" in sys.modules:  # already paid for: ask torch
        return True
    return any(os.path.exists(p) for p in _GPU_DRIVER_FILES)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; checks that a requested CUDA device exists.

    ``cpu``, and ``auto`` on a machine without a GPU driver, are answered without importing torch: the
    CPU analysis runs on numpy alone.

    Raises:
        DeviceError: CUDA requested but not available, or the index is out of range.
    """
    text = (device or "auto").strip().lower()
    if text == "cpu" or (text == "auto" and not _gpu_driver_present()):
        return "cpu"
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
                "no GPU or a CPU-only build); use --device cpu"
            )
        if ":" in text:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"device {device!r}: expected cuda:N with an integer N") from None
            if not 0 <= index < torch.cuda.device_count():
                raise DeviceError(
                    f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist "
                    f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
                )
        return text
    raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def check_options(
    *, batch_size: int, epochs: int, kernel: str, rbf_fraction: float, precision: str, estimator: str, n_groups: int
) -> None:
    """Validate option values and combinations; raises ValueError with the fix (the CLI shows it as usage)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if estimator != "minibatch" and kernel != "linear":
        raise ValueError(f"the {estimator} estimator supports the linear kernel only; use --kernel linear")
    if not (math.isfinite(rbf_fraction) and rbf_fraction > 0):
        raise ValueError(f"rbf fraction must be a number > 0, got {rbf_fraction}")
    if batch_size < MIN_BATCH:
        raise ValueError(f"batch size must be at least {MIN_BATCH} (unbiased HSIC_1), got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if n_groups < 2:
        raise ValueError(f"n_groups must be at least 2 for a jackknife standard error, got {n_groups}")


# ====================================================================== the streaming reader
@dataclass
class _Layer:
    file: int
    name: str
    features: int
    dtype: str  # stored dtype, float32 or float16

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


@dataclass
class _Batch:
    index: int
    positions: np.ndarray
    arrays: list[Any]  # per stacked layer: numpy array (CPU) or pinned torch tensor (CUDA), views of a reused slot
    slot: int = -1
    new_buffer: bool = False  # the first minibatch drawn from a new shuffle buffer (memory-mapped path)


@dataclass
class _Buffer:
    start: int
    end: int
    local: np.ndarray  # shuffled order -> row of `data`
    data: list[np.ndarray] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)  # the full-size arrays `data` are views of


def _read_rows(
    f: "ActivationFile", layer: str, rows: np.ndarray, sorted_rows: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``rows`` of ``layer`` in that order (into ``out`` when given); contiguous runs of sorted rows
    are read as slices."""
    if sorted_rows:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        if len(breaks) < 16:
            starts = np.concatenate([[0], breaks])
            stops = np.concatenate([breaks, [len(rows)]])
            if out is not None:
                for a, b in zip(starts, stops):
                    f.read(layer, int(rows[a]), int(rows[b - 1]) + 1, out=out[a:b])
                return out
            parts = [f.read(layer, int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
    data = f.read_rows(layer, rows)
    if out is not None:
        np.copyto(out, data)
        return out
    return data


class _Reader:
    """Background thread: reads shuffle buffers and yields minibatches through a bounded queue.

    Minibatches are gathered into a fixed set of reused arrays (pinned tensors for CUDA), ``prefetch + 2`` slots,
    because allocating and first-touching fresh memory for every minibatch costs more than the copy itself.
    The consumer hands a slot back with :meth:`release` once the device is done with it. Per-layer reads
    and gathers run on a small thread pool (numpy releases the GIL while copying).
    """

    _DONE = object()

    def __init__(
        self,
        files: Sequence["ActivationFile"],
        layers: Sequence[_Layer],
        alignment: _Alignment,
        *,
        batch_size: int,
        seed: int,
        epochs: int,
        block_rows: int,
        buffer_blocks: int,
        pin: bool,
        tensors: bool | None = None,
        prefetch: int,
        workers: int | None = None,
        own: tuple[int, int] | None = None,
    ) -> None:
        self.files, self.layers, self.alignment = files, layers, alignment
        self.own = own  # global minibatch indices [lo, hi) this process handles; None: all
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.block_rows, self.buffer_blocks, self.pin = block_rows, buffer_blocks, pin
        self.tensors = pin if tensors is None else tensors  # slots are torch tensors (for the torch path)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self.n_slots = max(1, prefetch) + 2
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(self.n_slots):
            self.free.put(slot)
        self.slots: list[list[Any]] = []
        self.workers = workers or max(1, min(8, (os.cpu_count() or 1), len(layers)))
        self.spare: list[list[np.ndarray]] = []  # arrays of finished shuffle buffers, reused by the next ones
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cka-reader", daemon=True)

    def __enter__(self) -> "_Reader":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, batch: _Batch) -> None:
        """The consumer (and the device) no longer needs ``batch``'s memory."""
        if batch.slot >= 0:
            self.free.put(batch.slot)
            batch.slot = -1

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _take_slot(self) -> int | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cka-read") as pool:
                for batch in self._batches(pool):
                    if batch is None or not self._put(batch):
                        return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it with its traceback
            self._put(exc)

    def _load(self, pool: Any, positions: np.ndarray, start: int, end: int) -> _Buffer:
        ordered = np.sort(positions)
        rows_of: dict[int, tuple[np.ndarray, bool]] = {}
        for k, rows in enumerate(self.alignment.rows):
            rows_of[k] = (ordered, True) if rows is None else (rows[ordered], k == 0)

        # reuse the arrays of a finished buffer: on many machines fresh pages cost more than the copy
        fits = [i for i, d in enumerate(self.spare) if d[0].shape[0] >= len(ordered)]
        if fits:
            spare = self.spare.pop(fits[0])
        else:
            spare = [np.empty((len(ordered), layer.features), dtype=layer.dtype) for layer in self.layers]

        def read(k: int) -> np.ndarray:
            layer = self.layers[k]
            rows, is_sorted = rows_of[layer.file]
            return _read_rows(self.files[layer.file], layer.name, rows, is_sorted, out=spare[k][: len(ordered)])

        data = list(pool.map(read, range(len(self.layers))))
        return _Buffer(start=start, end=end, local=np.searchsorted(ordered, positions), data=data, arrays=spare)

    def _slot(self, slot: int, rows: int) -> list[Any]:
        while len(self.slots) <= slot:
            self.slots.append([])
        if not self.slots[slot] or self.slots[slot][0].shape[0] < rows:
            if self.tensors:  # CUDA: pinned host memory, so the copy to the device is asynchronous
                import torch

                self.slots[slot] = [
                    torch.empty((rows, layer.features), dtype=getattr(torch, layer.dtype), pin_memory=self.pin)
                    for layer in self.layers
                ]
            else:
                self.slots[slot] = [np.empty((rows, layer.features), dtype=layer.dtype) for layer in self.layers]
        return self.slots[slot]

    def _batches(self, pool: Any) -> Iterator[_Batch | None]:
        n = len(self.alignment.ids)
        sizes = batch_sizes(n, self.batch_size)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        largest = max(sizes)
        for epoch, first, last in _own_epochs(self.own, len(sizes), self.epochs):
            # this process's minibatches of the epoch: a contiguous run of the shuffled order, so it reads
            # only the rows of its own minibatches (whole buffers only where its run covers them)
            row_lo, row_hi = int(offsets[first]), int(offsets[last])
            order, ends = _epoch_order(n, self.seed, epoch, self.block_rows, self.buffer_blocks)
            loaded: deque[_Buffer] = deque()
            next_buffer = int(np.searchsorted(ends, row_lo, side="right"))
            for local_index in range(first, last):
                start, end = int(offsets[local_index]), int(offsets[local_index + 1])
                size = end - start
                while not loaded or loaded[-1].end < end:
                    b_start = max(ends[next_buffer - 1] if next_buffer else 0, row_lo)
                    b_end = min(ends[next_buffer], row_hi)
                    loaded.append(self._load(pool, order[b_start:b_end], b_start, b_end))
                    next_buffer += 1
                while loaded[0].end <= start:
                    self.spare.append(loaded.popleft().arrays)
                slot = self._take_slot()
                if slot is None:
                    yield None
                    return
                arrays = [x[:size] for x in self._slot(slot, largest)]
                pieces = []
                filled = 0
                for buf in loaded:
                    lo, hi = max(start, buf.start), min(end, buf.end)
                    if lo < hi:
                        pieces.append((buf, buf.local[lo - buf.start : hi - buf.start], filled))
                        filled += hi - lo

                def gather(k: int) -> None:
                    out = arrays[k].numpy() if self.tensors else arrays[k]
                    for buf, rows, at in pieces:  # np.take is several times faster than data[rows]
                        np.take(buf.data[k], rows, axis=0, out=out[at : at + len(rows)])

                list(pool.map(gather, range(len(self.layers))))
                index = epoch * len(sizes) + local_index
                yield _Batch(index=index, positions=order[start:end], arrays=arrays, slot=slot)


# ====================================================================== analyze
def analyze(
    files: Sequence[str | os.PathLike[str] | Sequence[str]],
    *,
    layers: Sequence[str] | None = None,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    batch_size: int = 256,
    epochs: int = 1,
    seed: int = 0,
    kernel: str = "linear",
    rbf_fraction: float = 0.5,
    precision: str = "float32",
    device: str = "auto",
    estimator: str = "minibatch",
    intersect: bool = False,
    n_groups: int = 16,
    confidence: float = 0.95,
    allow_external: bool = False,
    progress: ProgressCallback | None = None,
    buffer_bytes: int = BUFFER_BYTES,
    prefetch: int = 4,
    hash_files: bool = True,
    distributed: Distributed | None = None,
) -> CKAResult:
    """CKA between the layers of one or more activation files.

    One file is compared with itself; two or more are compared pairwise in one pass (every file's Grams
    are computed once per minibatch and shared by all pairs). See the module docstring for exactly what is
    random; :func:`plan_minibatches` reproduces the minibatches.

    Args:
        files: activation files; each a path, a glob of shard files or a list of shard paths.
        layers: layer names or glob patterns selecting the layers of every file (default: all layers).
        layers_a: selection for the first file (overrides ``layers`` there).
        layers_b: selection for the second and every further file (overrides ``layers`` there).
        batch_size: examples per minibatch ``m`` (>= 4); the tail is spread so no minibatch is below 4.
        epochs: passes over the data, each with its own shuffle (epoch ``e`` uses ``seed + e``).
        seed: seed of the shuffle and of the RBF bandwidth sample.
        kernel: ``linear`` or ``rbf``.
        rbf_fraction: RBF bandwidth = this fraction of the median pairwise distance in a sample of up to
            1000 examples, estimated once per layer (default 0.5, as in Kornblith et al. 2019's experiments).
        precision: Gram dtype, ``float32`` or ``float64``; HSIC sums are float64 always.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        estimator: ``minibatch`` (default), ``full`` (exact biased full-data CKA) or ``full-debiased``.
        intersect: compare the examples common to all files instead of requiring identical sets.
        n_groups: jackknife groups for standard errors (minibatch ``b`` goes to group ``b % n_groups``).
        confidence: level of the reported interval.
        allow_external: read files holding external HDF5 links (refused by default).
        progress: called as ``progress(examples_done, examples_total)`` after each minibatch.
        buffer_bytes: memory the shuffle buffer may take (all layers of all files).
        prefetch: minibatches the reader thread may hold ready.
        hash_files: compute the SHA-256 of every file (on a background thread) for the result.
        distributed: this process's place in a torchrun run (:func:`cka_offline.distributed.init`): each
            rank processes a contiguous share of the minibatches and the sums are all-reduced, so every
            rank returns the single-process result (up to float64 summation order; ``progress`` is called
            on rank 0 only; each rank hashes a share of the files). ``None``: one process.

    Raises:
        AlignmentError: the files hold different examples (and ``intersect`` is false).
        LayerSelectionError: a layer name or pattern matches nothing.
        InsufficientDataError: fewer than 4 (common) examples.
        ActivationValueError: NaN or Inf in the activations (names the file, layer and example id).
        DeviceError: CUDA requested but not available.
        ResourceError: the full-data estimator does not fit in memory.
        FormatError and subclasses: a file is not a valid, complete activation file.
        DistributedError: another rank failed, sees other files, or the full-data estimator was asked for
            with several ranks.
    """
    from .store.reader import open_activations

    check_options(
        batch_size=batch_size, epochs=epochs, kernel=kernel, rbf_fraction=rbf_fraction, precision=precision,
        estimator=estimator, n_groups=n_groups,
    )
    if not files:
        raise ValueError("analyze() needs at least one activation file")
    t0 = time.perf_counter()
    ctx = distributed if distributed is not None else Distributed()
    labels = _labels(files)
    opened: list[ActivationFile] = []
    hasher: _Hasher | None = None
    try:
        with ctx.checked("opening the files"):
            if ctx.enabled and estimator != "minibatch":
                raise DistributedError(
                    f"the {estimator} estimator runs in one process (it holds all examples in memory); "
                    "run it without torchrun, or use --estimator minibatch"
                )
            dev = resolve_device(device)
            for spec in files:
                opened.append(open_activations(_as_paths(spec), allow_external=allow_external))
            if hash_files:  # several ranks: each hashes its share of the files
                paths = list(dict.fromkeys(p for f in opened for p in f.paths))
                hasher = _Hasher(paths[ctx.rank :: ctx.world_size])
            selected = _select(opened, labels, layers, layers_a, layers_b)
            alignment = align_ids([f.ids for f in opened], labels, intersect=intersect)
            n = len(alignment.ids)
            if n < MIN_BATCH:
                what = "common to all files" if intersect else "in"
                raise InsufficientDataError(
                    f"CKA needs at least {MIN_BATCH} examples (the unbiased HSIC_1 is undefined below); "
                    f"{n} example(s) {what} {', '.join(labels)}; extract at least {MIN_BATCH} examples"
                )
            stacked = [
                _Layer(k, name, f.layer(name).features, f.layer(name).dtype)
                for k, (f, names) in enumerate(zip(opened, selected))
                for name in names
            ]
            warnings: list[str] = []
            params: dict[str, Any] = {
                "batch_size": int(batch_size), "epochs": int(epochs), "seed": int(seed), "kernel": kernel,
                "rbf_fraction": float(rbf_fraction) if kernel == "rbf" else None, "precision": precision,
                "device": dev, "estimator": estimator, "n_groups": int(n_groups), "intersect": bool(intersect),
                "confidence": float(confidence),
            }
            if ctx.enabled:
                params["world_size"] = ctx.world_size
            bandwidths: list[float] | None = None
            if estimator == "minibatch":
                row_bytes = sum(layer.features * layer.itemsize for layer in stacked)
                block_rows, buffer_blocks = _buffer_shape(opened[0].chunk_rows, row_bytes, batch_size, buffer_bytes)
                params.update(block_rows=block_rows, buffer_blocks=buffer_blocks)
                if kernel == "rbf":
                    bandwidths = _bandwidths(opened, stacked, alignment, labels, seed, rbf_fraction, warnings)
        if ctx.enabled:
            ctx.agree("data", _fingerprint(opened, stacked, params),
                      ("example ids", "layers", "file versions", "shuffle blocks"))
            # one bandwidth for all: a median computed on another GPU model could round differently
            bandwidths = ctx.broadcast(bandwidths)
        if estimator == "minibatch":
            if bandwidths is not None:
                params["bandwidths"] = _per_file(bandwidths, stacked, labels)
            stats, n_batches, timing = _run_minibatch(
                opened, stacked, alignment, labels, batch_size=batch_size, seed=seed, epochs=epochs,
                block_rows=block_rows, buffer_blocks=buffer_blocks, device=dev, gram_dtype=precision,
                bandwidths=bandwidths, n_groups=n_groups, confidence=confidence, progress=progress,
                prefetch=prefetch, distributed=ctx,
            )
            cka, se, low, high, degenerate = stats.cka, stats.se, stats.low, stats.high, set(stats.degenerate_layers)
            if stats.n_groups < 2:
                warnings.append(
                    f"only {n_batches} minibatch(es) of {n} examples: no standard errors or intervals (NaN); "
                    "use a smaller batch size (-m) or more examples"
                )
            if bandwidths is not None:
                degenerate |= {i for i, bw in enumerate(bandwidths) if math.isnan(bw)}
        else:
            cka, timing = _run_full(
                opened, stacked, alignment, labels, debiased=estimator == "full-debiased", device=dev,
                progress=progress,
            )
            se = low = high = np.full_like(cka, np.nan)
            n_batches = 0
            degenerate = {i for i in range(len(stacked)) if math.isnan(cka[i, i])}
        for i in sorted(degenerate):
            layer = stacked[i]
            cka[i, :] = cka[:, i] = np.nan
            for arr in (se, low, high):
                arr[i, :] = arr[:, i] = np.nan
            message = (
                f"layer {layer.name!r} of {labels[layer.file]} is constant over the examples, so its CKA is "
                "undefined (NaN)"
            )
            if message not in warnings:
                warnings.append(message)
                log.warning(message)
        timing["total"] = time.perf_counter() - t0
        infos = [
            FileInfo(label=labels[k], paths=list(f.paths), layers=list(selected[k]), provenance=dict(f.provenance),
                     sha256=[], n_examples=int(f.n_examples))
            for k, f in enumerate(opened)
        ]
        if hasher is not None:
            t_hash = time.perf_counter()
            with ctx.checked("hashing the files"):
                digests = hasher.result()
            digests = {path: digest for part in ctx.gather(digests) for path, digest in part.items()}
            timing["hash_wait"] = time.perf_counter() - t_hash
            for info in infos:
                info.sha256 = [digests[p] for p in info.paths]
        pairs = [(0, 0)] if len(opened) == 1 else [(i, j) for i in range(len(opened)) for j in range(i + 1, len(opened))]
        return CKAResult(
            files=infos, cka=cka, se=se, low=low, high=high, pairs=pairs, params=params, n_examples=n,
            n_minibatches=n_batches, timing=timing, warnings=warnings, version=__version__, confidence=confidence,
        )
    finally:
        if hasher is not None:
            hasher.cancel()
        for f in opened:
            f.close()


def _as_paths(spec: str | os.PathLike[str] | Sequence[str]) -> str | list[str]:
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    return [os.fspath(p) for p in spec]


def _labels(files: Sequence[Any]) -> list[str]:
    labels: list[str] = []
    for spec in files:
        if isinstance(spec, (str, os.PathLike)):
            label = os.fspath(spec)
        else:
            items = [os.fspath(p) for p in spec]
            label = items[0] + (f" (+{len(items) - 1} shards)" if len(items) > 1 else "")
        base, k = label, 2
        while label in labels:
            label, k = f"{base} #{k}", k + 1
        labels.append(label)
    return labels


def _select(
    opened: Sequence["ActivationFile"],
    labels: Sequence[str],
    layers: Sequence[str] | None,
    layers_a: Sequence[str] | None,
    layers_b: Sequence[str] | None,
) -> list[list[str]]:
    from .selection import select_layers

    out = []
    for k, f in enumerate(opened):
        own = layers_a if k == 0 else layers_b
        patterns = own if own is not None else layers
        out.append(list(select_layers(f.layer_names, list(patterns) if patterns else None, what="layer",
                                      where=labels[k], hint=f"list them with cka-inspect {labels[k]}")))
    return out


def _buffer_shape(chunk_rows: int, row_bytes: int, batch_size: int, budget: int) -> tuple[int, int]:
    """``(block_rows, buffer_blocks)``: chunk-aligned blocks, as many per buffer as the budget allows
    (8, or enough for two minibatches), at least one; a chunk larger than the budget is split."""
    row_bytes = max(1, row_bytes)
    block_rows = max(1, int(chunk_rows))
    if block_rows * row_bytes > budget:
        block_rows = max(MIN_BATCH, budget // row_bytes)
    want = max(BUFFER_BLOCKS, math.ceil(2 * batch_size / block_rows))
    fits = max(1, budget // (block_rows * row_bytes))
    return block_rows, int(min(want, fits))


def _per_file(values: Sequence[float], stacked: Sequence[_Layer], labels: Sequence[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {label: {} for label in labels}
    for value, layer in zip(values, stacked):
        out[labels[layer.file]][layer.name] = None if math.isnan(value) else float(value)
    return out


def _read_aligned(f: "ActivationFile", layer: str, alignment: _Alignment, k: int, positions: np.ndarray) -> np.ndarray:
    rows = alignment.rows[k]
    if rows is None:
        return _read_rows(f, layer, positions, True)
    return _read_rows(f, layer, rows[positions], k == 0)


def _check_finite(x: np.ndarray, positions: np.ndarray, layer: _Layer, label: str, ids: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        from .store.writer import format_id

        row = int(np.flatnonzero(bad.any(axis=1))[0])
        value = x[row][bad[row]][0]
        raise ActivationValueError(
            f"{label}: layer {layer.name!r} holds {value} for example id {format_id(ids[positions[row]])} "
            f"({int(bad.any(axis=1).sum())} example(s) in this minibatch affected); CKA needs finite activations -- "
            "fix the model or inputs and extract again"
        )


def _bandwidths(
    files: Sequence["ActivationFile"], stacked: Sequence[_Layer], alignment: _Alignment, labels: Sequence[str],
    seed: int, fraction: float, warnings: list[str],
) -> list[float]:
    from .cka.hsic import rbf_bandwidth

    n = len(alignment.ids)
    size = min(n, BANDWIDTH_SAMPLE)
    positions = np.sort(np.random.default_rng([seed, 1]).choice(n, size=size, replace=False))
    out = []
    for layer in stacked:
        x = _read_aligned(files[layer.file], layer.name, alignment, layer.file, positions)
        _check_finite(x, positions, layer, labels[layer.file], alignment.ids)
        if np.all(x == x[:1]):
            out.append(math.nan)  # constant: CKA undefined; reported with the other constant layers
            continue
        out.append(rbf_bandwidth(x, fraction))
    return out


def _fingerprint(files: Sequence["ActivationFile"], stacked: Sequence[_Layer], params: dict[str, Any]) -> tuple[Any, ...]:
    """What every rank must agree on before splitting the minibatches: ids, layers, file versions, blocks."""
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        ids = np.asarray(f.ids)
        digest.update(ids.tobytes() if ids.dtype.kind in "iuSU" else "\0".join(map(str, ids)).encode())
        digest.update(b"|")
    layers = tuple((layer.file, layer.name, layer.features, layer.dtype) for layer in stacked)
    versions = tuple((f.n_examples, str(f.provenance.get("created", ""))) for f in files)
    blocks = (params.get("block_rows"), params.get("buffer_blocks"))
    return digest.hexdigest(), layers, versions, blocks


def own_minibatches(n_batches: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global minibatch indices ``[lo, hi)`` that rank ``rank`` of ``world_size`` processes: contiguous runs
    of equal length (+-1), so each rank reads only its part of the shuffled order."""
    return rank * n_batches // world_size, (rank + 1) * n_batches // world_size


def _run_minibatch(
    files: Sequence["ActivationFile"], stacked: Sequence[_Layer], alignment: _Alignment, labels: Sequence[str], *,
    batch_size: int, seed: int, epochs: int, block_rows: int, buffer_blocks: int, device: str,
    gram_dtype: str, bandwidths: Sequence[float] | None, n_groups: int, confidence: float,
    progress: ProgressCallback | None, prefetch: int, distributed: Distributed | None = None,
) -> tuple[Any, int, dict[str, float]]:
    """The minibatch loop.

    CPU: numpy throughout (no torch import). Each layer's work for a minibatch -- gather its rows, centre
    them, one syrk for the Gram -- is a task for a pool of one thread per core, each running single-threaded
    BLAS; rows come straight from memory-mapped files (:meth:`ActivationFile.mapped_rows`) when the layers
    are stored uncompressed, else from the background HDF5 reader. Independent tasks on separate cores beat
    one multi-threaded BLAS call per layer, whose threads wait for each other at every step (badly so on a
    busy machine), and the gathered rows are still in cache for the product.
    CUDA: rows are gathered the same way (or read by the background HDF5 reader) into pinned tensors,
    copied to the device once per minibatch; the next minibatch is gathered while the device computes.
    """
    from .cka.accumulator import MinibatchCKA

    ctx = distributed if distributed is not None else Distributed()
    n = len(alignment.ids)
    total = n * epochs
    sizes = batch_sizes(n, batch_size)
    own = own_minibatches(len(sizes) * epochs, ctx.rank, ctx.world_size)
    # rank 0 draws the bar for everyone, scaling its own share up to the total (the ranks run in step)
    own_total = sum(sizes[i % len(sizes)] for i in range(*own))
    if not ctx.is_main:
        progress = None
    acc = MinibatchCKA(n_layers=len(stacked), n_groups=n_groups)
    on_cuda = device.startswith("cuda")
    use_torch = _uses_torch(device)
    mapped = _mapped_layers(files, stacked)
    plan = dict(batch_size=batch_size, seed=seed, epochs=epochs, block_rows=block_rows, buffer_blocks=buffer_blocks)
    done = n_batches = 0
    wait = 0.0
    t_start = time.perf_counter()
    if mapped is not None:
        source: Any = contextlib.nullcontext(_mapped_batches(n, own=own if ctx.enabled else None, **plan))
    else:
        source = _Reader(files, stacked, alignment, pin=on_cuda, tensors=use_torch, prefetch=prefetch,
                         own=own if ctx.enabled else None, **plan)
    compute = _TorchGrams(files, stacked, alignment, device, gram_dtype, bandwidths, mapped, max(sizes), on_cuda) if (
        use_torch) else _NumpyGrams(files, stacked, alignment, gram_dtype, bandwidths, mapped, max(sizes))
    # NaN/Inf activations and Gram overflow are reported by the accumulator (naming layer and example), so
    # numpy's RuntimeWarnings about them would only be noise
    def finish(batch: _Batch, grams_of: Callable[[], Any]) -> None:
        nonlocal n_batches, done
        grams = grams_of()
        try:  # synchronizes: the device is done with the batch; the Grams are scratch, overwritten next time
            acc.update(grams, batch_index=batch.index, overwrite=True)
        except ActivationValueError:
            _raise_non_finite(files, batch, stacked, labels, alignment, gram_dtype)
        if isinstance(source, _Reader):
            source.release(batch)
        n_batches += 1
        done += len(batch.positions)
        if progress is not None:
            progress(done if not ctx.enabled else done * total // max(own_total, 1), total)
        ctx.poll()

    # up to compute.depth minibatches in flight: on the CPU the next one's Grams are computed while this
    # thread sums the HSIC terms of the previous one
    pending: deque[tuple[_Batch, Callable[[], Any]]] = deque()
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
    stats = acc.compute_stats(confidence=confidence)
    return stats, n_batches, {"read_wait": wait, "compute": elapsed - wait}


def _mapped_layers(files: Sequence["ActivationFile"], stacked: Sequence[_Layer]) -> list[Any] | None:
    """Every stacked layer's memory-mapped rows, or None when any layer needs HDF5 to be read."""
    out = []
    for layer in stacked:
        rows = files[layer.file].mapped_rows(layer.name)
        if rows is None:
            log.info("layer %r of %s is stored compressed or unusually: reading through HDF5",
                     layer.name, files[layer.file].path)
            return None
        out.append(rows)
    return out


def _own_epochs(own: tuple[int, int] | None, per_epoch: int, epochs: int) -> Iterator[tuple[int, int, int]]:
    """``(epoch, first, last)`` for every epoch holding some of this process's minibatches: the epoch's own
    minibatch indices are ``first..last-1``; ``own`` is the global range ``[lo, hi)`` (None: all)."""
    lo, hi = own if own is not None else (0, per_epoch * epochs)
    for epoch in range(epochs):
        first, last = max(lo - epoch * per_epoch, 0), min(hi - epoch * per_epoch, per_epoch)
        if first < last:
            yield epoch, first, last


def _mapped_batches(
    n: int, *, batch_size: int, seed: int, epochs: int, block_rows: int, buffer_blocks: int,
    own: tuple[int, int] | None,
) -> Iterator[_Batch]:
    """The minibatches of :func:`plan_minibatches` this process handles (``own``: global indices
    ``[lo, hi)``), positions in ascending order (the order inside a minibatch changes no HSIC_1 value;
    ascending rows are copied block by block). Arrays are left empty: the compute tasks gather them.
    ``new_buffer`` marks the first minibatch of each shuffle buffer: the blocks of the buffers before it
    are not read again in this epoch, so the compute unmaps the pages read so far (:func:`_release`)."""
    sizes = batch_sizes(n, batch_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for epoch, first, last in _own_epochs(own, len(sizes), epochs):
        order, ends = _epoch_order(n, seed, epoch, block_rows, buffer_blocks)
        buffer = -1
        for k in range(first, last):
            current = int(np.searchsorted(ends, offsets[k], side="right"))  # the buffer this minibatch starts in
            yield _Batch(index=epoch * len(sizes) + k, positions=np.sort(order[offsets[k] : offsets[k + 1]]),
                         arrays=[], new_buffer=current != buffer)
            buffer = current


#: environment variables that set the number of compute threads, first found wins
THREAD_VARIABLES = ("CKA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_threads() -> int:
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


class _NumpyGrams:
    """CPU Grams of one minibatch: one task per layer (gather, centre, syrk) on a pool of one thread per
    core, each with single-threaded BLAS (``threadpoolctl``); the largest layers go first. With fewer
    layers than cores, the spare cores go to BLAS threads instead. Buffers are allocated once and reused.
    Each new shuffle buffer unmaps the pages read from the files so far (:func:`_release`), so resident
    memory stays flat however large the files are."""

    def __init__(self, files: Sequence["ActivationFile"], stacked: Sequence[_Layer], alignment: _Alignment,
                 gram_dtype: str, bandwidths: Sequence[float] | None, mapped: list[Any] | None, largest: int) -> None:
        self.files, self.stacked, self.alignment = files, stacked, alignment
        self.gram_dtype, self.bandwidths = gram_dtype, bandwidths
        self.mapped = mapped
        cores = _blas_threads()
        self.workers = max(1, min(cores, len(stacked)))
        self.blas_threads = max(1, cores // self.workers)
        self.order = sorted(range(len(stacked)), key=lambda i: -stacked[i].features)
        self.largest = largest
        self.scratch: dict[int, list[np.ndarray]] = {}  # per buffer set (depth of them): one per layer
        self.grams: dict[tuple[int, int], np.ndarray] = {}
        self.submitted = 0

    def __enter__(self) -> "_NumpyGrams":
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(self.blas_threads, user_api="blas")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cka-gram")
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._limits.restore_original_limits()

    #: minibatches in flight: the next one's tasks run while the caller sums the previous one's HSIC terms
    depth = 2

    def submit(self, batch: _Batch) -> Callable[[], np.ndarray]:
        """Start the Gram tasks of ``batch``; the returned function waits for them and gives the Grams
        ``(L, m, m)`` (valid until ``depth`` more minibatches are submitted)."""
        m = len(batch.positions)
        slot = self.submitted % self.depth
        self.submitted += 1
        grams = self.grams.get((slot, m))
        if grams is None:  # float64: each task converts its Gram, so the caller's HSIC sums need no copy
            grams = self.grams[(slot, m)] = np.empty((len(self.stacked), m, m), dtype=np.float64)
        if self.mapped is not None and batch.new_buffer:
            _release(self.files)
        if self.mapped is not None and slot not in self.scratch:
            self.scratch[slot] = [np.empty((self.largest, layer.features), dtype=layer.dtype) for layer in self.stacked]
        scratch = self.scratch.get(slot)

        def task(i: int) -> None:
            if self.mapped is not None:
                x = _gather(self.mapped[i], self.alignment, self.stacked[i], batch.positions, scratch[i][:m])
            else:
                x = batch.arrays[i]
            _gram_into(grams, i, x, self.gram_dtype, self.bandwidths)

        futures = [self._pool.submit(task, i) for i in self.order]

        def result() -> np.ndarray:
            for future in futures:
                future.result()
            return grams

        return result


def _gram_into(grams: Any, i: int, x: Any, gram_dtype: str, bandwidths: Sequence[float] | None) -> None:
    """Layer ``i``'s Gram of the minibatch rows ``x`` (this batch's scratch copy: centred in place) into
    ``grams[i]``: linear, or RBF with the layer's recorded bandwidth; a constant layer (NaN bandwidth) gets a
    zero Gram, whose zero self-HSIC marks it undefined."""
    from .cka.hsic import gram_linear, gram_rbf

    if bandwidths is None:
        grams[i] = gram_linear(x, dtype=gram_dtype, inplace=True)
    elif math.isnan(bandwidths[i]):
        grams[i] = 0.0
    else:
        grams[i] = gram_rbf(x, bandwidths[i], dtype=gram_dtype)


def _uses_torch(device: str) -> bool:
    """Whether the minibatch loop runs on torch (CUDA devices) rather than numpy (the CPU)."""
    return device.startswith("cuda")


def _release(files: Sequence["ActivationFile"]) -> None:
    """Unmap the file pages read so far: the kernel maps pages around every page read (several times what a
    random subset of rows needs), and mapped file pages count as resident memory. Called when a minibatch
    starts a new shuffle buffer, so at most about one buffer's blocks are mapped at a time, whatever the
    file size; safe while other threads read (they map the pages again)."""
    for f in files:
        f.release_mapped()


def _gather(rows_of: Any, alignment: _Alignment, layer: _Layer, positions: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows of the aligned examples ``positions`` of one stacked layer, from its memory-mapped rows, into ``out``."""
    rows = alignment.rows[layer.file]
    return rows_of.gather(positions if rows is None else rows[positions], out)


class _TorchGrams:
    """CUDA Grams of one minibatch: each layer's rows in pinned host memory (gathered from the memory maps
    by a thread per core, or filled by the HDF5 reader thread), copied to the device, Grams computed there.
    Two minibatches are in flight: the next one is gathered while the device works on the last."""

    def __init__(self, files: Sequence["ActivationFile"], stacked: Sequence[_Layer], alignment: _Alignment,
                 device: str, gram_dtype: str, bandwidths: Sequence[float] | None, mapped: list[Any] | None,
                 largest: int, pin: bool) -> None:
        self.files, self.stacked, self.alignment, self.device = files, stacked, alignment, device
        self.gram_dtype, self.bandwidths = gram_dtype, bandwidths
        self.mapped, self.largest, self.pin = mapped, largest, pin
        self.slots: dict[int, list[Any]] = {}
        self.submitted = 0
        self._compute = _torch_compute(True)

    def __enter__(self) -> "_TorchGrams":
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(_blas_threads(), thread_name_prefix="cka-gather") if self.mapped else None
        self._compute.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        try:
            if exc[0] is None and self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
        finally:
            self._compute.__exit__(*exc)
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    #: the slot of a minibatch is reused two minibatches later, after the caller has synchronized on it
    depth = 2

    def submit(self, batch: _Batch) -> Callable[[], Any]:
        grams = self._grams(batch)
        return lambda: grams

    def _arrays(self, batch: _Batch) -> list[Any]:
        if self.mapped is None:
            return batch.arrays
        import torch

        if batch.new_buffer:
            _release(self.files)
        slot = self.submitted % self.depth
        self.submitted += 1
        if slot not in self.slots:
            self.slots[slot] = [
                torch.empty((self.largest, layer.features), dtype=getattr(torch, layer.dtype), pin_memory=self.pin)
                for layer in self.stacked
            ]
        m = len(batch.positions)
        arrays = [t[:m] for t in self.slots[slot]]
        futures = [self._pool.submit(_gather, self.mapped[i], self.alignment, layer, batch.positions, arrays[i].numpy())
                   for i, layer in enumerate(self.stacked)]
        for future in futures:
            future.result()
        return arrays

    def _grams(self, batch: _Batch) -> Any:
        import torch

        m = len(batch.positions)
        grams = torch.empty((len(self.stacked), m, m), dtype=getattr(torch, self.gram_dtype), device=self.device)
        for i, x in enumerate(self._arrays(batch)):
            _gram_into(grams, i, x.to(self.device, non_blocking=True), self.gram_dtype, self.bandwidths)
        return grams


@contextlib.contextmanager
def _torch_compute(on_cuda: bool) -> Iterator[None]:
    """For torch (CUDA): no autograd, and float32 Grams kept float32: TF32
    (``set_float32_matmul_precision("high")``, which another library in the process may have set) rounds
    the factors to 10-bit mantissas. Restored afterwards. Nothing for the numpy path."""
    if not on_cuda:
        yield
        return
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _raise_non_finite(
    files: Sequence["ActivationFile"], batch: _Batch, stacked: Sequence[_Layer], labels: Sequence[str],
    alignment: _Alignment, gram_dtype: str,
) -> None:
    # the batch's arrays were centred in place (a NaN spreads over its column), so read the rows again
    for layer in stacked:
        x = _read_aligned(files[layer.file], layer.name, alignment, layer.file, batch.positions)
        _check_finite(x, batch.positions, layer, labels[layer.file], alignment.ids)
    raise ActivationValueError(
        f"minibatch {batch.index}: the Grams overflow {gram_dtype} although the "
        "activations are finite (very large values); use --precision float64"
    )


def _run_full(
    files: Sequence["ActivationFile"], stacked: Sequence[_Layer], alignment: _Alignment, labels: Sequence[str], *,
    debiased: bool, device: str, progress: ProgressCallback | None,
) -> tuple[np.ndarray, dict[str, float]]:
    from .cka.hsic import cka_linear_full

    n = len(alignment.ids)
    need = n * sum(layer.features * layer.itemsize for layer in stacked)
    if need > FULL_DATA_BYTES:
        raise ResourceError(
            f"the full-data estimator holds all {n} examples of the {len(stacked)} selected layers in memory "
            f"({need / 2**30:.1f} GiB, limit {FULL_DATA_BYTES / 2**30:.0f} GiB); select fewer layers or use "
            "--estimator minibatch"
        )
    t_read = time.perf_counter()
    positions = np.arange(n)
    data = []
    for layer in stacked:
        x = _read_aligned(files[layer.file], layer.name, alignment, layer.file, positions)
        _check_finite(x, positions, layer, labels[layer.file], alignment.ids)
        if device != "cpu":
            import torch

            x = torch.from_numpy(x).to(device)
        data.append(x)
    t_compute = time.perf_counter()
    size = len(stacked)
    cka = np.full((size, size), np.nan)
    with _torch_compute(device != "cpu"):
        for i in range(size):
            for j in range(i, size):
                cka[i, j] = cka[j, i] = cka_linear_full(data[i], data[j], debiased=debiased)
            if progress is not None:
                progress(n * (i + 1) // size, n)
    return cka, {"read_wait": t_compute - t_read, "compute": time.perf_counter() - t_compute}


class _Hasher:
    """SHA-256 of files on a background thread, overlapping the analysis; digests of unchanged files are
    remembered between runs (:mod:`cka_offline.digests`)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cka-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from .digests import file_sha256

        try:
            for path in self.paths:
                digest = file_sha256(path, cancelled=self._cancel.is_set)
                if digest is None:
                    return
                self.digests[path] = digest
        except BaseException as exc:
            self.error = exc

    def result(self) -> dict[str, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def cancel(self) -> None:
        self._cancel.set()


__all__ = ["analyze", "plan_minibatches", "own_minibatches", "batch_sizes", "align_ids", "resolve_device", "check_options"]
