"""What a user chooses for an analysis: one frozen, validated object, the allowed values and the defaults.

:class:`AnalysisOptions` is built once (by :func:`cka_offline.analyze` from its keyword arguments, or by the
caller) and is what the loop reads, what ranks agree on and what the result records (:meth:`params`).
Standard library only: ``cka-analyze --help`` reads the allowed values from here without importing numpy.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..devices import parse_device

#: kernels of CKA: linear (Kornblith et al. 2019, eq. 4) and RBF with a per-layer bandwidth
KERNELS = ("linear", "rbf")
#: dtypes of the Gram matrices (the HSIC sums are float64 always)
PRECISIONS = ("float32", "float64")
#: unbiased minibatch CKA (Nguyen et al. 2021), exact full-data CKA, biased and debiased
ESTIMATORS = ("minibatch", "full", "full-debiased")
#: devices the analysis runs on
DEVICES = ("auto", "cpu", "cuda")
#: how minibatches are drawn: uniformly at random (default), or from shuffled chunk-aligned blocks (opt-in)
SHUFFLES = ("uniform", "blocks")
#: the smallest minibatch the unbiased HSIC_1 is defined for
MIN_BATCH = 4
#: seeds are 0 .. 2**63 - 1 (numpy's generators take non-negative integers; 63 bits keep every reader of a
#: result's ``params``, pandas and other languages, exact)
MAX_SEED = 2**63 - 1
#: passes over the data: beyond a million a run would not end, and the minibatch counts stay far from 2**63
MAX_EPOCHS = 10**6
#: memory the shuffle buffer may use for all layers of all files together
BUFFER_BYTES = 256 * 2**20


def _mapped_bytes() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 16 * 2**30
    return int(min(4 * 2**30, physical // 4))


#: uniform minibatches: data up to this size (4 GiB, at most a quarter of the memory) stays memory-mapped for
#: a whole epoch (its pages are page cache the kernel can reclaim; unmapping them every few minibatches made
#: W 35% slower through re-faults); larger data releases the pages every BUFFER_BYTES
MAPPED_BYTES = _mapped_bytes()


@dataclass(frozen=True)
class AnalysisOptions:
    """Every choice of an analysis, validated on construction (``ValueError`` naming the fix; a malformed
    device raises :class:`~cka_offline.errors.DeviceError`).

    Attributes:
        layers: layer names or glob patterns selecting the layers of every file (``None``: all layers).
        layers_a: selection for the first file (overrides ``layers`` there).
        layers_b: selection for the second and every further file (overrides ``layers`` there).
        batch_size: examples per minibatch ``m`` (>= 4); the tail is spread so no minibatch is below 4.
        epochs: passes over the data, each with its own shuffle.
        seed: seed of the shuffle, the jackknife groups and the RBF bandwidth sample.
        kernel: one of :data:`KERNELS`.
        rbf_fraction: RBF bandwidth = this fraction of the median pairwise distance in a sample of up to
            1000 examples, estimated once per layer (0.5, as in Kornblith et al. 2019's experiments).
        precision: Gram dtype, one of :data:`PRECISIONS`; HSIC sums are float64 always.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N`` (normalised, not yet resolved).
        estimator: one of :data:`ESTIMATORS`.
        intersect: compare the examples common to all files instead of requiring identical sets.
        n_groups: jackknife groups for standard errors (at most the minibatches of one epoch are formed;
            :mod:`cka_offline.analysis.plan` says which examples each group owns).
        shuffle: one of :data:`SHUFFLES`: ``uniform`` minibatches (default), or ``blocks`` (reads whole chunks,
            for data larger than the page cache; biased when rows are stored in class order, so it warns).
        scratch_dir: where layers stored compressed are decompressed for uniform minibatches (a temporary
            folder, removed afterwards; default: the system's temporary folder).
        confidence: level of the reported interval.
        allow_external: read files holding external HDF5 links (refused by default).
        buffer_bytes: memory for the rows read ahead (all layers of all files): ``blocks``, the shuffle
            buffer (default 256 MiB); ``uniform``, the memory-mapped file pages kept between releases
            (default: all of the data when it is at most :data:`MAPPED_BYTES`, else 256 MiB). ``None``: default.
        prefetch: minibatches the HDF5 reader thread may hold ready.
        hash_files: compute the SHA-256 of every file (on a background thread) for the result.
        full_max_bytes: memory the full estimators may use for their float64 ``n x n`` Grams and scratch
            (``cka-analyze --max-memory``): bytes, or a size such as ``"8G"`` or ``"512M"`` (binary units);
            ``None``: 8 GiB (``analysis.loop.FULL_DATA_BYTES``). When all layers' Grams do not fit, the
            layers go in blocks (more Gram builds); below two Grams the analysis is refused.
        all_pairs: with two or more files, also compute the CKA of every pair of layers *within* each file
            (the diagonal blocks of the stacked matrix). Default ``False``: the minibatch estimator computes
            the pairs the result reports (each file against each other) and every layer's self-HSIC, and the
            within-file entries off the diagonal are NaN ("not computed"). One file: always all pairs.
    """

    layers: tuple[str, ...] | None = None
    layers_a: tuple[str, ...] | None = None
    layers_b: tuple[str, ...] | None = None
    batch_size: int = 256
    epochs: int = 1
    seed: int = 0
    kernel: str = "linear"
    rbf_fraction: float = 0.5
    precision: str = "float32"
    device: str = "auto"
    estimator: str = "minibatch"
    intersect: bool = False
    n_groups: int = 16
    shuffle: str = "uniform"
    scratch_dir: str | None = None
    confidence: float = 0.95
    allow_external: bool = False
    buffer_bytes: int | None = None
    prefetch: int = 4
    hash_files: bool = True
    full_max_bytes: int | None = None
    all_pairs: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "layers_a", "layers_b"):
            object.__setattr__(self, name, _patterns(getattr(self, name), name))
        for name in ("batch_size", "epochs", "seed", "n_groups", "prefetch"):
            object.__setattr__(self, name, _integer(getattr(self, name), name))
        if self.buffer_bytes is not None:
            object.__setattr__(self, "buffer_bytes", _integer(self.buffer_bytes, "buffer_bytes"))
        for name in ("intersect", "allow_external", "hash_files", "all_pairs"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        object.__setattr__(self, "device", str(parse_device(self.device, allowed=DEVICES)))
        object.__setattr__(self, "full_max_bytes", parse_size(self.full_max_bytes, "full_max_bytes (--max-memory)"))
        self._check()

    def _check(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; use one of {', '.join(KERNELS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {self.shuffle!r}; use one of {', '.join(SHUFFLES)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if not (
            isinstance(self.rbf_fraction, (int, float)) and math.isfinite(self.rbf_fraction) and self.rbf_fraction > 0
        ):
            raise ValueError(f"rbf fraction must be a number > 0, got {self.rbf_fraction}")
        if self.batch_size < MIN_BATCH:
            raise ValueError(f"batch size must be at least {MIN_BATCH} (unbiased HSIC_1), got {self.batch_size}")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ValueError(f"epochs must be 1 to {MAX_EPOCHS}, got {self.epochs}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be 0 to {MAX_SEED} (2**63 - 1), got {self.seed}")
        if not (
            isinstance(self.confidence, (int, float))
            and not isinstance(self.confidence, bool)
            and math.isfinite(self.confidence)
            and 0 < self.confidence < 1
        ):
            raise ValueError(f"confidence must be a level between 0 and 1 (e.g. 0.95), got {self.confidence!r}")
        if self.n_groups < 2:
            raise ValueError(f"n_groups must be at least 2 for a jackknife standard error, got {self.n_groups}")
        if (self.buffer_bytes is not None and self.buffer_bytes < 1) or self.prefetch < 1:
            raise ValueError(f"buffer_bytes and prefetch must be >= 1, got {self.buffer_bytes} and {self.prefetch}")
        if self.full_max_bytes is not None and self.full_max_bytes < 1:
            raise ValueError(f"full_max_bytes (--max-memory) must be at least 1 byte, got {self.full_max_bytes}")

    def replace(self, **changes: Any) -> AnalysisOptions:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def patterns_for(self, file_index: int) -> list[str] | None:
        """The layer patterns of file ``file_index`` (``layers_a`` for the first, ``layers_b`` for the rest,
        else ``layers``); ``None``: every layer."""
        own = self.layers_a if file_index == 0 else self.layers_b
        patterns = own if own is not None else self.layers
        return list(patterns) if patterns else None

    def params(self, device: str) -> dict[str, Any]:
        """The parameters a result records (``device``: the resolved device), in the order results show them."""
        return {
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
            "kernel": self.kernel,
            "rbf_fraction": float(self.rbf_fraction) if self.kernel == "rbf" else None,
            "precision": self.precision,
            "device": device,
            "estimator": self.estimator,
            "n_groups": self.n_groups,
            "intersect": self.intersect,
            "confidence": float(self.confidence),
            "shuffle": self.shuffle,
        }


def check_options(**options: Any) -> AnalysisOptions:
    """Validate option values and combinations (keyword arguments of :class:`AnalysisOptions`); raises
    ValueError with the fix (the CLI shows it as a usage error). Returns the options object."""
    return AnalysisOptions(**options)


def _patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must be layer names or glob patterns (strings), got {value!r}")
    return items


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


#: binary multiples a size may end with (an optional ``B`` or ``iB`` after the letter)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: Any, name: str) -> int | None:
    """Bytes from an integer or a size such as ``8G``, ``1.5GiB``, ``512M`` or ``1000000``; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        return _integer(value, name)
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or (value.strip().upper().endswith("IB") and not unit):
        raise ValueError(f"{name} must be a size such as 8G, 512M or 1000000 (bytes), got {value!r}")
    return int(number * _SIZE_UNITS[unit])


__all__ = [
    "MAPPED_BYTES",
    "MAX_EPOCHS",
    "MAX_SEED",
    "AnalysisOptions",
    "BUFFER_BYTES",
    "DEVICES",
    "ESTIMATORS",
    "KERNELS",
    "MIN_BATCH",
    "PRECISIONS",
    "SHUFFLES",
    "check_options",
    "parse_size",
]
