"""The layers of an analysis: every selected layer of every file, stacked into one list, with the files,
their labels and the id alignment -- the one object the loops, the batch sources and the result read."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import mmap
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ActivationValueError, InsufficientDataError, ResourceError
from ..extractor import LayerInfo
from .align import Alignment, align_ids
from .options import MIN_BATCH, AnalysisOptions

if TYPE_CHECKING:
    from ..store.reader import ActivationFile, MappedRows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackedLayer:
    """Layer ``meta`` (the reader's record of a stored layer) of file number ``file``, at its place in the stack."""

    file: int
    meta: Any

    @property
    def name(self) -> str:
        return str(self.meta.name)

    @property
    def features(self) -> int:
        return int(self.meta.features)

    @property
    def dtype(self) -> str:
        """Stored dtype, float32 or float16."""
        return str(self.meta.dtype)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


@dataclass
class LayerStack:
    """Files, labels, selected layer names per file, the stacked layers and the alignment of the ids."""

    files: list[ActivationFile]
    labels: list[str]
    selected: list[list[str]]
    layers: list[StackedLayer]
    alignment: Alignment
    _scratch: str | None = field(default=None, repr=False)  # folder of decompressed layers (see mapped)
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)
    _mapped_rows: dict[int, MappedRows | None] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, files: Sequence[ActivationFile], labels: Sequence[str], options: AnalysisOptions) -> LayerStack:
        """Select the layers of every file and align the ids.

        Raises:
            LayerSelectionError: a pattern matches nothing. AlignmentError: the files hold different examples.
            InsufficientDataError: fewer than 4 (common) examples.
        """
        from ..selection import select_layers

        selected = [
            list(
                select_layers(
                    stored_layers(f),
                    options.patterns_for(k),
                    what="layer",
                    where=labels[k],
                    hint=f"list them with cka-inspect {labels[k]}",
                )
            )
            for k, f in enumerate(files)
        ]
        empty = [label for f, label in zip(files, labels) if len(f.ids) == 0]
        if empty:  # said before the alignment, which would only list the other files' ids as missing
            raise InsufficientDataError(
                f"{', '.join(empty)} hold{'s' if len(empty) == 1 else ''} no examples (0 rows); CKA needs at least "
                f"{MIN_BATCH} examples in every file: extract {'it' if len(empty) == 1 else 'them'} again from "
                "inputs that are not empty"
            )
        alignment = align_ids([f.ids for f in files], labels, intersect=options.intersect)
        if alignment.n < MIN_BATCH:
            what = "common to all files" if options.intersect else "in"
            raise InsufficientDataError(
                f"CKA needs at least {MIN_BATCH} examples (the unbiased HSIC_1 is undefined below); "
                f"{alignment.n} example(s) {what} {', '.join(labels)}; extract at least {MIN_BATCH} examples"
            )
        layers = [StackedLayer(k, f.layer(name)) for k, (f, names) in enumerate(zip(files, selected)) for name in names]
        return cls(list(files), list(labels), selected, layers, alignment)

    @property
    def n(self) -> int:
        """Aligned examples."""
        return self.alignment.n

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def row_bytes(self) -> int:
        """Bytes of one example over all stacked layers."""
        return sum(layer.features * layer.itemsize for layer in self.layers)

    def read(self, i: int, positions: np.ndarray) -> np.ndarray:
        """Rows of the aligned examples ``positions`` of stacked layer ``i``, read through HDF5."""
        layer = self.layers[i]
        rows = self.alignment.rows[layer.file]
        f = self.files[layer.file]
        if rows is None:
            return read_rows(f, layer.name, positions, True)
        return read_rows(f, layer.name, rows[positions], layer.file == 0)

    def check_finite(self, i: int, x: np.ndarray, positions: np.ndarray) -> None:
        """Raise ActivationValueError naming the file, layer, example id and row when ``x`` (the rows of
        ``positions`` of stacked layer ``i``) holds NaN or Inf: the first such example in file order."""
        with np.errstate(all="ignore"):
            bad_rows = ~np.isfinite(x).all(axis=1)
        if bad_rows.any():
            from ..store.writer import format_id

            layer = self.layers[i]
            file_rows = self.alignment.rows_of(layer.file, np.asarray(positions))
            candidates = np.flatnonzero(bad_rows)
            row = int(candidates[np.argmin(file_rows[candidates])])  # the first in the file, not in the batch
            values = x[row]
            value = values[~np.isfinite(values)][0]
            raise ActivationValueError(
                f"{self.labels[layer.file]}: layer {layer.name!r} holds {value} for example id "
                f"{format_id(self.alignment.ids[positions[row]])} (row {int(file_rows[row])}; "
                f"{len(candidates)} of the {len(x)} example(s) read hold NaN or Inf); CKA needs finite activations "
                "-- fix the model or inputs and extract again"
            )

    def read_checked(self, i: int, positions: np.ndarray) -> np.ndarray:
        """:meth:`read`, then :meth:`check_finite`."""
        x = self.read(i, positions)
        self.check_finite(i, x, positions)
        return x

    def per_file(self, values: Sequence[float]) -> dict[str, dict[str, float | None]]:
        """``{file label: {layer name: value}}`` for one value per stacked layer (NaN becomes None)."""
        out: dict[str, dict[str, float | None]] = {label: {} for label in self.labels}
        for value, layer in zip(values, self.layers):
            out[self.labels[layer.file]][layer.name] = None if math.isnan(value) else float(value)
        return out

    def mapped(self, *, decompress: bool = False, scratch_dir: str | None = None) -> list[MappedRows] | None:
        """Every stacked layer's memory-mapped rows. A layer stored compressed (or otherwise unmappable) is
        decompressed into a scratch file when ``decompress`` (removed by :meth:`close`), else the answer is
        None: the layers must then be read through HDF5."""
        out = []
        for i, layer in enumerate(self.layers):
            f = self.files[layer.file]
            if i not in self._mapped_rows:  # finding the chunks costs two HDF5 reads per layer: once is enough
                self._mapped_rows[i] = f.mapped_rows(layer.name)
            rows = self._mapped_rows[i]
            if rows is None and not decompress:
                log.info("layer %r of %s is stored compressed or unusually: reading through HDF5", layer.name, f.path)
                return None
            out.append(rows if rows is not None else self._decompressed(i, scratch_dir))
        return out

    def _decompressed(self, i: int, scratch_dir: str | None) -> MappedRows:
        """All rows of stacked layer ``i``, read through HDF5 once into an uncompressed scratch file and
        memory-mapped from there, so uniform minibatches can gather any rows.

        Raises:
            ResourceError: the scratch folder is missing, not writable or has too little free space (names
                ``--scratch-dir``).
        """
        import tempfile

        from ..store.mapped import MappedRows

        layer, f = self.layers[i], self.files[self.layers[i].file]
        shape = (int(f.n_examples), layer.features)
        need = shape[0] * shape[1] * layer.itemsize
        folder = scratch_dir or tempfile.gettempdir()
        if not os.path.isdir(folder):
            raise ResourceError(
                f"layer {layer.name!r} of {self.labels[layer.file]} is stored compressed; uniform minibatches "
                f"need it decompressed into a scratch folder, but {folder} is not a folder; give an existing one "
                "(--scratch-dir)"
            )
        free = shutil.disk_usage(folder).free
        if need > free:
            raise ResourceError(
                f"layer {layer.name!r} of {self.labels[layer.file]} is stored compressed; uniform minibatches "
                f"need it decompressed ({_size_text(need)}) into {folder}, which has {_size_text(free)} "
                "free; give a folder with room (--scratch-dir), or read whole chunks with --shuffle blocks "
                "(biased when rows are stored in class order)"
            )
        try:
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="cka-scratch-", dir=folder)
            path = os.path.join(self._scratch, f"layer{i}.raw")
            target = np.lib.format.open_memmap(path, mode="w+", dtype=layer.dtype, shape=shape)
            # reserve the blocks now: a write into a mapped page of a full disk kills the process (SIGBUS)
            if hasattr(os, "posix_fallocate") and need:
                with open(path, "r+b") as fh:
                    try:
                        os.posix_fallocate(fh.fileno(), 0, target.offset + need)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # no reservation there
                            raise
        except OSError as exc:
            raise ResourceError(
                f"layer {layer.name!r} of {self.labels[layer.file]} is stored compressed; decompressing it "
                f"({_size_text(need)}) into {folder} failed: {exc.strerror or exc}; give a folder with room "
                "that you can write (--scratch-dir), or read whole chunks with --shuffle blocks"
            ) from exc
        log.info(
            "layer %r of %s is stored compressed or unusually: decompressing it into %s for uniform minibatches",
            layer.name,
            f.path,
            path,
        )
        step = max(1, (64 << 20) // max(1, layer.features * layer.itemsize))
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            f.read(layer.name, start, stop, out=target[start:stop])
        target.flush()
        offset = target.offset
        del target
        with open(path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mapping)
        view = np.frombuffer(mapping, dtype=layer.dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
        return MappedRows(np.array([0], dtype=np.int64), [view], shape[0])

    def gather(self, i: int, mapped: MappedRows, positions: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows of the aligned examples ``positions`` of stacked layer ``i``, from its memory-mapped rows,
        into ``out``."""
        return mapped.gather(self.alignment.rows_of(self.layers[i].file, positions), out)

    def release_mapped(self) -> None:
        """Unmap the file pages read so far: the kernel maps pages around every page read (several times what
        a random subset of rows needs), and mapped file pages count as resident memory. Called when a
        minibatch starts a new shuffle buffer, so at most about one buffer's blocks are mapped at a time,
        whatever the file size; safe while other threads read (they map the pages again)."""
        for f in self.files:
            f.release_mapped()
        if hasattr(mmap, "MADV_DONTNEED"):
            for mapping in self._maps:
                mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Remove the scratch files of decompressed layers (the files themselves are closed by their owner)."""
        for mapping in self._maps:
            with contextlib.suppress(BufferError):  # a view still held: the map closes with the last view
                mapping.close()
        self._maps.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def fingerprint(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """What every rank must agree on before splitting the minibatches: ids, layers, file versions, blocks."""
        digest = hashlib.sha256()
        for f in self.files:
            ids = np.asarray(f.ids)
            digest.update(ids.tobytes() if ids.dtype.kind in "iuSU" else "\0".join(map(str, ids)).encode())
            digest.update(b"|")
        layers = tuple((layer.file, layer.name, layer.features, layer.dtype) for layer in self.layers)
        versions = tuple((f.n_examples, str(f.provenance.get("created", ""))) for f in self.files)
        blocks = (params.get("block_rows"), params.get("buffer_blocks"))
        return digest.hexdigest(), layers, versions, blocks


def stored_layers(f: ActivationFile) -> list[LayerInfo]:
    """The layers of ``f`` as selection sees them: each by its name, by the display alias it was extracted
    by (an ONNX tensor's module path), and a call ``NAME:N`` also by its module ``NAME``."""
    from ..selection import as_layer_info

    out = []
    for name in f.layer_names:
        info, alias = as_layer_info(name), getattr(f.layer(name), "alias", "")  # in-memory layers have none
        out.append(replace(info, aliases=(alias,)) if alias and alias != name else info)
    return out


def _size_text(size: float) -> str:
    """``1.5 GiB``, ``512.0 KiB``: a size for a message."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} bytes"


def read_rows(
    f: ActivationFile, layer: str, rows: np.ndarray, sorted_rows: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``rows`` of ``layer`` in that order (into ``out`` when given); contiguous runs of sorted rows
    are read as slices."""
    if sorted_rows:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        if len(breaks) < 16:
            starts = np.concatenate([[0], breaks])
            stops = np.concatenate([breaks, [len(rows)]])
            if out is not None:
                for a, b in zip(starts, stops):
                    f.read(layer, int(rows[a]), int(rows[b - 1]) + 1, out=out[a:b])
                return out
            parts = [f.read(layer, int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
    data = f.read_rows(layer, rows)
    if out is not None:
        np.copyto(out, data)
        return out
    return data


def file_labels(files: Sequence[Any]) -> list[str]:
    """One label per file spec, unique: its path; a shard list: the first path and the number of others; an
    opened file: its path; in-memory activations: their label, else ``memory[k]``."""
    from ..store.reader import ActivationFile
    from .memory import Activations, is_memory_source

    labels: list[str] = []
    for k, spec in enumerate(files):
        if isinstance(spec, (str, os.PathLike)):
            label = os.fspath(spec)
        elif isinstance(spec, ActivationFile):
            label = spec.path
        elif is_memory_source(spec):
            label = (spec.label if isinstance(spec, Activations) else None) or f"memory[{k}]"
        else:
            items = [os.fspath(p) for p in spec]
            label = items[0] + (f" (+{len(items) - 1} shards)" if len(items) > 1 else "")
        base, k = label, 2
        while label in labels:
            label, k = f"{base} #{k}", k + 1
        labels.append(label)
    return labels


def as_paths(spec: Any) -> str | list[str]:
    """A file spec as :func:`cka_offline.store.reader.open_activations` takes it."""
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    return [os.fspath(p) for p in spec]


__all__ = ["LayerStack", "StackedLayer", "as_paths", "file_labels", "read_rows"]
