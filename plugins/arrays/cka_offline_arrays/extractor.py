"""The ``arrays`` extractor: activations computed elsewhere (TensorFlow, JAX, another lab's code) packed
into an activation file like any model's.

The source is a folder of ``.npy`` files (one per layer, layer name = file name without ``.npy``, or
the name given in an optional ``layers.json`` ``{"file.npy": "original layer name"}``), an ``.npz`` or a
``.safetensors`` file (one array per layer, named by its key). Every array holds one row per example on
axis 0; a 1-D array is one feature per example. Example ids come from ``-X ids=FILE`` (``.npy`` or
``.txt``, one id per line), else from an array called ``ids`` in the source, else they are the row
numbers 0..n-1.

There is no model to run: the "input" of an example is its row number. :meth:`ArraysExtractor.default_inputs`
reads ``{"index": rows}`` blocks and :meth:`ArraysExtractor.run` returns those rows of every layer from
memory maps, so sources larger than memory are packed in bounded memory::

    cka-extract activations_folder/ -o theirs.h5
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from cka_offline.errors import InputError
from cka_offline.extractor import Extractor, InputReader, LayerInfo, Option, sha256_path

from .sources import IDS_NAME, ArraySet, open_arrays

INDEX_INPUT = "index"


class ArraysExtractor(Extractor):
    """Imports precomputed per-layer arrays; see the module docstring for the source layouts."""

    name = "arrays"
    framework = "numpy"
    description = "precomputed activations: a folder of .npy files (one per layer), an .npz or a .safetensors file"
    declared_options = (
        Option(
            "ids",
            object,
            None,
            "example ids: a .npy (1-D ints or strings) or .txt (one id per line) file; "
            f"default: an array named {IDS_NAME!r} in the source, else the row numbers",
        ),
    )

    @classmethod
    def can_open(cls, source: str) -> bool:
        if not isinstance(source, (str, os.PathLike)):  # a live model object is another extractor's
            return False
        if os.path.isdir(source):
            with os.scandir(source) as entries:
                return any(e.name.endswith(".npy") and e.is_file() for e in entries)
        return os.path.isfile(source) and source.endswith((".npz", ".safetensors"))

    def __init__(self, source: str, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(source, device=device, options=options)
        ids = self.option_values["ids"]
        self._arrays: ArraySet = open_arrays(source, ids=None if ids is None else os.fspath(ids))

    def layers(self) -> list[LayerInfo]:
        return [
            LayerInfo(name=name, kind="array", shape=entry.example_shape, aliases=entry.aliases)
            for name, entry in self._arrays.layers.items()
        ]

    def input_names(self) -> list[str]:
        return [INDEX_INPUT]

    def default_inputs(self) -> InputReader:
        return RowReader(self)

    def run(self, inputs: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:
        if INDEX_INPUT not in inputs:
            raise InputError(
                f"arrays extractor ({self.source}): expected input {INDEX_INPUT!r} (row numbers), got "
                f"{', '.join(inputs) or 'none'}; leave out --inputs to pack every row"
            )
        index = np.asarray(inputs[INDEX_INPUT])
        n = self._arrays.n_rows
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise InputError(
                f"arrays extractor ({self.source}): {INDEX_INPUT!r} must be 1-D integer row numbers, "
                f"got dtype {index.dtype} shape {index.shape}"
            )
        if len(index) and (index.min() < 0 or index.max() >= n):
            bad = index[(index < 0) | (index >= n)][0]
            raise InputError(f"arrays extractor ({self.source}): row {bad} is out of range; the arrays have {n} rows")
        missing = [name for name in layers if name not in self._arrays.layers]
        if missing:
            raise InputError(
                f"arrays extractor ({self.source}): no array named {missing[0]!r}; arrays: "
                f"{', '.join(self._arrays.layers)}"
            )
        return {name: self._arrays.rows(name, index) for name in layers}

    @cached_property
    def source_sha256(self) -> str:
        return sha256_path(self.source)

    def provenance(self) -> dict[str, str]:
        return {
            "framework": self.framework,
            "framework_version": np.__version__,
            "model": self.source,
            "model_sha256": self.source_sha256,
            "imported_from": f"{self._arrays.kind}; ids from {self._arrays.ids_from}",
        }

    def close(self) -> None:
        self._arrays.close()


class RowReader(InputReader):
    """The inputs of the arrays extractor: blocks of row numbers, with the source's example ids."""

    name = "arrays-rows"
    description = "row numbers of a source of the arrays extractor (its default inputs)"

    @classmethod
    def can_open(cls, path: str) -> bool:
        return False  # made by ArraysExtractor.default_inputs(), never chosen for a path

    def __init__(self, extractor: ArraysExtractor) -> None:
        super().__init__(extractor.source)
        self._extractor = extractor
        self._ids = extractor._arrays.ids
        self._ids_from = extractor._arrays.ids_from

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {INDEX_INPUT: np.arange(start, min(stop, len(self._ids)), dtype=np.int64)}

    def fingerprint(self) -> dict[str, str]:
        digest = hashlib.sha256(self._extractor.source_sha256.encode())
        if os.path.isfile(self._ids_from):  # an ids file given by option
            digest.update(sha256_path(self._ids_from).encode())
        return {"description": f"rows of {self.path} (ids from {self._ids_from})", "sha256": digest.hexdigest()}


__all__ = ["ArraysExtractor", "RowReader"]
