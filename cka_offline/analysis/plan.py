"""The minibatch plan: which aligned examples form each minibatch, in every epoch, for every process.

What is random (kept in step with the README's math section)
------------------------------------------------------------
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
(:meth:`MinibatchPlan.share`) and reads only their rows; jackknife groups stay ``b mod n_groups`` by global
index, so after the sums are all-reduced every rank holds the single-process sums (up to float64 summation
order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import InsufficientDataError
from .options import BUFFER_BYTES, MIN_BATCH

#: preferred number of chunk-aligned blocks in one shuffle buffer
BUFFER_BLOCKS = 8


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


def buffer_shape(chunk_rows: int, row_bytes: int, batch_size: int, budget: int = BUFFER_BYTES) -> tuple[int, int]:
    """``(block_rows, buffer_blocks)``: chunk-aligned blocks, as many per buffer as the budget allows
    (8, or enough for two minibatches), at least one; a chunk larger than the budget is split."""
    row_bytes = max(1, row_bytes)
    block_rows = max(1, int(chunk_rows))
    if block_rows * row_bytes > budget:
        block_rows = max(MIN_BATCH, budget // row_bytes)
    want = max(BUFFER_BLOCKS, math.ceil(2 * batch_size / block_rows))
    fits = max(1, budget // (block_rows * row_bytes))
    return block_rows, int(min(want, fits))


@dataclass(frozen=True)
class MinibatchPlan:
    """The minibatches of an analysis (see the module docstring for exactly what is random).

    Attributes:
        n: aligned examples.
        batch_size: ``m``; :func:`batch_sizes` gives the sizes of one epoch's minibatches.
        seed, epochs: epoch ``e`` shuffles with ``numpy.random.default_rng(seed + e)``.
        block_rows, buffer_blocks: the shuffle's blocks and buffers (recorded in ``CKAResult.params``).
    """

    n: int
    batch_size: int
    seed: int = 0
    epochs: int = 1
    block_rows: int = 1024
    buffer_blocks: int = BUFFER_BLOCKS
    sizes: tuple[int, ...] = field(init=False, repr=False)
    offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.block_rows < 1 or self.buffer_blocks < 1:
            raise ValueError(
                f"block_rows and buffer_blocks must be >= 1, got {self.block_rows} and {self.buffer_blocks}"
            )
        sizes = tuple(batch_sizes(self.n, self.batch_size))
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(sizes)]))

    @classmethod
    def for_data(
        cls, n: int, *, batch_size: int, seed: int, epochs: int, chunk_rows: int, row_bytes: int, buffer_bytes: int
    ) -> "MinibatchPlan":
        """The plan :func:`cka_offline.analyze` forms: blocks from the first file's chunk rows, buffers as
        large as ``buffer_bytes`` allows for rows of ``row_bytes`` (all selected layers of all files)."""
        block_rows, buffer_blocks = buffer_shape(chunk_rows, row_bytes, batch_size, buffer_bytes)
        return cls(n, batch_size, seed=seed, epochs=epochs, block_rows=block_rows, buffer_blocks=buffer_blocks)

    @property
    def per_epoch(self) -> int:
        """Minibatches in one epoch."""
        return len(self.sizes)

    @property
    def n_minibatches(self) -> int:
        """Minibatches of all epochs."""
        return self.per_epoch * self.epochs

    @property
    def largest(self) -> int:
        return max(self.sizes)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """Shuffled positions of one epoch and the end offsets (into them) of its shuffle buffers."""
        n, block_rows = self.n, self.block_rows
        rng = np.random.default_rng(self.seed + epoch)
        n_blocks = math.ceil(n / block_rows)
        blocks = rng.permutation(n_blocks)
        parts: list[np.ndarray] = []
        ends: list[int] = []
        done = 0
        for start in range(0, n_blocks, self.buffer_blocks):
            rows = np.concatenate(
                [np.arange(b * block_rows, min(n, (b + 1) * block_rows)) for b in blocks[start : start + self.buffer_blocks]]
            )
            parts.append(rows[rng.permutation(len(rows))])
            done += len(rows)
            ends.append(done)
        return np.concatenate(parts), ends

    def minibatches(self) -> list[np.ndarray]:
        """Every minibatch (all epochs, in global minibatch order) as an int64 array of positions."""
        out: list[np.ndarray] = []
        for epoch in range(self.epochs):
            order, _ = self.epoch_order(epoch)
            out.extend(np.split(order, self.offsets[1:-1]))
        return out

    def share(self, rank: int, world_size: int) -> tuple[int, int]:
        """Global minibatch indices ``[lo, hi)`` that rank ``rank`` of ``world_size`` processes."""
        return own_minibatches(self.n_minibatches, rank, world_size)

    def epochs_of(self, share: tuple[int, int]) -> Iterator[tuple[int, int, int]]:
        """``(epoch, first, last)`` for every epoch holding some of the minibatches ``share`` (global
        indices ``[lo, hi)``): the epoch's own minibatch indices are ``first..last-1``."""
        lo, hi = share
        per_epoch = self.per_epoch
        for epoch in range(self.epochs):
            first, last = max(lo - epoch * per_epoch, 0), min(hi - epoch * per_epoch, per_epoch)
            if first < last:
                yield epoch, first, last

    def examples_in(self, share: tuple[int, int]) -> int:
        """Examples in the minibatches ``share`` (global indices ``[lo, hi)``)."""
        return sum(self.sizes[i % self.per_epoch] for i in range(*share))


def plan_minibatches(
    n: int,
    m: int = 256,
    *,
    seed: int = 0,
    epochs: int = 1,
    block_rows: int = 1024,
    buffer_blocks: int = BUFFER_BLOCKS,
) -> list[np.ndarray]:
    """The minibatches :func:`cka_offline.analyze` forms: a list (all epochs, in global minibatch order) of
    int64 arrays of positions into the aligned examples (``0..n-1`` in the first file's order).

    ``block_rows`` and ``buffer_blocks`` are the values recorded in ``CKAResult.params``.
    """
    return MinibatchPlan(n, m, seed=seed, epochs=epochs, block_rows=block_rows, buffer_blocks=buffer_blocks).minibatches()


def own_minibatches(n_batches: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global minibatch indices ``[lo, hi)`` that rank ``rank`` of ``world_size`` processes: contiguous runs
    of equal length (+-1), so each rank reads only its part of the shuffled order."""
    return rank * n_batches // world_size, (rank + 1) * n_batches // world_size


__all__ = ["BUFFER_BLOCKS", "MinibatchPlan", "batch_sizes", "buffer_shape", "own_minibatches", "plan_minibatches"]
