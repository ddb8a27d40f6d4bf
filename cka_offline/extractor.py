"""The plugin contract: what an extractor plugin provides and what the core does with it.

A plugin contributes :class:`Extractor` subclasses (and optionally :class:`InputReader` subclasses)
through the hooks in :mod:`cka_offline.hookspecs`. The split of work is:

- the **extractor** opens a model source, lists the layers it offers, and runs *one batch* of inputs,
  returning the raw per-layer outputs as numpy arrays with the batch on axis 0;
- the **core** (:func:`cka_offline.extract`) owns everything else: reading inputs in batches, layer
  selection by names/globs, reductions (flatten, spatial mean, token pooling), dtype, the HDF5 file,
  resume, sharding and progress.

A plugin imports only this module, :mod:`cka_offline.hookspecs` (for ``hookimpl``),
:mod:`cka_offline.errors` and its own framework. See ``docs/plugins.md`` for a walk-through.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class LayerInfo:
    """One layer (tensor) a model source offers.

    Attributes:
        name: the layer's name as the framework spells it (``"layer1.0.conv1"``, ``"/conv1/Conv_output_0"``).
            Names may contain ``/`` and dots; the core never turns them into file paths.
        kind: the module class (``"Conv2d"``) or op type (``"Relu"``); ``--layers kind:Relu`` selects by it.
        shape: per-example output shape (without the batch axis) where known; ``None`` entries are
            dimensions that are not known before running (sequence length), ``None`` overall if unknown.
        aliases: other names the same tensor may be selected by (for an ONNX export of a PyTorch model,
            the original module name), so two models of one architecture can be compared layer for layer.
        exposable: ``False`` for tensors that exist but cannot be extracted (inside ONNX If/Loop subgraphs);
            ``reason`` then says why. Selecting such a layer is an error that quotes ``reason``.
    """

    name: str
    kind: str = ""
    shape: tuple[int | None, ...] | None = None
    aliases: tuple[str, ...] = ()
    exposable: bool = True
    reason: str = ""


class InputReader(ABC):
    """Reads model inputs (one or several named arrays per example) in row blocks.

    The core calls ``read(start, stop)`` with increasing, contiguous ranges; an implementation should
    read only those rows (memory maps, HDF5 slices), never the whole input.
    """

    #: unique short name, shown by ``cka-extract --list-extractors``
    name: ClassVar[str] = ""
    #: one line: what it reads
    description: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def can_open(cls, path: str) -> bool:
        """True if this reader understands ``path`` (by extension or by looking at it, cheaply)."""

    def __init__(self, path: str, **options: Any) -> None:
        self.path = path
        self.options = options

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """1-D array of example ids (integers or strings), one per example, in row order."""

    @abstractmethod
    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The inputs of examples ``start:stop`` as ``{input name: array with batch on axis 0}``."""

    def fingerprint(self) -> dict[str, str]:
        """``{"description": ..., "sha256": ...}`` identifying the inputs for provenance and resume."""
        return {"description": f"{self.name}:{os.path.abspath(self.path)}", "sha256": sha256_path(self.path)}

    def close(self) -> None:
        """Release open files."""


class Extractor(ABC):
    """Base class of an extractor: one model framework (or source kind) behind a uniform interface.

    Subclasses set the class attributes, implement :meth:`can_open`, :meth:`layers` and :meth:`run`, and
    may override the rest. Construct with ``Extractor(source, device=..., options=...)``; use as a
    context manager or call :meth:`close`.
    """

    #: unique name, used by ``--extractor NAME``
    name: ClassVar[str] = ""
    #: the framework that runs the model, recorded in the file ("torch", "onnxruntime", "numpy")
    framework: ClassVar[str] = ""
    #: one line: which sources it opens, shown by ``--list-extractors``
    description: ClassVar[str] = ""
    #: extractor-specific options it understands, ``{key: help}``; given on the CLI as ``-X key=value``
    options_help: ClassVar[dict[str, str]] = {}
    #: reductions (names from :data:`cka_offline.reduce.REDUCTIONS`) this extractor can apply itself while
    #: the batch runs -- e.g. in a forward hook, while the output is still in cache, instead of handing the
    #: whole output to the core. Optional; see :meth:`reduce_early`.
    early_reductions: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    @abstractmethod
    def can_open(cls, source: str) -> bool:
        """True if this extractor can open ``source`` (a path or a spec such as ``pkg.mod:factory``).

        Must be cheap and must not import heavy frameworks or execute anything from the source.
        """

    def __init__(self, source: str, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        self.source = source
        self.device = device
        self.options: dict[str, Any] = dict(options or {})

    @abstractmethod
    def layers(self) -> list[LayerInfo]:
        """Every layer the source offers, in model order."""

    def input_names(self) -> list[str] | None:
        """Names of the inputs the model takes, in order, or ``None`` if it takes any single array."""
        return None

    def default_inputs(self) -> InputReader | None:
        """Inputs to use when the user gives none (an importer of precomputed arrays provides its rows)."""
        return None

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch and return ``{layer name: array of shape (batch, *per-example shape)}``.

        ``inputs`` maps input names to arrays with the batch on axis 0 (all with the same batch size);
        ``layers`` are names from :meth:`layers` (never aliases). Every requested layer must be in the
        result; a layer that produced no output is an error (:class:`cka_offline.errors.ModelError`)
        naming it, never a zero array.
        """

    def reduce_early(self, reductions: Mapping[str, str]) -> list[str]:
        """From the next :meth:`run` on, return these layers already reduced: ``{layer: reduction}``, each
        reduction one of :attr:`early_reductions`; returns the layers it will reduce (the core reduces the
        rest itself).

        The core calls it at most once, after a first batch that it reduced itself (so it knows every
        layer's per-example shape and has checked that the reduction fits), and then runs that batch again.
        A reduced layer's array must be what :func:`cka_offline.reduce.reduce` computes on the full output,
        up to float32 rounding: shape ``(batch, features)``. ``mean`` averages every axis after the
        channel axis (axis 1). The default reduces nothing.
        """
        return []

    def provenance(self) -> dict[str, str]:
        """Provenance recorded in the file. Keys the core reads: ``framework``, ``framework_version``,
        ``model`` (identifier), ``model_sha256`` (empty if there is no file); others are stored as extras."""
        return {"framework": self.framework, "framework_version": "", "model": self.source, "model_sha256": ""}

    def close(self) -> None:
        """Release the model and any resources."""

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_path(path: str, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative paths and contents); '' if missing."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for fname in sorted(files):
                full = os.path.join(root, fname)
                digest.update(os.path.relpath(full, path).encode())
                _update_file(digest, full, chunk)
        return digest.hexdigest()
    if not os.path.isfile(path):
        return ""
    _update_file(digest, path, chunk)
    return digest.hexdigest()


def _update_file(digest: "hashlib._Hash", path: str, chunk: int) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)


__all__ = ["Extractor", "InputReader", "LayerInfo", "sha256_path"]
