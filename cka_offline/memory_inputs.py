"""Model inputs held in memory: a numpy array, a torch tensor, or a dict of them (one per model input).

:class:`ArrayInputs` is the :class:`~cka_offline.extractor.InputReader` that :func:`cka_offline.extract`
wraps such inputs in; its fingerprint is the SHA-256 of the arrays' bytes, so ``resume`` and shards check
that the same inputs are given again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError
from .extractor import InputReader
from .inputs import check_lengths

#: the input name a single array is given as (the core hands a one-input model its one array whatever its name)
DEFAULT_INPUT = "input"


def to_numpy(value: Any, what: str) -> np.ndarray:
    """``value`` (a numpy array, a torch tensor on any device, or a sequence) as a numpy array with at least
    one example on axis 0; ``what`` names it in the error."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim < 1 or len(array) == 0:
        raise InputError(f"{what} has no examples (shape {array.shape}); give an array with the examples on axis 0")
    return array


def is_memory_inputs(inputs: Any) -> bool:
    """Whether ``inputs`` are arrays in memory (an array, a tensor, or a mapping of them), not a path."""
    return isinstance(inputs, (np.ndarray, Mapping)) or (hasattr(inputs, "detach") and hasattr(inputs, "shape"))


class ArrayInputs(InputReader):
    """Inputs from memory: ``{input name: array}`` (or one array, given as ``input``), examples on axis 0.

    Args:
        arrays: the inputs; numpy arrays or torch tensors, all with the same number of examples.
        ids: one id per example (integers or strings); default ``0..n-1``.
    """

    name = "memory"
    description = "arrays or tensors in memory (the Python API)"

    @classmethod
    def can_open(cls, path: str) -> bool:
        return False  # never chosen for a path

    def __init__(self, arrays: Any, ids: Any = None) -> None:
        super().__init__("memory")
        given = arrays if isinstance(arrays, Mapping) else {DEFAULT_INPUT: arrays}
        self.arrays = {str(k): to_numpy(v, f"input {k!r}") for k, v in given.items()}
        self.n = check_lengths({k: len(v) for k, v in self.arrays.items()}, "the inputs given in memory")
        self._ids = np.arange(self.n, dtype=np.int64) if ids is None else to_numpy(ids, "ids")
        if len(self._ids) != self.n:
            raise InputError(f"{len(self._ids)} ids for {self.n} examples; give one id per example")

    def __len__(self) -> int:
        return self.n

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.arrays.items()}

    def fingerprint(self) -> dict[str, str]:
        digest = hashlib.sha256()
        for key, value in sorted(self.arrays.items()):
            digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.arrays.items())
        return {"description": f"memory: {shapes}", "sha256": digest.hexdigest()}


__all__ = ["DEFAULT_INPUT", "ArrayInputs", "is_memory_inputs", "to_numpy"]
