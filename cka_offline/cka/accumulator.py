"""Streaming minibatch CKA: a thin holder of float64 HSIC_1 sums (Nguyen, Raghu & Kornblith 2020).

For minibatches ``b`` of ``m`` examples each and Grams ``K_{i,b}`` of layers ``i = 0..L-1``::

    CKA_ij = sum_b HSIC_1(K_{i,b}, K_{j,b}) / sqrt( sum_b HSIC_1(K_{i,b}, K_{i,b}) * sum_b HSIC_1(K_{j,b}, K_{j,b}) )

(sums over minibatches, not an average of per-minibatch CKA), with the unbiased HSIC_1 of Song et al. 2012
(:func:`cka_offline.cka.hsic.hsic1_matrix`). The sums are kept per jackknife group (``batch_index % n_groups``,
or the group the caller gives), so that a grouped leave-one-group-out jackknife gives a standard error for
every entry in bounded memory.

The state is float64 sums and int64 counts only, held as numpy arrays on the host (``L x L`` per group:
kilobytes, whatever the device the Grams are computed on), so merging two accumulators (two processes, two
GPUs, two halves of a dataset) is addition, and summing every array of :meth:`MinibatchCKA.state_dict` over
processes (``torch.distributed.all_reduce(torch.from_numpy(a), SUM)``) gives what a single process would
have computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cka_offline.cka.arrays import is_tensor, to_numpy
from cka_offline.cka.hsic import Blocks, hsic1_matrix
from cka_offline.cka.stats import student_t_ppf
from cka_offline.errors import ActivationValueError, InsufficientDataError

__all__ = ["MinibatchCKA", "CKAStats"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("hsic_sum", "n_batches", "n_examples")


@dataclass(frozen=True)
class CKAStats:
    """CKA with grouped-jackknife uncertainty; every array is numpy float64 of shape ``(L, L)``.

    ``cka``: the point estimate (:meth:`MinibatchCKA.compute`). ``se``: jackknife standard error.
    ``low``/``high``: ``cka -+ t_{G-1, (1+confidence)/2} * se``. Rows and columns of ``degenerate_layers``
    are NaN in all four. ``se``/``low``/``high`` are NaN everywhere when fewer than 2 groups hold a minibatch.
    ``n_groups``: the number of non-empty jackknife groups used (``G``).
    """

    cka: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    degenerate_layers: list[int]
    confidence: float = 0.95
    n_groups: int = 0


def _cka_from_sums(hsic: np.ndarray) -> np.ndarray:
    """CKA from summed HSIC_1 ``(..., L, L)``: ``H_ij / sqrt(H_ii H_jj)``; NaN where ``H_ii <= 0`` or ``H_jj <= 0``."""
    diag = np.diagonal(hsic, axis1=-2, axis2=-1)
    ok = diag > 0
    root = np.sqrt(np.where(ok, diag, 1.0))
    cka = hsic / (root[..., :, None] * root[..., None, :])
    valid = ok[..., :, None] & ok[..., None, :]
    return np.where(valid, cka, math.nan)


class MinibatchCKA:
    """Accumulate unbiased HSIC_1 sums between ``n_layers`` layers over minibatches; compute CKA and its SE.

    All layers of all compared files are stacked as one list of ``L = n_layers`` layers; a comparison of
    model A with model B is a block of the ``L x L`` result.

    State (numpy, on the host): ``hsic_sum`` float64 ``(n_groups, L, L)`` (per-group sums of the HSIC_1
    matrices), ``n_batches`` and ``n_examples`` int64 ``(n_groups,)``. The Grams given to :meth:`update`
    may be numpy arrays or torch tensors on any device; their pair products run there.

    Example::

        acc = MinibatchCKA(n_layers=L, n_groups=16)
        for b, batch in enumerate(batches):               # batch: list of L arrays (m, d_i)
            acc.update(np.stack([gram_linear(x) for x in batch]), batch_index=b)
        cka = acc.compute()                               # (L, L) float64 numpy
        stats = acc.compute_stats(confidence=0.95)        # CKAStats, numpy

    Multi-process: give each rank distinct ``batch_index`` values, then ``sd = acc.state_dict();
    [dist.all_reduce(torch.from_numpy(a), op=SUM) for a in sd.values()]; acc.load_state_dict(sd)``.

    ``blocks``: when given, only these blocks of the ``L x L`` matrix (``((r0, r1), (c0, c1))`` half-open
    layer ranges, and their mirror images) and the diagonal are computed per minibatch
    (:func:`~cka_offline.cka.hsic.hsic1_matrix`); the other entries are never computed: their sums stay zero
    and :meth:`compute`/:meth:`compute_stats` give NaN there (:attr:`computed` is the mask). Model A
    (layers ``0..a``) against model B (``a..L``) is ``blocks=[((0, a), (a, L))]``.
    """

    def __init__(self, n_layers: int, n_groups: int = 16, *, blocks: Blocks | None = None) -> None:
        if not (isinstance(n_layers, int) and n_layers >= 1):
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if not (isinstance(n_groups, int) and n_groups >= 1):
            raise ValueError(f"n_groups must be an int >= 1, got {n_groups!r}")
        self.n_layers = n_layers
        self.n_groups = n_groups
        self.blocks = None if blocks is None else _check_blocks(blocks, n_layers)
        #: ``(L, L)`` bool: the entries that are computed (all of them without ``blocks``)
        self.computed = np.ones((n_layers, n_layers), dtype=bool)
        if self.blocks is not None:
            self.computed[...] = np.eye(n_layers, dtype=bool)
            for (r0, r1), (c0, c1) in self.blocks:
                self.computed[r0:r1, c0:c1] = self.computed[c0:c1, r0:r1] = True
        self.hsic_sum = np.zeros((n_groups, n_layers, n_layers), dtype=np.float64)
        self.n_batches = np.zeros(n_groups, dtype=np.int64)
        self.n_examples = np.zeros(n_groups, dtype=np.int64)

    def _shape(self) -> str:
        blocks = "" if self.blocks is None else f", blocks={self.blocks}"
        return f"MinibatchCKA(n_layers={self.n_layers}, n_groups={self.n_groups}{blocks})"

    def __repr__(self) -> str:
        blocks = "" if self.blocks is None else f", blocks={self.blocks}"
        return (
            f"MinibatchCKA(n_layers={self.n_layers}, n_groups={self.n_groups}{blocks}, "
            f"batches={int(self.n_batches.sum())}, examples={int(self.n_examples.sum())})"
        )

    def update(self, grams: Any, batch_index: int, *, group: int | None = None, overwrite: bool = False) -> None:
        """Add the ``L x L`` HSIC_1 matrix of one minibatch into jackknife group ``group`` (default
        ``batch_index % n_groups``).

        ``grams``: ``(L, m, m)`` symmetric Grams of all layers for the same ``m >= 4`` examples, float32 or
        float64, a numpy array or a tensor on any device (pair products run there in float64; the ``L x L``
        result comes to the host).
        ``batch_index``: a non-negative int, distinct per minibatch (across ranks too) so groups stay balanced.
        ``group``: the minibatch's group, ``0..n_groups-1``, when the caller forms the groups itself (the
        analysis groups minibatches by the examples they hold, so that a group is a set of examples).
        ``overwrite``: the Grams are scratch (float64, C-contiguous): their diagonals may be zeroed in place
        instead of working on a float64 copy (see :func:`~cka_offline.cka.hsic.hsic1_matrix`).
        Raises InsufficientDataError for ``m < 4`` and ActivationValueError when the HSIC values are not
        finite (NaN/Inf activations); the state is left unchanged then.
        """
        if (
            not (isinstance(grams, np.ndarray) or is_tensor(grams))
            or grams.ndim != 3
            or grams.shape[0] != self.n_layers
        ):
            shape = tuple(grams.shape) if hasattr(grams, "shape") else type(grams).__name__
            raise ValueError(f"grams must have shape ({self.n_layers}, m, m), got {shape}")
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
            raise ValueError(f"batch_index must be an int >= 0, got {batch_index!r}")
        if group is None:
            group = batch_index % self.n_groups
        elif isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < self.n_groups:
            raise ValueError(f"group must be an int in 0..{self.n_groups - 1}, got {group!r}")
        hsic = to_numpy(hsic1_matrix(grams, overwrite=overwrite, blocks=self.blocks))
        if self.blocks is not None:  # the entries not computed are NaN: they add nothing to the sums
            hsic = np.where(self.computed, hsic, 0.0)
        finite = np.isfinite(hsic)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1)).tolist()
            raise ActivationValueError(
                f"minibatch {batch_index}: HSIC is NaN or Inf for layer indices {bad}; the activations "
                "hold NaN/Inf or overflow the Gram dtype (try float64 Grams); the minibatch was not added"
            )
        self.hsic_sum[group] += hsic
        self.n_batches[group] += 1
        self.n_examples[group] += grams.shape[1]

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add ``other``'s sums into this accumulator (in place) and return ``self``."""
        if not isinstance(other, MinibatchCKA):
            raise TypeError(f"can only merge a MinibatchCKA, got {type(other).__name__}")
        if (other.n_layers, other.n_groups, other.blocks) != (self.n_layers, self.n_groups, self.blocks):
            raise ValueError(
                f"cannot merge {other._shape()} into {self._shape()}: the layers, groups and computed blocks must match"
            )
        self.hsic_sum += other.hsic_sum
        self.n_batches += other.n_batches
        self.n_examples += other.n_examples
        return self

    def reset(self) -> None:
        """Zero all sums and counts."""
        self.hsic_sum[...] = 0.0
        self.n_batches[...] = 0
        self.n_examples[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state: ``hsic_sum`` float64 ``(G, L, L)``, ``n_batches``/``n_examples`` int64 ``(G,)``.

        Every value is a numpy array whose sum over processes is the merged state: sum them in place with
        ``torch.distributed.all_reduce(torch.from_numpy(a), op=ReduceOp.SUM)`` (the tensor shares the
        array's memory) and give them back to :meth:`load_state_dict`.
        """
        return {key: getattr(self, key).copy() for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state by ``state`` (as from :meth:`state_dict`; numpy arrays or CPU/GPU tensors), copied."""
        expected = {
            "hsic_sum": ((self.n_groups, self.n_layers, self.n_layers), np.float64),
            "n_batches": ((self.n_groups,), np.int64),
            "n_examples": ((self.n_groups,), np.int64),
        }
        if set(state) != set(expected):
            raise ValueError(f"state keys must be {sorted(expected)}, got {sorted(state)}")
        values = {}
        for key, (shape, dtype) in expected.items():
            value = state[key]
            array = to_numpy(value) if isinstance(value, np.ndarray) or is_tensor(value) else None
            if array is None or tuple(array.shape) != shape or array.dtype != dtype:
                got = (tuple(array.shape), str(array.dtype)) if array is not None else type(value).__name__
                raise ValueError(f"state[{key!r}] must be a {np.dtype(dtype).name} array of shape {shape}, got {got}")
            values[key] = array
        for key in _STATE_KEYS:
            getattr(self, key)[...] = values[key]

    @property
    def degenerate_layers(self) -> list[int]:
        """Indices of layers whose summed self-HSIC_1 is ``<= 0`` (e.g. a constant layer); their CKA is NaN."""
        diag = np.diagonal(self.hsic_sum.sum(axis=0))
        return np.flatnonzero(diag <= 0).tolist()

    def _check_not_empty(self) -> None:
        if int(self.n_batches.sum()) == 0:
            raise InsufficientDataError("no minibatch was added to the CKA accumulator; nothing to compute")

    def compute(self) -> np.ndarray:
        """Minibatch CKA ``(L, L)`` float64 numpy (formula in the module docstring).

        Rows and columns of :attr:`degenerate_layers` are NaN (the caller should warn, naming the layer);
        no other entry is NaN. No clamping: with the unbiased HSIC an entry can fall slightly outside
        [0, 1] by chance. Raises InsufficientDataError when nothing was added.
        """
        self._check_not_empty()
        return self._mask(_cka_from_sums(self.hsic_sum.sum(axis=0)))

    def _mask(self, values: np.ndarray) -> np.ndarray:
        """``values`` with NaN where no HSIC term is computed (``blocks``), in place."""
        if self.blocks is not None:
            values[..., ~self.computed] = math.nan
        return values

    def compute_stats(self, confidence: float = 0.95) -> CKAStats:
        """CKA with grouped-jackknife standard errors and ``confidence`` intervals (numpy float64 ``(L, L)``).

        Over the ``G`` non-empty groups (empty ones are skipped): ``theta_(-g)`` is the CKA of the totals
        minus group ``g``; ``SE = sqrt((G-1)/G * sum_g (theta_(-g) - mean_g theta_(-g))^2)``; the interval is
        ``theta -+ t_{G-1, (1+confidence)/2} * SE`` around the full-data ``theta``.

        With fewer than 2 non-empty groups the SE cannot be estimated: ``se``, ``low`` and ``high`` are NaN
        everywhere (logged as a warning). An entry whose leave-one-group-out self-HSIC is ``<= 0`` for some
        ``g`` (tiny data) also gets a NaN SE, with a warning. Raises InsufficientDataError when nothing was added.
        """
        if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
            raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
        self._check_not_empty()
        totals = self.hsic_sum.sum(axis=0)
        theta = _cka_from_sums(totals)
        used = self.n_batches > 0
        n_used = int(used.sum())
        if n_used < 2:
            logger.warning("jackknife needs minibatches in at least 2 groups, got %d; standard errors are NaN", n_used)
            se = np.full_like(theta, math.nan)
        else:
            loo = _cka_from_sums(totals[None] - self.hsic_sum[used])  # (G, L, L)
            dev = loo - loo.mean(axis=0, keepdims=True)
            se = np.sqrt((n_used - 1) / n_used * (dev * dev).sum(axis=0))
            unstable = np.isnan(se) & ~np.isnan(theta) & self.computed
            if unstable.any():
                logger.warning(
                    "jackknife SE is NaN for %d CKA entries: leaving out one group makes a self-HSIC <= 0 "
                    "(too few examples); use more data",
                    int(unstable.sum()),
                )
        theta, se = self._mask(theta), self._mask(se)
        half = student_t_ppf(0.5 + confidence / 2.0, n_used - 1) * se if n_used >= 2 else se
        return CKAStats(
            cka=theta,
            se=se,
            low=theta - half,
            high=theta + half,
            degenerate_layers=self.degenerate_layers,
            confidence=float(confidence),
            n_groups=n_used,
        )


def _check_blocks(blocks: Blocks, n_layers: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """``blocks`` as a tuple of ``((r0, r1), (c0, c1))`` int ranges within ``0..n_layers``."""
    out = []
    for block in blocks:
        try:
            (r0, r1), (c0, c1) = block
            ranges = tuple((int(a), int(b)) for a, b in ((r0, r1), (c0, c1)))
        except (TypeError, ValueError):
            raise ValueError(f"a block must be ((r0, r1), (c0, c1)), got {block!r}") from None
        if not all(0 <= a < b <= n_layers for a, b in ranges):
            raise ValueError(f"block {block!r} is not within 0..{n_layers} layers (half-open, non-empty ranges)")
        out.append((ranges[0], ranges[1]))
    return tuple(out)
