"""The result classes: :class:`CKAResult`, the :class:`FileInfo` of each compared file, :class:`CKAPair` blocks.

A :class:`CKAResult` holds one CKA matrix over the *stacked* layers of every compared file (file 0's
layers first, then file 1's, ...); the matrix of a pair of files is a block of it (:meth:`CKAResult.pair`).
Saving and loading live in :mod:`.io` (the formats: ``docs/results.md``), the terminal text in :mod:`.summary`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import schema


@dataclass
class FileInfo:
    """One compared activation file (or set of shards).

    Attributes:
        label: the file as it was given (a path, a glob); unique within a result.
        paths: the shard paths it resolved to.
        layers: the selected layer names, in the order of the result's rows/columns.
        provenance: the file's provenance (model, extractor, framework, inputs, ...).
        sha256: SHA-256 of each path in ``paths`` (empty strings where not computed).
        n_examples: examples stored in the file (before alignment).
        aliases: parallel to ``layers``: the display alias each layer was selected by at extraction (the
            activation file's ``alias``, e.g. ``conv1`` for ``/conv1/Conv_output_0``), ``""`` where none;
            empty or all ``""`` for in-memory activations and older results.

    Raises:
        ValueError: ``aliases`` is given but not one per layer.
    """

    label: str
    paths: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    sha256: list[str] = field(default_factory=list)
    n_examples: int = 0
    aliases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.aliases:
            self.aliases = [""] * len(self.layers)
        elif len(self.aliases) != len(self.layers):
            raise ValueError(
                f"{self.label}: {len(self.aliases)} aliases for {len(self.layers)} layers; give one per layer"
            )

    def __repr__(self) -> str:  # a network's provenance is long: show what tells files apart
        return f"FileInfo({self.label!r}, {len(self.layers)} layers, {self.n_examples} examples)"

    @property
    def display_layers(self) -> list[str]:
        """What to show for each layer: its alias, else its name; the name where two layers would show alike."""
        shown = [alias or name for name, alias in zip(self.layers, self.aliases)]
        seen = {s: shown.count(s) for s in shown}
        return [s if seen[s] == 1 else name for s, name in zip(shown, self.layers)]

    @property
    def model_name(self) -> str:
        """A short human name: the provenance ``model`` (its basename) or the label. A Hugging Face model
        (``hf:``) keeps its last two components: the hub's ``org/name``, or a local folder with its parent
        (such folders are often called ``model`` or ``checkpoint``)."""
        model = str(self.provenance.get("model") or "")
        if model.startswith("hf:"):
            parts = [part for part in model[3:].replace("\\", "/").split("/") if part]
            return "/".join(parts[-2:]) or model
        if model:
            return os.path.basename(model.rstrip("/")) or model
        return self.label


@dataclass
class CKAPair:
    """The block of a :class:`CKAResult` comparing file ``i`` (rows, "A") with file ``j`` (columns, "B")."""

    i: int
    j: int
    file_a: FileInfo
    file_b: FileInfo
    cka: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @property
    def layers_a(self) -> list[str]:
        return self.file_a.layers

    @property
    def layers_b(self) -> list[str]:
        return self.file_b.layers

    @property
    def display_a(self) -> list[str]:
        """What to show for the layers of A: alias or name (:attr:`FileInfo.display_layers`)."""
        return self.file_a.display_layers

    @property
    def display_b(self) -> list[str]:
        """What to show for the layers of B: alias or name (:attr:`FileInfo.display_layers`)."""
        return self.file_b.display_layers


@dataclass
class CKAResult:
    """CKA between the layers of one or more activation files.

    Attributes:
        files: the compared files, in order.
        cka: (L, L) float64 CKA over the stacked layers of all files (L = sum of layer counts); NaN where
            undefined (a constant layer) or not computed: with two or more files the minibatch estimator
            computes the reported pairs and the diagonal only, unless ``params["all_pairs"]`` (the pairs
            within a file, off the diagonal, are then NaN; ``cka-analyze --all-pairs`` computes them).
        se: (L, L) jackknife standard errors over minibatch groups (NaN for the full-data estimators).
        low, high: (L, L) bounds of the ``confidence`` interval.
        pairs: the file pairs (i, j) this result reports; ``[(0, 0)]`` for a self-comparison, else
            every ``i < j``.
        params: how it was computed: batch_size, epochs, seed, kernel, rbf_fraction, bandwidths,
            precision, device, estimator, n_groups, intersect, buffer_blocks, block_rows, confidence.
        n_examples: examples used (after alignment).
        n_minibatches: minibatches accumulated (all epochs).
        timing: seconds spent: ``total``, ``read_wait`` (compute waiting for data), ``compute``, ``hash_wait``
            (waiting for the file hashes at the end).
        warnings: what the user should know (constant layers, ...), one sentence each.
        version: the cka-offline version that computed it.
        confidence: level of the ``low``/``high`` interval.

    Raises:
        ValueError: a matrix is not (L, L), or a pair names a file the result does not have.
    """

    files: list[FileInfo]
    cka: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    pairs: list[tuple[int, int]]
    params: dict[str, Any] = field(default_factory=dict)
    n_examples: int = 0
    n_minibatches: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    version: str = ""
    confidence: float = schema.DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        size = sum(len(f.layers) for f in self.files)
        for name in schema.MATRICES:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (size, size):
                raise ValueError(f"{name} must have shape ({size}, {size}), got {value.shape}")
            setattr(self, name, value)
        self.pairs = [(int(i), int(j)) for i, j in self.pairs]
        n = len(self.files)
        for i, j in self.pairs:
            if not (0 <= i < n and 0 <= j < n):
                raise ValueError(f"pair ({i}, {j}) names a file the result does not have: it has {n} file(s)")

    def __repr__(self) -> str:
        """One line (notebooks echo results): files, layer counts, n and how it was computed; ``print(r.summary())``
        shows the values."""
        files = " vs ".join(f"{f.label!r} ({len(f.layers)} layers)" for f in self.files)
        p = self.params
        how = ", ".join(f"{k}={p[k]}" for k in ("kernel", "estimator", "batch_size") if k in p)
        return f"CKAResult({files}; n={self.n_examples}; {how})"

    @property
    def offsets(self) -> list[int]:
        """Start row of each file's layers in the stacked matrices (plus the total at the end)."""
        out = [0]
        for f in self.files:
            out.append(out[-1] + len(f.layers))
        return out

    def pair(self, i: int = 0, j: int | None = None) -> CKAPair:
        """The block comparing file ``i`` (rows) with file ``j`` (columns); ``j`` defaults to the other
        file of a two-file result, or ``i`` itself for a one-file result."""
        if j is None:
            j = i if len(self.files) == 1 else (1 if i == 0 else 0)
        n = len(self.files)
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"file pair ({i}, {j}) out of range: the result has {n} file(s)")
        off = self.offsets
        rows, cols = slice(off[i], off[i + 1]), slice(off[j], off[j + 1])
        block = {name: getattr(self, name)[rows, cols].copy() for name in schema.MATRICES}
        return CKAPair(i=i, j=j, file_a=self.files[i], file_b=self.files[j], **block)

    def matrix(self, i: int = 0, j: int | None = None) -> np.ndarray:
        """CKA matrix (La, Lb) of file ``i`` against file ``j`` (see :meth:`pair`)."""
        return self.pair(i, j).cka

    def to_pandas(self, i: int = 0, j: int | None = None, *, long: bool = False, matrix: str = "cka") -> Any:
        """Block ``(i, j)`` as a pandas DataFrame: rows the layers of file ``i`` in file order, columns those
        of file ``j``; ``long=True``: one row per layer pair with cka/se/low/high and the file labels
        (see :func:`cka_offline.results.frames.to_pandas`; needs pandas)."""
        from .frames import to_pandas

        return to_pandas(self, i, j, long=long, matrix=matrix)

    def to_frame(self) -> Any:
        """Every reported pair in long form, the rows of the CSV serialisation, as a pandas DataFrame
        (see :func:`cka_offline.results.frames.to_frame`; needs pandas)."""
        from .frames import to_frame

        return to_frame(self)

    def to_xarray(self, i: int = 0, j: int | None = None, *, stacked: bool = False) -> Any:
        """Block ``(i, j)`` as an xarray Dataset of cka/se/low/high over the named dimensions ``layer_a`` and
        ``layer_b``, parameters as attributes; ``stacked=True``: the whole matrices (see
        :func:`cka_offline.results.frames.to_xarray`; needs xarray)."""
        from .frames import to_xarray

        return to_xarray(self, i, j, stacked=stacked)

    def summary(self, *, max_detailed_pairs: int = 3) -> str:
        """A terminal summary (see :func:`cka_offline.results.summary.summarize`)."""
        from .summary import summarize

        return summarize(self, max_detailed_pairs=max_detailed_pairs)

    def to_dict(self) -> dict[str, Any]:
        """The result document: plain JSON-able Python, matrices as nested lists with NaN as None."""
        from .io import result_document

        return result_document(self)

    def save(self, path: str | os.PathLike[str], *, format: str | None = None, overwrite: bool = True) -> str:
        """Write the result to ``path`` (see :func:`cka_offline.results.io.save_result`); return the path."""
        from .io import save_result

        return save_result(self, path, format=format, overwrite=overwrite)
