"""The minibatch plan: which aligned examples form each minibatch, in every epoch, for every process.

What is random (kept in step with the README's math section)
------------------------------------------------------------
Only the *composition of the minibatches* and their jackknife groups are random; which examples are used is
not (all aligned examples are used exactly once per epoch). The plan depends only on the aligned example
ids, the seed, ``m``, the number of epochs and ``n_groups``: never on the order the files store their rows
in, on chunk sizes, or on which other files or layers are in the pass. Examples are numbered by *rank*:
rank ``r`` is the ``r``-th smallest aligned id (:attr:`MinibatchPlan.canonical` maps ranks to positions in
the first file's order).

``shuffle="uniform"`` (the default). One epoch is cut into ``k = max(1, min(ceil(n / m), n // 4))``
minibatches whose sizes differ by at most one (the first ``n mod k`` have one more; :func:`batch_sizes`),
so no minibatch has fewer than 4 examples (the unbiased HSIC_1 needs 4) and none more than ``m`` unless
``m < 8``. ``G = min(n_groups, k)`` jackknife groups (``min(n_groups, k // 2)`` with several epochs, so that a group
holds at least two minibatches that each epoch mixes anew): minibatch ``j`` of every epoch belongs to group
``j mod G``, and group ``g`` owns as many examples as its minibatches hold. (1) The examples are dealt to the
groups once, for all epochs: ``numpy.random.default_rng([seed, 2]).permutation(n)`` cut into the groups'
sizes, group 0 first. (2) Epoch ``e`` draws ``rng = numpy.random.default_rng([seed, 3, e])`` and, group by
group (``g = 0..G-1``), shuffles the group's examples with ``rng.permutation`` and cuts them, in that order,
into its minibatches ``j = g, g + G, g + 2G, ...``. In one epoch the minibatches are therefore a uniformly
random partition of all examples; over several epochs the same example stays in one jackknife group, so the
delete-a-group jackknife leaves out all minibatches of a set of examples and stays honest for ``epochs > 1``.

``shuffle="blocks"`` (opt-in, for data that does not fit in the page cache: it reads whole chunks). The
positions (first file's order) are cut into consecutive blocks of ``block_rows`` and epoch ``e`` draws
everything from ``numpy.random.default_rng(seed + e)``: the order of the blocks is shuffled, consecutive
blocks are grouped ``buffer_blocks`` at a time into a shuffle buffer whose positions are shuffled, and the
concatenation is cut into the ``k`` minibatches; minibatch ``b`` (numbered across epochs) goes to jackknife
group ``b mod n_groups``. Minibatches then come from a few chunks each: when the rows are stored in class
order the estimate is biased (the analysis warns).

With the RBF kernel, each layer's bandwidth comes from the examples of ranks
``numpy.random.default_rng([seed, 1]).choice(n, min(n, 1000), replace=False)``.

Several processes (``torchrun``, :mod:`cka_offline.distributed`): every rank forms the same plan; of the
``B`` minibatches of all epochs, rank ``r`` of ``K`` processes the contiguous run ``r*B//K .. (r+1)*B//K - 1``
(:meth:`MinibatchPlan.share`) and reads only their rows; jackknife groups are those of the global minibatch
index, so after the sums are all-reduced every rank holds the single-process sums (up to float64 summation
order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InsufficientDataError
from .options import BUFFER_BYTES, MAPPED_BYTES, MIN_BATCH, SHUFFLES

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
        seed, epochs: the seeds of every random draw derive from ``seed`` (module docstring).
        n_groups: jackknife groups asked for; :attr:`groups` is how many the plan can form.
        shuffle: ``uniform`` (default) or ``blocks``.
        block_rows, buffer_blocks: ``blocks``: the shuffle's chunk-aligned blocks and blocks per buffer
            (recorded in ``CKAResult.params``). ``uniform``: ``buffer_blocks`` is the number of minibatches
            after which the memory-mapped pages read so far are released (no effect on the numbers).
        canonical: position (first file's order) of each rank (``r``-th smallest id); None: ranks are positions.
    """

    n: int
    batch_size: int
    seed: int = 0
    epochs: int = 1
    block_rows: int = 1024
    buffer_blocks: int = BUFFER_BLOCKS
    n_groups: int = 16
    shuffle: str = "uniform"
    canonical: np.ndarray | None = field(default=None, repr=False, compare=False)
    sizes: tuple[int, ...] = field(init=False, repr=False)
    offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.block_rows < 1 or self.buffer_blocks < 1:
            raise ValueError(
                f"block_rows and buffer_blocks must be >= 1, got {self.block_rows} and {self.buffer_blocks}"
            )
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {self.shuffle!r}; use one of {', '.join(SHUFFLES)}")
        if self.n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {self.n_groups}")
        sizes = tuple(batch_sizes(self.n, self.batch_size))
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @classmethod
    def for_data(
        cls,
        n: int,
        *,
        batch_size: int,
        seed: int,
        epochs: int,
        chunk_rows: int,
        row_bytes: int,
        buffer_bytes: int | None,
        n_groups: int = 16,
        shuffle: str = "uniform",
        canonical: np.ndarray | None = None,
    ) -> MinibatchPlan:
        """The plan :func:`cka_offline.analyze` forms. ``blocks``: blocks from the first file's chunk rows,
        buffers as large as ``buffer_bytes`` allows for rows of ``row_bytes`` (all selected layers of all
        files; default 256 MiB). ``uniform``: the mapped pages are released after every ``buffer_bytes`` of
        minibatches (default: once an epoch when all the data is at most ``MAPPED_BYTES``, else 256 MiB)."""
        if shuffle == "blocks":
            budget = BUFFER_BYTES if buffer_bytes is None else buffer_bytes
            block_rows, buffer_blocks = buffer_shape(chunk_rows, row_bytes, batch_size, budget)
        else:
            block_rows = 1
            if buffer_bytes is None:
                buffer_bytes = n * row_bytes if n * row_bytes <= MAPPED_BYTES else BUFFER_BYTES
            largest = max(batch_sizes(n, batch_size))
            buffer_blocks = max(1, buffer_bytes // max(1, largest * row_bytes))
        return cls(
            n,
            batch_size,
            seed=seed,
            epochs=epochs,
            block_rows=block_rows,
            buffer_blocks=buffer_blocks,
            n_groups=n_groups,
            shuffle=shuffle,
            canonical=canonical,
        )

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

    @property
    def groups(self) -> int:
        """Jackknife groups the plan forms. ``uniform``: a group owns the examples of whole minibatches, so
        at most the minibatches of one epoch, and with several epochs at most half of them (a group of one
        minibatch would repeat the same minibatch every epoch). ``blocks``: at most the minibatches of all
        epochs."""
        if self.shuffle == "blocks":
            return min(self.n_groups, self.n_minibatches)
        return max(1, min(self.n_groups, self.per_epoch // (1 if self.epochs == 1 else 2)))

    def group_of(self, index: int) -> int:
        """The jackknife group of global minibatch ``index``."""
        if self.shuffle == "uniform":
            return (index % self.per_epoch) % self.groups
        return index % self.n_groups

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """Positions of one epoch, minibatch after minibatch (cut at :attr:`offsets`), and the end offsets
        (into them) of its shuffle buffers (``uniform``: where the mapped pages are released)."""
        if self.shuffle == "blocks":
            return self._block_order(epoch)
        rng = np.random.default_rng([self.seed, 3, epoch])
        k, n_groups = self.per_epoch, self.groups
        parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * k
        for g, members in enumerate(self._members()):
            shuffled = members[rng.permutation(len(members))]
            mine = range(g, k, n_groups)
            for j, part in zip(mine, np.split(shuffled, np.cumsum([self.sizes[j] for j in mine])[:-1])):
                parts[j] = part
        ranks = np.concatenate(parts)
        order = ranks if self.canonical is None else np.asarray(self.canonical)[ranks]
        ends = [
            int(self.offsets[min(k, i)]) for i in range(self.buffer_blocks, k + self.buffer_blocks, self.buffer_blocks)
        ]
        return order, ends

    def _members(self) -> list[np.ndarray]:
        """The ranks each jackknife group owns (``uniform``)."""
        cached = self.__dict__.get("_members_cache")
        if cached is None:
            k, n_groups = self.per_epoch, self.groups
            owned = [sum(self.sizes[j] for j in range(g, k, n_groups)) for g in range(n_groups)]
            perm = np.random.default_rng([self.seed, 2]).permutation(self.n)
            cached = np.split(perm, np.cumsum(owned)[:-1])
            self.__dict__["_members_cache"] = cached
        return cached

    def _block_order(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        n, block_rows = self.n, self.block_rows
        rng = np.random.default_rng(self.seed + epoch)
        n_blocks = math.ceil(n / block_rows)
        blocks = rng.permutation(n_blocks)
        parts: list[np.ndarray] = []
        ends: list[int] = []
        done = 0
        for start in range(0, n_blocks, self.buffer_blocks):
            rows = np.concatenate(
                [
                    np.arange(b * block_rows, min(n, (b + 1) * block_rows))
                    for b in blocks[start : start + self.buffer_blocks]
                ]
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

    def sample(self, size: int = 1000) -> np.ndarray:
        """Positions (ascending) of up to ``size`` examples drawn by ``default_rng([seed, 1])`` over the ranks:
        the RBF bandwidth sample."""
        ranks = np.random.default_rng([self.seed, 1]).choice(self.n, size=min(self.n, size), replace=False)
        return np.sort(ranks if self.canonical is None else np.asarray(self.canonical)[ranks])

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
    n_groups: int = 16,
    shuffle: str = "uniform",
    ids: np.ndarray | None = None,
    block_rows: int = 1024,
    buffer_blocks: int = BUFFER_BLOCKS,
) -> list[np.ndarray]:
    """The minibatches :func:`cka_offline.analyze` forms: a list (all epochs, in global minibatch order) of
    int64 arrays of positions into the aligned examples (``0..n-1`` in the first file's order).

    ``ids``: the aligned ids (``CKAResult`` does not store them; the files do), which fix the ranks; None:
    ranks are positions. ``block_rows`` and ``buffer_blocks``: for ``shuffle="blocks"``, the values recorded
    in ``CKAResult.params``.
    """
    canonical = None if ids is None else canonical_order(ids)
    return MinibatchPlan(
        n,
        m,
        seed=seed,
        epochs=epochs,
        block_rows=block_rows,
        buffer_blocks=buffer_blocks,
        n_groups=n_groups,
        shuffle=shuffle,
        canonical=canonical,
    ).minibatches()


def canonical_order(ids: np.ndarray) -> np.ndarray:
    """Position of each rank: ``canonical[r]`` is the position of the ``r``-th smallest id (ids are unique)."""
    return np.argsort(np.asarray(ids), kind="stable").astype(np.int64)


def own_minibatches(n_batches: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global minibatch indices ``[lo, hi)`` that rank ``rank`` of ``world_size`` processes: contiguous runs
    of equal length (+-1), so each rank reads only its part of the shuffled order."""
    return rank * n_batches // world_size, (rank + 1) * n_batches // world_size


__all__ = [
    "BUFFER_BLOCKS",
    "MinibatchPlan",
    "batch_sizes",
    "buffer_shape",
    "canonical_order",
    "own_minibatches",
    "plan_minibatches",
]
