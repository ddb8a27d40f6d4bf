"""Activations held in memory, analysed like a file: ``analyze([{"conv1": x, "fc": y}, "b.h5"])``.

:class:`Activations` wraps ``{layer name: array}`` (numpy arrays or torch tensors, ``(n, ...)`` per layer,
flattened to ``(n, features)``) with optional example ids, and answers the part of
:class:`~cka_offline.store.reader.ActivationFile`'s interface the analysis reads; its rows are gathered
straight from the arrays, as memory-mapped file rows are. Nothing is written to disk and nothing is copied
beyond making each layer one contiguous floating-point array.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..inputs import check_lengths
from ..memory_inputs import to_numpy

#: the provenance an in-memory source records in a result
MEMORY_PROVENANCE = {"source": "memory"}


@dataclass(frozen=True)
class MemoryLayer:
    """One in-memory layer, described as the reader describes a stored one."""

    name: str
    features: int
    dtype: str


class Activations:
    """In-memory activations of one model: ``layers`` maps layer names to arrays of ``n`` rows.

    Args:
        layers: ``{name: array}``; numpy arrays or torch tensors (detached and copied to the host), each
            ``(n, ...)`` with the same ``n``; float16/32/64 (integers are refused: convert them first).
        ids: ``n`` unique example ids (integers or strings), aligned with other sources like a file's;
            default ``0..n-1``.
        label: how results name this source (default ``memory[k]`` for the ``k``-th source).

    Raises:
        InputError: no layers, rows that differ between layers, non-float arrays, or ids that are not ``n``
            unique values.
    """

    def __init__(self, layers: Mapping[str, Any], ids: Any = None, *, label: str | None = None) -> None:
        if not layers:
            raise InputError("in-memory activations hold no layers; give {layer name: array of shape (n, ...)}")
        self.label = label
        self._arrays = {str(name): _as_rows(name, value) for name, value in layers.items()}
        self.n_examples = check_lengths({name: len(a) for name, a in self._arrays.items()}, "the in-memory layers")
        self.ids = _ids(ids, self.n_examples)
        self._meta = {name: MemoryLayer(name, a.shape[1], a.dtype.name) for name, a in self._arrays.items()}
        self.layer_names = list(self._arrays)
        self.paths: list[str] = []
        self.provenance: dict[str, Any] = dict(MEMORY_PROVENANCE)
        self.chunk_rows = max(1, self.n_examples)

    @property
    def path(self) -> str:
        return self.label or "memory"

    def layer(self, name: str) -> MemoryLayer:
        return self._meta[name]

    def read(self, layer: str, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        rows = self._arrays[layer][start:stop]
        if out is None:
            return rows.copy()
        np.copyto(out, rows)
        return out

    def read_rows(self, layer: str, index: Any) -> np.ndarray:
        return np.take(self._arrays[layer], np.asarray(index, dtype=np.int64), axis=0)

    def mapped_rows(self, layer: str) -> Any:
        from ..store.mapped import MappedRows

        return MappedRows(np.array([0], dtype=np.int64), [self._arrays[layer]], self.n_examples)

    def release_mapped(self) -> None:
        """Nothing to release: the arrays are the caller's."""

    def close(self) -> None:
        """Nothing to close: the arrays are the caller's."""


def _as_rows(name: Any, value: Any) -> np.ndarray:
    array = to_numpy(value, f"in-memory layer {name!r}")
    if array.dtype.kind != "f":
        raise InputError(
            f"in-memory layer {name!r} has dtype {array.dtype}; CKA needs floating-point activations: convert it "
            "(e.g. x.astype(np.float32))"
        )
    return np.ascontiguousarray(array.reshape(len(array), -1))


def _ids(ids: Any, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    values = to_numpy(ids if hasattr(ids, "shape") else list(ids), "the ids")
    if values.ndim != 1 or len(values) != n:
        raise InputError(f"in-memory activations: {len(values)} ids for {n} examples; give one id per example")
    from ..store.writer import normalize_ids  # the same faithful ids as a file stores (uint64, bytes, ...)

    return normalize_ids(values, where="in-memory activations")


def is_memory_source(spec: Any) -> bool:
    """Whether ``spec`` is in-memory activations (a mapping or :class:`Activations`), not a path."""
    return isinstance(spec, (Activations, Mapping)) and not isinstance(spec, (str, os.PathLike))


__all__ = ["Activations", "MemoryLayer", "is_memory_source"]
