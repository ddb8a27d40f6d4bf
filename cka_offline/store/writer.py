"""Crash-safe writer of activation files (format v1, see ``docs/format.md``).

The file is written to ``<path>.partial`` next to the target. After every batch the rows are flushed
and ``rows_complete`` is updated; only when every row is written is ``complete`` set and the file
renamed to ``path``. A file at the final path is therefore always complete. A ``.partial`` file left by
an interrupted run can be resumed (``resume=True``) when its ``resume_key`` matches.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn

import h5py
import numpy as np

from ..errors import InputError, OutputError, ResumeError
from ..files import PARTIAL_SUFFIX, partial_path, refuse_existing, remove_quietly
from ..untrusted import shown
from . import schema

log = logging.getLogger(__name__)

#: bytes kept free beyond a batch's chunks for HDF5 metadata (chunk index nodes, attributes, the final
#: flush): this much, plus SPACE_MARGIN_PER_LAYER for each layer
SPACE_MARGIN = 64 << 10
SPACE_MARGIN_PER_LAYER = 8 << 10


#: what the writer needs to know about one layer before the first row is written (name, original shape,
#: reduction, features): the store's one layer record
LayerSpec = schema.StoredLayer


def normalize_ids(ids: Any, *, where: str) -> np.ndarray:
    """Ids as int64 or str array, 1-D and unique, stored faithfully or refused (InputError naming the id):
    bytes are decoded as UTF-8, unsigned ids above 2**63-1 (the format stores int64) are refused, as are
    strings that are not valid UTF-8 or hold a NUL; raises InputError naming a duplicate."""
    # a list keeps its items' types (np.asarray would turn [1, "1"] into two equal strings)
    arr = np.asarray(ids, dtype=object) if isinstance(ids, (list, tuple)) else np.asarray(ids)
    if arr.ndim != 1:
        raise InputError(f"{where}: example ids must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "O":
        arr = _object_ids(arr, where)
    if arr.dtype.kind == "u" and len(arr) and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(
            f"{where}: example id {int(arr.max())} is above 2**63-1, the largest id the format stores (64-bit "
            "signed integers); give the ids as strings instead (ids.astype(str))"
        )
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind in "SU":
        arr = np.asarray([_text_id(x, where) for x in arr.tolist()], dtype=str)
    else:
        raise InputError(f"{where}: example ids must be integers or strings, got dtype {arr.dtype}")
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        dup = uniq[counts > 1]
        raise InputError(
            f"{where}: example ids must be unique; {len(dup)} id(s) occur more than once, e.g. {format_id(dup[0])}; "
            "give every example its own id"
        )
    return arr


def _object_ids(arr: np.ndarray, where: str) -> np.ndarray:
    """A Python list of ids: all integers, or all strings and bytes; never a mix (1 and "1" would differ)."""
    values = arr.tolist()
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ints = [int(v) for v in values]
        if ints and (min(ints) < -(2**63) or max(ints) > 2**63 - 1):
            _too_big(max(ints, key=abs), where)
        return np.asarray(ints, dtype=np.int64)
    if all(isinstance(v, (str, bytes)) for v in values):
        return np.asarray([_text_id(v, where) for v in values], dtype=str)
    kinds = sorted({type(v).__name__ for v in values})
    raise InputError(f"{where}: example ids must be all integers or all strings, got {', '.join(kinds)}")


def _too_big(value: int, where: str) -> NoReturn:
    raise InputError(
        f"{where}: example id {value} does not fit in 64-bit signed integers, which the format stores; "
        "give the ids as strings instead"
    )


def _text_id(value: str | bytes, where: str) -> str:
    """A text id as stored (UTF-8): bytes are decoded; invalid UTF-8 and NUL are refused, shown escaped."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(
                f"{where}: example id '{shown(value)}' is not valid UTF-8; ids are stored as UTF-8 text: decode them "
                "or give integer ids"
            ) from None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{where}: example id '{shown(value)}' is not valid UTF-8 (a file name with bytes that are not UTF-8?); "
            "ids are stored as UTF-8 text: rename it"
        ) from None
    if "\0" in value:
        raise InputError(f"{where}: example id {value!r} holds a NUL character, which HDF5 strings cannot store")
    return value


def format_id(value: Any) -> str:
    """An example id as a user wrote it: ``5`` or ``'img/003.png'`` (no numpy type names)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _compression_kwargs(compression: str | None) -> dict[str, Any]:
    try:
        compression = schema.compression_name(compression)
    except ValueError as exc:
        raise OutputError(str(exc)) from None
    if compression is None:
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "lz4":
        try:
            import hdf5plugin
        except ImportError as exc:  # pragma: no cover - hdf5plugin is in requirements.txt
            raise OutputError("lz4 compression needs the hdf5plugin package: pip install hdf5plugin") from exc
        return dict(hdf5plugin.LZ4())
    raise AssertionError(f"compression {compression!r} is in schema.COMPRESSIONS but has no HDF5 filter here")


class ActivationWriter:
    """Write one activation file row block by row block; see the module docstring for crash safety.

    Args:
        path: final path of the file.
        ids: one unique id (int or str) per example, in row order.
        layers: one LayerSpec per layer, in model order.
        provenance: str values for the keys in ``schema.PROVENANCE_ATTRS``; other keys go to ``extra``.
        dtype: stored dtype, ``"float32"`` or ``"float16"``.
        chunk_rows: rows per HDF5 chunk (default: about 4 MB for the widest layer).
        compression: None, ``"gzip"`` or ``"lz4"``.
        overwrite: replace an existing file at ``path`` (it is only replaced once the new one is complete).
        resume: continue ``<path>.partial`` if it exists and its ``resume_key`` matches.
        resume_key: fingerprint of everything that determines the content (model, inputs, options).
        shard: ``(index, count, example_offset)`` when this file is one shard of a logical file.
        logical_rows: examples in the whole logical file (default: this file's). Chunks are capped at this
            count, not at the shard's, so every shard of a logical file has the chunk rows a single file of
            all examples would have (analysis cuts its shuffle blocks by chunk rows: shards then analyse
            exactly like one file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ids: Any,
        layers: Sequence[LayerSpec],
        provenance: Mapping[str, Any],
        dtype: str = "float32",
        chunk_rows: int | None = None,
        compression: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
        resume_key: str = "",
        shard: tuple[int, int, int] | None = None,
        logical_rows: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.tmp_path = partial_path(self.path)
        if dtype not in schema.STORED_DTYPES:
            raise OutputError(f"{self.path}: unknown dtype {dtype!r}; use one of {', '.join(schema.STORED_DTYPES)}")
        if not layers:
            raise OutputError(f"{self.path}: no layers to write; select at least one layer")
        names = [spec.name for spec in layers]
        if len(set(names)) != len(names):
            raise OutputError(f"{self.path}: a layer is selected twice; layer names must be unique")
        for spec in layers:
            if spec.reduction not in schema.REDUCTIONS:
                raise OutputError(f"layer {spec.name!r}: unknown reduction {spec.reduction!r}")
            if spec.features < 1:
                raise OutputError(f"layer {spec.name!r}: has no features (stored width {spec.features})")
        self.ids = normalize_ids(ids, where=self.path)
        self.n = len(self.ids)
        if self.n == 0:
            raise InputError(f"{self.path}: there are no examples to write")
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.resume_key = resume_key
        refuse_existing(self.path, overwrite=overwrite)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise OutputError(f"{self.path}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"{self.path}: folder {folder} is not writable; choose another -o")
        if chunk_rows is None:
            chunk_rows = schema.default_chunk_rows(max(s.features for s in self.layers), self.dtype.itemsize)
        if chunk_rows < 1:
            raise OutputError(f"{self.path}: chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(min(chunk_rows, max(self.n, logical_rows or 0)))
        self.rows_done = 0
        self._closed = False
        self._broken = False
        self._file: h5py.File | None = None
        self._datasets: list[h5py.Dataset] | None = None
        if resume and os.path.exists(self.tmp_path):
            self._file = self._reopen()
        if self._file is None:
            self._file = self._create(provenance, compression, shard)

    # -- creation and resume --------------------------------------------------------------------------
    def _create(
        self, provenance: Mapping[str, Any], compression: str | None, shard: tuple[int, int, int] | None
    ) -> h5py.File:
        comp = _compression_kwargs(compression)
        ids_bytes = sum(len(x.encode()) + 16 for x in self.ids.tolist()) if self.ids.dtype.kind == "U" else 8 * self.n
        self._check_space(ids_bytes, creating=True)
        try:
            f = h5py.File(self.tmp_path, "w")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create {self.tmp_path}: {exc}") from exc
        try:
            from .. import __version__

            attrs = f.attrs
            attrs[schema.ATTR_FORMAT] = schema.FORMAT_NAME
            attrs[schema.ATTR_VERSION] = schema.FORMAT_VERSION
            attrs[schema.ATTR_TOOL_VERSION] = __version__
            attrs[schema.ATTR_CREATED] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            attrs[schema.ATTR_N_EXAMPLES] = self.n
            attrs[schema.ATTR_ROWS_COMPLETE] = 0
            attrs[schema.ATTR_COMPLETE] = False
            attrs[schema.ATTR_CHUNK_ROWS] = self.chunk_rows
            attrs[schema.ATTR_RESUME_KEY] = self.resume_key
            index, count, offset = shard if shard is not None else (0, 1, 0)
            attrs[schema.ATTR_SHARD_INDEX] = int(index)
            attrs[schema.ATTR_SHARD_COUNT] = int(count)
            attrs[schema.ATTR_EXAMPLE_OFFSET] = int(offset)
            extra: dict[str, Any] = {}
            for key, value in provenance.items():
                if key in schema.PROVENANCE_ATTRS:
                    attrs[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                else:
                    extra[key] = value
            for key in schema.PROVENANCE_ATTRS:
                if key not in attrs:
                    attrs[key] = ""
            attrs[schema.ATTR_EXTRA] = json.dumps(extra, sort_keys=True, default=str)
            if self.ids.dtype.kind == "U":
                f.create_dataset(schema.IDS_DATASET, data=self.ids.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(schema.IDS_DATASET, data=self.ids)
            group = f.create_group(schema.LAYERS_GROUP)
            for order, spec in enumerate(self.layers):
                ds = group.create_dataset(
                    schema.layer_key(order),
                    shape=(self.n, spec.features),
                    dtype=self.dtype,
                    chunks=(self.chunk_rows, spec.features),
                    # HDF5 allows a chunk longer than the dataset only when the dataset may grow
                    maxshape=(None if self.chunk_rows > self.n else self.n, spec.features),
                    **comp,
                )
                ds.attrs[schema.LAYER_ATTR_NAME] = spec.name
                ds.attrs[schema.LAYER_ATTR_ORDER] = order
                ds.attrs[schema.LAYER_ATTR_ORIGINAL_SHAPE] = np.asarray(spec.original_shape, dtype=np.int64)
                ds.attrs[schema.LAYER_ATTR_REDUCTION] = spec.reduction
                ds.attrs[schema.LAYER_ATTR_DTYPE] = self.dtype.name
                ds.attrs[schema.LAYER_ATTR_FEATURES] = spec.features
                if spec.alias:  # 1.1: optional, only where there is one
                    ds.attrs[schema.LAYER_ATTR_ALIAS] = spec.alias
            f.flush()
        except (OSError, RuntimeError) as exc:
            # HDF5 cannot be closed cleanly after a failed write (closing it crashes the process at exit)
            remove_quietly(self.tmp_path)
            raise OutputError(
                f"{self.path}: cannot create {self.tmp_path}: {_write_failure(exc)}; free space and rerun"
            ) from exc
        except BaseException:
            f.close()
            remove_quietly(self.tmp_path)
            raise
        return f

    def _reopen(self) -> h5py.File | None:
        """Continue the ``.partial`` file: checked, then rebuilt by copying it (see _rebuild)."""
        try:
            f = h5py.File(self.tmp_path, "r")
        except OSError as exc:
            # a writer killed at the wrong moment can leave an unreadable partial file: start over
            log.warning("%s is unreadable (%s); starting the extraction from the first example", self.tmp_path, exc)
            remove_quietly(self.tmp_path)
            return None
        try:
            key = str(f.attrs.get(schema.ATTR_RESUME_KEY, ""))
            if key != self.resume_key:
                raise ResumeError(
                    f"{self.tmp_path} was written with a different model, inputs or options; rerun with the "
                    "same ones to resume, or pass --overwrite to start over"
                )
            ids_ds = f.get(schema.IDS_DATASET)
            same_ids = ids_ds is not None and ids_ds.shape == (self.n,) and np.array_equal(_read_ids(ids_ds), self.ids)
            layers = f.get(schema.LAYERS_GROUP)
            same_layers = (
                layers is not None
                and len(layers) == len(self.layers)
                and all(
                    schema.layer_key(i) in layers
                    and layers[schema.layer_key(i)].shape == (self.n, spec.features)
                    and str(layers[schema.layer_key(i)].attrs.get(schema.LAYER_ATTR_NAME)) == spec.name
                    and layers[schema.layer_key(i)].dtype == self.dtype
                    for i, spec in enumerate(self.layers)
                )
            )
            if not (same_ids and same_layers):
                raise ResumeError(
                    f"{self.tmp_path} holds other examples or layers than this run would write; "
                    "rerun with the same inputs and options to resume, or pass --overwrite to start over"
                )
            self.chunk_rows = int(f.attrs[schema.ATTR_CHUNK_ROWS])
            self.rows_done = int(f.attrs[schema.ATTR_ROWS_COMPLETE])
            self._check_space(_file_size(self.tmp_path))
            rebuilt = self._rebuild(f)
        finally:
            f.close()
        if rebuilt is None:
            self.rows_done = 0
            return None
        os.replace(rebuilt, self.tmp_path)
        log.info("resuming %s at example %d of %d", self.tmp_path, self.rows_done, self.n)
        return h5py.File(self.tmp_path, "a")

    def _rebuild(self, old: h5py.File) -> str | None:
        """A fresh copy of the killed writer's file (attributes, ids and layers, chunk for chunk), or None
        if it cannot be read (then the run starts over). A writer killed mid-flush leaves HDF5 metadata
        that reads fine but breaks the next write ("addr overflow"); HDF5 then cannot even close the
        file. Writing into a copy that HDF5 made itself is safe."""
        rebuilt = self.tmp_path + ".rebuild"
        try:
            with h5py.File(rebuilt, "w") as new:
                for key, value in old.attrs.items():
                    new.attrs[key] = value
                old.copy(old[schema.IDS_DATASET], new, name=schema.IDS_DATASET)
                old.copy(old[schema.LAYERS_GROUP], new, name=schema.LAYERS_GROUP)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            remove_quietly(rebuilt)
            log.warning("%s is damaged (%s); starting the extraction from the first example", self.tmp_path, exc)
            remove_quietly(self.tmp_path)
            return None
        return rebuilt

    # -- writing ----------------------------------------------------------------------------------------
    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Append the next rows: ``{layer name: (rows, features)}``, the same row count for every layer."""
        if self._file is None or self._closed:
            raise RuntimeError("write() on a closed ActivationWriter")
        missing = [spec.name for spec in self.layers if spec.name not in arrays]
        if missing:
            raise OutputError(f"{self.path}: batch lacks layer(s) {missing}; every layer must be written together")
        rows = {int(np.shape(arrays[spec.name])[0]) for spec in self.layers}
        if len(rows) != 1:
            raise OutputError(f"{self.path}: layers of one batch have different row counts {sorted(rows)}")
        (b,) = rows
        start, stop = self.rows_done, self.rows_done + b
        if stop > self.n:
            raise OutputError(f"{self.path}: {stop} rows written but the file holds {self.n} examples")
        self._check_space(self._new_chunk_bytes(start, stop))
        if self._datasets is None:  # looked up once: h5py's name lookups cost more than small writes
            group = self._file[schema.LAYERS_GROUP]
            self._datasets = [group[schema.layer_key(order)] for order in range(len(self.layers))]
        try:
            for spec, ds in zip(self.layers, self._datasets):
                arr = np.asarray(arrays[spec.name])
                if arr.shape != (b, spec.features):
                    raise OutputError(
                        f"layer {spec.name!r}: expected rows of {spec.features} features, got shape {arr.shape}"
                    )
                ds.write_direct(np.ascontiguousarray(arr, dtype=self.dtype), dest_sel=np.s_[start:stop])
            # rows first, then the count: a crash between the two flushes never claims unwritten rows
            self._file.flush()
            self._file.attrs[schema.ATTR_ROWS_COMPLETE] = stop
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            self._broken = True
            raise _disk_error(self.path, self.tmp_path, exc) from exc
        self.rows_done = stop

    def _new_chunk_bytes(self, start: int, stop: int) -> int:
        """Bytes rows ``start:stop`` add to the file at most: HDF5 allocates a whole chunk when its first
        row is written (uncompressed size, an upper bound with compression)."""
        rows = self.chunk_rows
        first_new = -(-start // rows)  # the chunk holding `start` was allocated already unless it begins there
        new_chunks = max(0, (stop - 1) // rows - first_new + 1)
        return new_chunks * rows * sum(spec.features for spec in self.layers) * self.dtype.itemsize

    def _check_space(self, need: int, *, creating: bool = False) -> None:
        """Refuse a write the disk or the process's file size limit cannot take, before HDF5 starts it:
        HDF5 cannot recover from a failed write (the file handle is lost and closing it crashes)."""
        need += SPACE_MARGIN + SPACE_MARGIN_PER_LAYER * len(self.layers)
        size = 0 if creating else _file_size(self.tmp_path)
        kept = "" if creating else f"; the partial file {self.tmp_path} is kept for --resume"
        if sys.platform != "win32":
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and size + need > limit:
                raise OutputError(
                    f"{self.path}: the file would grow past this process's file size limit ({limit} bytes, ulimit -f; "
                    f"{size + need} needed){kept}: raise the limit and rerun{' with --resume' if kept else ''}"
                )
        folder = os.path.dirname(os.path.abspath(self.tmp_path))
        try:
            st = os.statvfs(folder)
        except (AttributeError, OSError):  # no statvfs (Windows): rely on the write errors
            return
        free = st.f_frsize * (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail)
        if need > free:
            raise OutputError(
                f"{self.path}: the disk is full ({free / 2**20:.1f} MiB free in {folder}, the next write needs "
                f"{need / 2**20:.1f} MiB){kept}: free space and rerun{' with --resume' if kept else ''}"
            )

    def close(self) -> str:
        """Check every row is written, mark the file complete and move it to its final path."""
        if self._closed:
            return self.path
        assert self._file is not None
        if self.rows_done != self.n:
            self.abort()
            raise OutputError(
                f"{self.path}: only {self.rows_done} of {self.n} rows were written; the partial file is kept "
                f"at {self.tmp_path} for --resume"
            )
        try:
            self._file.attrs[schema.ATTR_COMPLETE] = True
            self._file.flush()
            self._file.close()
        except (OSError, RuntimeError) as exc:
            self._closed = True
            raise _disk_error(self.path, self.tmp_path, exc) from exc
        self._closed = True
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close without completing; ``<path>.partial`` stays for ``resume=True``."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None and not self._broken:  # closing after a failed write crashes HDF5
            try:
                self._file.close()
            except Exception as exc:  # already failing; do not mask the original error
                log.warning("closing %s failed: %s", self.tmp_path, exc)

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_ids(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=str)
    return np.asarray(ds[()])


def _write_failure(exc: BaseException) -> str:
    text = str(exc)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space" in text.lower():
        return "the disk is full"
    if getattr(exc, "errno", None) == errno.EFBIG or "file too large" in text.lower():
        return "the file grew past the file size limit"
    return f"writing failed ({' '.join(text.split())[:200]})"


def _disk_error(path: str, tmp_path: str, exc: BaseException) -> OutputError:
    return OutputError(
        f"{path}: {_write_failure(exc)}; the partial file {tmp_path} is kept: free space and rerun with --resume"
    )


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = [
    "ActivationWriter",
    "LayerSpec",
    "partial_path",
    "normalize_ids",
    "PARTIAL_SUFFIX",
]  # the last two: re-exported from files
