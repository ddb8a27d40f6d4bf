"""Where a minibatch's rows come from: positions for the memory-mapped gather, or an HDF5 reader thread.

Uncompressed layers are memory-mapped (:meth:`ActivationFile.mapped_rows`): :func:`mapped_batches` yields
only the positions and the Gram engines gather the rows. Compressed (or otherwise unmappable) layers are
read by :class:`HDF5BatchReader`, a background thread that reads whole shuffle buffers chunk by chunk and
gathers each minibatch into reused arrays.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .plan import MinibatchPlan
from .stack import LayerStack, read_rows


@dataclass
class Batch:
    """One minibatch: global index, positions (into the aligned examples) and, from the HDF5 reader, its
    rows per stacked layer (views of a reused slot; empty for the memory-mapped path, whose Gram engines
    gather them)."""

    index: int
    positions: np.ndarray
    group: int = 0  # its jackknife group (MinibatchPlan.group_of)
    arrays: list[Any] = field(default_factory=list)
    slot: int = -1
    new_buffer: bool = False  # the first minibatch drawn from a new shuffle buffer (memory-mapped path)


def mapped_batches(plan: MinibatchPlan, share: tuple[int, int]) -> Iterator[Batch]:
    """The minibatches ``share`` (global indices ``[lo, hi)``) of ``plan``, positions in ascending order (the
    order inside a minibatch changes no HSIC_1 value; ascending rows are copied block by block).
    ``new_buffer`` marks the first minibatch of each shuffle buffer: the blocks of the buffers before it
    are not read again in this epoch, so the engine unmaps the pages read so far
    (:meth:`LayerStack.release_mapped`)."""
    offsets = plan.offsets
    for epoch, first, last in plan.epochs_of(share):
        order, ends = plan.epoch_order(epoch)
        buffer = -1
        for k in range(first, last):
            current = int(np.searchsorted(ends, offsets[k], side="right"))  # the buffer this minibatch starts in
            index = epoch * plan.per_epoch + k
            yield Batch(
                index=index,
                positions=np.sort(order[offsets[k] : offsets[k + 1]]),
                group=plan.group_of(index),
                new_buffer=current != buffer,
            )
            buffer = current


@dataclass
class _Buffer:
    start: int
    end: int
    local: np.ndarray  # shuffled order -> row of `data`
    data: list[np.ndarray] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)  # the full-size arrays `data` are views of


class HDF5BatchReader:
    """Background thread: reads shuffle buffers through HDF5 and yields minibatches through a bounded queue.

    Minibatches are gathered into a fixed set of reused arrays, ``prefetch + 2`` slots, because allocating
    and first-touching fresh memory for every minibatch costs more than the copy itself: numpy arrays, or
    torch tensors when ``torch_device`` is given (pinned host memory for a CUDA device, so the copy to it is
    asynchronous). The consumer hands a slot back with :meth:`release` once the device is done with it.
    Per-layer reads and gathers run on a small thread pool (numpy releases the GIL while copying).
    """

    _DONE = object()

    def __init__(
        self,
        stack: LayerStack,
        plan: MinibatchPlan,
        share: tuple[int, int],
        *,
        prefetch: int,
        torch_device: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.stack, self.plan, self.share = stack, plan, share
        self.torch_device = torch_device
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self.n_slots = max(1, prefetch) + 2
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(self.n_slots):
            self.free.put(slot)
        self.slots: list[list[Any]] = []
        self.workers = workers or max(1, min(8, (os.cpu_count() or 1), len(stack)))
        self.spare: list[list[np.ndarray]] = []  # arrays of finished shuffle buffers, reused by the next ones
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cka-reader", daemon=True)

    def __enter__(self) -> HDF5BatchReader:
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

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, batch: Batch) -> None:
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
        """Read the rows of one shuffle buffer (sorted, so chunks are read in order) of every layer."""
        ordered = np.sort(positions)
        alignment, layers = self.stack.alignment, self.stack.layers
        rows_of: dict[int, tuple[np.ndarray, bool]] = {}
        for k, rows in enumerate(alignment.rows):
            rows_of[k] = (ordered, True) if rows is None else (rows[ordered], k == 0)

        # reuse the arrays of a finished buffer: on many machines fresh pages cost more than the copy
        fits = [i for i, d in enumerate(self.spare) if d[0].shape[0] >= len(ordered)]
        if fits:
            spare = self.spare.pop(fits[0])
        else:
            spare = [np.empty((len(ordered), layer.features), dtype=layer.dtype) for layer in layers]

        def read(k: int) -> np.ndarray:
            layer = layers[k]
            rows, is_sorted = rows_of[layer.file]
            return read_rows(self.stack.files[layer.file], layer.name, rows, is_sorted, out=spare[k][: len(ordered)])

        data = list(pool.map(read, range(len(layers))))
        return _Buffer(start=start, end=end, local=np.searchsorted(ordered, positions), data=data, arrays=spare)

    def _slot(self, slot: int, rows: int) -> list[Any]:
        while len(self.slots) <= slot:
            self.slots.append([])
        if not self.slots[slot] or self.slots[slot][0].shape[0] < rows:
            layers = self.stack.layers
            if self.torch_device is not None:
                import torch

                pin = self.torch_device.startswith("cuda")
                self.slots[slot] = [
                    torch.empty((rows, layer.features), dtype=getattr(torch, layer.dtype), pin_memory=pin)
                    for layer in layers
                ]
            else:
                self.slots[slot] = [np.empty((rows, layer.features), dtype=layer.dtype) for layer in layers]
        return self.slots[slot]

    def _batches(self, pool: Any) -> Iterator[Batch | None]:
        plan, offsets = self.plan, self.plan.offsets
        for epoch, first, last in plan.epochs_of(self.share):
            # this process's minibatches of the epoch: a contiguous run of the shuffled order, so it reads
            # only the rows of its own minibatches (whole buffers only where its run covers them)
            row_lo, row_hi = int(offsets[first]), int(offsets[last])
            order, ends = plan.epoch_order(epoch)
            loaded: deque[_Buffer] = deque()
            next_buffer = int(np.searchsorted(ends, row_lo, side="right"))
            for local_index in range(first, last):
                start, end = int(offsets[local_index]), int(offsets[local_index + 1])
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
                arrays = [x[: end - start] for x in self._slot(slot, plan.largest)]
                self._gather(pool, loaded, start, end, arrays)
                index = epoch * plan.per_epoch + local_index
                yield Batch(
                    index=index, positions=order[start:end], group=plan.group_of(index), arrays=arrays, slot=slot
                )

    def _gather(self, pool: Any, loaded: deque[_Buffer], start: int, end: int, arrays: list[Any]) -> None:
        """Copy the minibatch ``[start, end)`` of the shuffled order out of the loaded buffers into ``arrays``."""
        pieces = []
        filled = 0
        for buf in loaded:
            lo, hi = max(start, buf.start), min(end, buf.end)
            if lo < hi:
                pieces.append((buf, buf.local[lo - buf.start : hi - buf.start], filled))
                filled += hi - lo

        def gather(k: int) -> None:
            out = arrays[k].numpy() if self.torch_device is not None else arrays[k]
            for buf, rows, at in pieces:  # np.take is several times faster than data[rows]
                np.take(buf.data[k], rows, axis=0, out=out[at : at + len(rows)])

        list(pool.map(gather, range(len(arrays))))


__all__ = ["Batch", "HDF5BatchReader", "mapped_batches"]
