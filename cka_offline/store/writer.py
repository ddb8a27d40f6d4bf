"""Crash-safe writer of activation files (format v1, see ``docs/format.md``).

One process at a time writes an output: it holds an exclusive lock on ``<path>.lock``
(:class:`~cka_offline.files.OutputLock`) from before it touches any file until after the final rename,
so a second run to the same output is refused without changing a byte of the first one's file.

The file is built in a hidden scratch name, renamed to ``<path>.partial`` once its structure is written,
and filled row block by row block. Rows are flushed before the ``rows_complete`` counter that counts them
is updated, and every attribute is written once, when the file is made, and later updated in place
(``attrs.modify``: h5py's ``attrs[key] = value`` deletes and recreates an attribute, which a kill can
interrupt halfway). With the counter the writer stores each chunk's CRC-32 per layer (``/checksums``), so
the rows a resume copies are checked against what was written, not only against what reads without an
error. Compressed layers are written in whole chunks only, so a chunk is compressed and
allocated once and never moved (a rewritten compressed chunk moves, and the space it leaves can be reused
by the next one before the chunk index points away from it). Only when every row is written is
``complete`` set; the writer then reopens the file, checks that it is the file it wrote (same inode) and
that it reads back complete, and renames it to ``path``. A file at the final path is therefore always
complete.

``resume=True`` continues a ``.partial`` left by an interrupted run when its ``resume_key`` matches: the
rows it counts as written are read back chunk by chunk (every chunk must be stored, decompress and match its
checksum) into a fresh copy, and the run continues after the last row that reads back as written. A ``.partial`` that cannot be
resumed is refused with the reason, never silently started over.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, NoReturn

import h5py
import numpy as np

from ..errors import InputError, OutputError, ResumeError
from ..files import (
    PARTIAL_SUFFIX,
    OutputLock,
    check_output_path,
    partial_path,
    refuse_existing,
    remove_quietly,
    scratch_path,
)
from ..untrusted import shown
from . import partial, rawio, schema
from .damage import H5_ERRORS
from .filters import load_plugins, require_filters
from .partial import check_target

log = logging.getLogger(__name__)

#: a store of at least this many bytes computes its chunks' CRC-32 on a thread while the rows are written
CRC_THREAD_BYTES = 4 << 20

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
        if not load_plugins():  # pragma: no cover - hdf5plugin is in requirements.txt
            raise OutputError("lz4 compression needs the hdf5plugin package: pip install hdf5plugin")
        import hdf5plugin

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
        overwrite: replace an existing file at ``path`` (it is only replaced once the new one is complete),
            and an interrupted run's ``<path>.partial``.
        resume: continue ``<path>.partial`` if it exists and its ``resume_key`` matches.
        resume_key: fingerprint of everything that determines the content (model, inputs, options).
        shard: ``(index, count, example_offset)`` when this file is one shard of a logical file.
        logical_rows: examples in the whole logical file (default: this file's). Chunks are capped at this
            count, not at the shard's, so every shard of a logical file has the chunk rows a single file of
            all examples would have (analysis cuts its shuffle blocks by chunk rows: shards then analyse
            exactly like one file).

    Raises:
        OutputError: a bad output name or folder, an existing file without ``overwrite``, another process
            writing the same output, an interrupted run's ``.partial`` without ``resume`` or ``overwrite``.
        ResumeError: ``resume`` and a ``.partial`` that cannot be continued (other settings, damaged).

    ``rows_done`` counts the rows handed to :meth:`write`; ``rows_stored`` those in the file, counted by
    its ``rows_complete`` (compressed layers are stored a whole chunk at a time).
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
        self.scratch_path = scratch_path(self.path)
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
        comp = _compression_kwargs(compression)
        check_output_path(self.path)
        refuse_existing(self.path, overwrite=overwrite)
        if chunk_rows is None:
            chunk_rows = schema.default_chunk_rows(max(s.features for s in self.layers), self.dtype.itemsize)
        if chunk_rows < 1:
            raise OutputError(f"{self.path}: chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(min(chunk_rows, max(self.n, logical_rows or 0)))
        self.rows_done = 0
        self.rows_stored = 0
        #: compressed layers are stored a whole chunk at a time (see the module docstring)
        self._whole_chunks = bool(comp)
        self._pending: list[list[np.ndarray]] = []
        self._closed = False
        self._broken = False
        self._inode: tuple[int, int] | None = None
        self._datasets: list[h5py.Dataset] | None = None
        self._checksums: h5py.Dataset | None = None
        self._file: h5py.File | None = None
        #: the CRC-32 of every chunk's rows stored so far, per layer (``/checksums``; made by _build)
        self._crc = np.zeros((0, len(self.layers)), dtype=np.uint32)
        self._crc_thread: ThreadPoolExecutor | None = None  # large stores: the CRCs beside the writes
        self._lock = OutputLock(self.path)
        self._lock.acquire()  # before any file is touched: a second writer never changes the first one's file
        try:
            refuse_existing(self.path, overwrite=overwrite)
            partial.refuse_interrupted(self.path, resume=resume, overwrite=overwrite)
            remove_quietly(self.scratch_path)  # left by a writer killed while it built one
            if resume and os.path.exists(self.tmp_path):
                try:
                    self._file = self._resume(comp)
                except ResumeError as exc:
                    if not overwrite:
                        raise
                    log.warning("%s; --overwrite: starting over", str(exc).split("; ")[0])
                    self.chunk_rows = int(min(chunk_rows, max(self.n, logical_rows or 0)))
            if self._file is None:
                if os.path.exists(self.tmp_path):
                    log.warning("--overwrite: replacing the interrupted extraction %s", self.tmp_path)
                self._file = self._create(_root_attrs(self, provenance, shard), comp)
        except BaseException:
            self._lock.release()
            raise

    # -- creation and resume --------------------------------------------------------------------------
    def _create(self, attrs: Mapping[str, Any], comp: Mapping[str, Any]) -> h5py.File:
        """A new ``.partial``: built in the scratch file, renamed into place, opened to write."""
        ids_bytes = sum(len(x.encode()) + 16 for x in self.ids.tolist()) if self.ids.dtype.kind == "U" else 8 * self.n
        self._check_space(ids_bytes, creating=True)
        f = self._build(attrs, comp)
        return self._install(f)

    def _build(self, attrs: Mapping[str, Any], comp: Mapping[str, Any]) -> h5py.File:
        """The scratch file with ``attrs`` (every root attribute, written once), the ids and empty layers."""
        try:
            f = h5py.File(self.scratch_path, "w")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create {self.scratch_path}: {exc}") from exc
        try:
            for key, value in attrs.items():
                f.attrs[key] = value
            if self.ids.dtype.kind == "U":
                f.create_dataset(schema.IDS_DATASET, data=self.ids.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(schema.IDS_DATASET, data=self.ids)
            self._crc = np.zeros(self._crc_shape(), dtype=np.uint32)
            f.create_dataset(schema.CHECKSUMS_DATASET, data=self._crc)  # allocated now: rewritten in place
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
            remove_quietly(self.scratch_path)
            raise OutputError(
                f"{self.path}: cannot create {self.tmp_path}: {partial.write_failure(exc)}; free space and rerun"
            ) from exc
        except BaseException:
            f.close()
            remove_quietly(self.scratch_path)
            raise
        return f

    def _install(self, f: h5py.File) -> h5py.File:
        """Close the scratch file ``f``, rename it to ``.partial`` (replacing an old one) and reopen it."""
        try:
            f.flush()
            f.close()
            os.replace(self.scratch_path, self.tmp_path)
            out = h5py.File(self.tmp_path, "r+")
        except (OSError, RuntimeError) as exc:
            remove_quietly(self.scratch_path)
            raise OutputError(f"{self.path}: cannot create {self.tmp_path}: {partial.write_failure(exc)}") from exc
        st = partial.stat_open(out, self.tmp_path)
        self._inode = (st.st_dev, st.st_ino)
        return out

    def _resume(self, comp: Mapping[str, Any]) -> h5py.File:
        """Continue the ``.partial`` file: checked, then the rows it counts that read back are copied into
        a fresh file (a writer killed mid-flush can leave metadata that reads fine but breaks the next write,
        and HDF5 then cannot even close the file; writing into a file HDF5 made itself is safe)."""
        damaged = (
            f"{self.tmp_path} cannot be resumed: it is damaged ({{}}); pass --overwrite to delete it and start over"
        )
        try:
            old = h5py.File(self.tmp_path, "r")
        except OSError as exc:
            raise ResumeError(damaged.format(f"not a readable HDF5 file: {partial.short(exc)}")) from exc
        try:
            try:
                attrs = {key: old.attrs[key] for key in old.attrs}
                self._check_resumable(old, attrs)
                self.chunk_rows = int(attrs[schema.ATTR_CHUNK_ROWS])
                counted = int(attrs[schema.ATTR_ROWS_COMPLETE])
                olds = [old[schema.LAYERS_GROUP][schema.layer_key(i)] for i in range(len(self.layers))]
                written = self._stored_checksums(old)
            except ResumeError:
                raise
            except (*H5_ERRORS, AttributeError) as exc:
                raise ResumeError(damaged.format(partial.short(exc))) from exc
            for ds, spec in zip(olds, self.layers):
                require_filters(ds, self.tmp_path, f"layer {spec.name!r}")
            self._check_space(partial.file_size(self.tmp_path))
            attrs[schema.ATTR_ROWS_COMPLETE] = np.int64(0)
            attrs[schema.ATTR_COMPLETE] = False
            new = self._build(attrs, comp)
            try:
                rows = self._copy_readable(olds, new, min(max(counted, 0), self.n), written)
                new.attrs.modify(schema.ATTR_ROWS_COMPLETE, rows)
            except (OSError, RuntimeError) as exc:
                remove_quietly(self.scratch_path)
                raise partial.disk_error(self.path, self.tmp_path, exc) from exc
            except BaseException:
                new.close()
                remove_quietly(self.scratch_path)
                raise
        finally:
            old.close()
        f = self._install(new)
        self.rows_done = self.rows_stored = rows
        log.info("resuming %s at example %d of %d", self.tmp_path, rows, self.n)
        return f

    def _check_resumable(self, old: h5py.File, attrs: Mapping[str, Any]) -> None:
        """ResumeError unless ``old`` was written by this run's model, inputs, options, ids and layers."""
        if schema.ATTR_RESUME_KEY not in attrs:
            raise KeyError(f"attribute {schema.ATTR_RESUME_KEY!r} is missing")
        if str(attrs[schema.ATTR_RESUME_KEY]) != self.resume_key:
            raise ResumeError(
                f"{self.tmp_path} was written with a different model, inputs or options; rerun with the "
                "same ones to resume, or pass --overwrite to start over"
            )
        ids_ds = old.get(schema.IDS_DATASET)
        same_ids = ids_ds is not None and ids_ds.shape == (self.n,) and np.array_equal(_read_ids(ids_ds), self.ids)
        layers = old.get(schema.LAYERS_GROUP)
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

    def _stored_checksums(self, old: h5py.File) -> np.ndarray | None:
        """The ``/checksums`` of the partial file ``old`` (None: a file from before format 1.2, unchecked)."""
        ds = old.get(schema.CHECKSUMS_DATASET)
        if ds is None:
            return None
        if ds.shape != self._crc_shape() or ds.dtype != np.uint32:
            raise KeyError(f"/{schema.CHECKSUMS_DATASET} has shape {ds.shape}, expected {self._crc_shape()}")
        return np.asarray(ds[()])

    def _crc_shape(self) -> tuple[int, int]:
        return (-(-self.n // self.chunk_rows), len(self.layers))

    def _copy_readable(
        self, olds: Sequence[h5py.Dataset], new: h5py.File, counted: int, written: np.ndarray | None
    ) -> int:
        """Copy rows ``0:counted`` of every layer, a chunk at a time, into ``new``; stop at the first chunk
        that is not stored, does not decompress or does not match the checksum ``written`` recorded for it
        (the rows from there on are extracted again). Returns the rows copied. With compression only whole
        chunks are kept, so none is ever rewritten."""
        limit = counted if counted == self.n or not self._whole_chunks else counted - counted % self.chunk_rows
        news = [new[schema.LAYERS_GROUP][schema.layer_key(i)] for i in range(len(self.layers))]
        copied = 0
        for start in range(0, limit, self.chunk_rows):
            stop = min(start + self.chunk_rows, limit)
            chunk = start // self.chunk_rows
            try:
                blocks = [partial.read_stored(ds, start, stop) for ds in olds]
                crcs = [zlib.crc32(block.data) for block in blocks]
                if written is not None and crcs != written[chunk].tolist():
                    # a chunk counted in part has a checksum of more rows when the run was killed after
                    # flushing the rows and before counting them: those few rows are extracted again too
                    raise partial.NotStored(f"chunk at row {start} does not match the checksum written with it")
            except (*H5_ERRORS, partial.NotStored) as exc:
                log.warning(
                    "%s: rows %d-%d do not read back as written (%s); extracting them again",
                    self.tmp_path,
                    start,
                    limit,
                    partial.short(exc),
                )
                break
            for ds, block in zip(news, blocks):
                ds.write_direct(block, dest_sel=np.s_[start:stop])
            self._crc[chunk] = crcs
            copied = stop
        new[schema.CHECKSUMS_DATASET].write_direct(self._crc)
        return copied

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
        stop = self.rows_done + b
        if stop > self.n:
            raise OutputError(f"{self.path}: {stop} rows written but the file holds {self.n} examples")
        block = []
        for spec in self.layers:
            arr = np.asarray(arrays[spec.name])
            if arr.shape != (b, spec.features):
                raise OutputError(
                    f"layer {spec.name!r}: expected rows of {spec.features} features, got shape {arr.shape}"
                )
            block.append(np.ascontiguousarray(arr, dtype=self.dtype))
        self._pending.append(block)
        end = stop if stop == self.n or not self._whole_chunks else stop - stop % self.chunk_rows
        if end > self.rows_stored:
            self._store(end)
        self.rows_done = stop

    def _store(self, end: int) -> None:
        """Write the pending rows up to row ``end``, then count them: data flushed before the counter, so
        a crash between the two flushes never claims unwritten rows."""
        start, f = self.rows_stored, self._file
        assert f is not None
        self._check_space(self._new_chunk_bytes(start, end))
        if self._datasets is None:  # looked up once: h5py's name lookups cost more than small writes
            group = f[schema.LAYERS_GROUP]
            self._datasets = [group[schema.layer_key(order)] for order in range(len(self.layers))]
            self._checksums = f[schema.CHECKSUMS_DATASET]
            self._direct = [rawio.unfiltered(ds) for ds in self._datasets]  # whole chunks: write_direct_chunk
            self._writeback = rawio.Writeback(self.tmp_path)
        pending = self._pending
        blocks = pending[0] if len(pending) == 1 else [np.concatenate(parts) for parts in zip(*pending)]
        k = end - start
        checksums = self._checksums
        assert checksums is not None
        nbytes = sum(rows[:k].nbytes for rows in blocks)
        touched = self._checksums_of(blocks, start, end, nbytes)
        try:
            for ds, rows, direct in zip(self._datasets, blocks, self._direct):
                rawio.write_rows(ds, rows[:k], start, direct)  # a row slice: still C-contiguous
            f.flush()
            chunks = touched()
            # the checksums with the counter, in the second flush: a kill before it leaves both as they were
            checksums.write_direct(self._crc[chunks], dest_sel=chunks)
            f.attrs.modify(schema.ATTR_ROWS_COMPLETE, end)  # in place: never deleted, never moved
            f.flush()
        except (OSError, RuntimeError) as exc:
            self._broken = True
            raise partial.disk_error(self.path, self.tmp_path, exc) from exc
        self.rows_stored = end
        self._writeback.stored(nbytes)  # the disk writes them as the next batches run
        self._pending = [[rows[k:] for rows in blocks]] if k < len(blocks[0]) else []

    def _checksums_of(self, blocks: Sequence[np.ndarray], start: int, end: int, nbytes: int) -> Callable[[], slice]:
        """Start extending the CRC-32 of rows ``start:end`` (:meth:`_checksum`); the function returned waits
        for it and gives the chunks touched. A store of CRC_THREAD_BYTES or more runs on the CRC thread,
        beside the writes (zlib releases the GIL); a smaller one now (a hand-over would cost more)."""
        if nbytes < CRC_THREAD_BYTES:
            chunks = self._checksum(blocks, start, end)
            return lambda: chunks
        if self._crc_thread is None:
            self._crc_thread = ThreadPoolExecutor(1, thread_name_prefix="cka-crc")
        return self._crc_thread.submit(self._checksum, blocks, start, end).result

    def _checksum(self, blocks: Sequence[np.ndarray], start: int, end: int) -> slice:
        """Extend the CRC-32 of the chunks holding rows ``start:end`` (``blocks`` begin at row ``start``)
        with those rows; returns the chunks touched."""
        rows = self.chunk_rows
        first, last = start // rows, (end - 1) // rows
        for chunk in range(first, last + 1):
            lo, hi = max(start, chunk * rows) - start, min(end, (chunk + 1) * rows) - start
            crc = self._crc[chunk]
            for i, block in enumerate(blocks):
                crc[i] = zlib.crc32(block[lo:hi].data, int(crc[i]))
        return slice(first, last + 1)

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
        size = 0 if creating else partial.file_size(self.tmp_path)
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

    # -- finishing ---------------------------------------------------------------------------------------
    def close(self) -> str:
        """Check every row is written, mark the file complete, check it reads back as the file this writer
        wrote, and move it to its final path."""
        if self._closed:
            return self.path
        assert self._file is not None
        if self.rows_done != self.n:
            self.abort()
            raise OutputError(
                f"{self.path}: only {self.rows_done} of {self.n} rows were written; the partial file is kept "
                f"at {self.tmp_path} for --resume"
            )
        self._stop_crc_thread()
        try:
            try:
                self._file.attrs.modify(schema.ATTR_COMPLETE, True)
                self._file.flush()
                self._file.close()
            except (OSError, RuntimeError) as exc:
                raise partial.disk_error(self.path, self.tmp_path, exc) from exc
            finally:
                self._closed = True
            self._verify()
            try:
                partial.fsync(self.tmp_path)
                os.replace(self.tmp_path, self.path)
            except OSError as exc:
                raise OutputError(
                    f"{self.path}: cannot move the finished file into place ({exc.strerror or exc}); it is kept "
                    f"complete at {self.tmp_path}: free space or fix the folder and rerun the same command with "
                    "--resume to move it"
                ) from exc
        finally:
            self._lock.release()
        partial.fsync(os.path.dirname(os.path.abspath(self.path)), folder=True)
        return self.path

    def _verify(self) -> None:
        """Refuse to rename a ``.partial`` that is not the file this writer wrote (another program replaced
        or removed it) or that does not read back complete."""
        fix = f"nothing was moved to {self.path}: extract it again with --overwrite"
        try:
            st = os.stat(self.tmp_path)
        except OSError:
            raise OutputError(f"{self.path}: {self.tmp_path} was removed while this run wrote it; {fix}") from None
        if (st.st_dev, st.st_ino) != self._inode:
            raise OutputError(
                f"{self.path}: {self.tmp_path} was replaced by another program while this run wrote it; {fix}"
            )
        try:
            with h5py.File(self.tmp_path, "r") as f:
                problem = self._read_back(f)
        except H5_ERRORS as exc:
            problem = partial.short(exc)
        if problem:
            raise OutputError(
                f"{self.path}: the finished file {self.tmp_path} does not read back as written ({problem}); {fix}"
            )

    def _read_back(self, f: h5py.File) -> str:
        """What is wrong with the finished file ``f`` (``""``: nothing): its counters, ids and every layer's
        shape and stored chunks, and its last chunk decompresses."""
        attrs = f.attrs
        if not bool(attrs[schema.ATTR_COMPLETE]) or int(attrs[schema.ATTR_ROWS_COMPLETE]) != self.n:
            return f"it counts {int(attrs[schema.ATTR_ROWS_COMPLETE])} of {self.n} rows"
        if int(attrs[schema.ATTR_N_EXAMPLES]) != self.n or str(attrs[schema.ATTR_RESUME_KEY]) != self.resume_key:
            return "its attributes are not this run's"
        if f[schema.IDS_DATASET].shape != (self.n,):
            return "its ids are not this run's"
        chunks = -(-self.n // self.chunk_rows)
        for order, spec in enumerate(self.layers):
            ds = f[schema.LAYERS_GROUP][schema.layer_key(order)]
            if ds.shape != (self.n, spec.features) or ds.id.get_num_chunks() != chunks:
                return f"layer {spec.name!r} stores {ds.id.get_num_chunks()} of {chunks} chunks"
            ds[self.n - 1 :]
        return ""

    def abort(self) -> None:
        """Close without completing; ``<path>.partial`` stays for ``resume=True`` (rows not yet stored,
        part of a compressed chunk, are extracted again then)."""
        if self._closed:
            return
        self._closed = True
        self._pending = []
        self._stop_crc_thread()
        try:
            if self._file is not None and not self._broken:  # closing after a failed write crashes HDF5
                try:
                    self._file.close()
                except Exception as exc:  # already failing; do not mask the original error
                    log.warning("closing %s failed: %s", self.tmp_path, exc)
        finally:
            self._lock.release()

    def _stop_crc_thread(self) -> None:
        """End the CRC thread (not waiting for it: after an interrupt it may still be summing a block)."""
        if self._crc_thread is not None:
            self._crc_thread.shutdown(wait=False)
            self._crc_thread = None

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _root_attrs(
    writer: ActivationWriter, provenance: Mapping[str, Any], shard: tuple[int, int, int] | None
) -> dict[str, Any]:
    """The root attributes of a new file, each with the type it keeps (counters are updated in place)."""
    from .. import __version__

    index, count, offset = shard if shard is not None else (0, 1, 0)
    attrs: dict[str, Any] = {
        schema.ATTR_FORMAT: schema.FORMAT_NAME,
        schema.ATTR_VERSION: schema.FORMAT_VERSION,
        schema.ATTR_TOOL_VERSION: __version__,
        schema.ATTR_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        schema.ATTR_N_EXAMPLES: np.int64(writer.n),
        schema.ATTR_ROWS_COMPLETE: np.int64(0),
        schema.ATTR_COMPLETE: False,
        schema.ATTR_CHUNK_ROWS: np.int64(writer.chunk_rows),
        schema.ATTR_RESUME_KEY: writer.resume_key,
        schema.ATTR_SHARD_INDEX: np.int64(index),
        schema.ATTR_SHARD_COUNT: np.int64(count),
        schema.ATTR_EXAMPLE_OFFSET: np.int64(offset),
    }
    extra: dict[str, Any] = {}
    for key, value in provenance.items():
        if key in schema.PROVENANCE_ATTRS:
            attrs[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        else:
            extra[key] = value
    for key in schema.PROVENANCE_ATTRS:
        attrs.setdefault(key, "")
    attrs[schema.ATTR_EXTRA] = json.dumps(extra, sort_keys=True, default=str)
    return attrs


def _read_ids(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=str)
    return np.asarray(ds[()])


__all__ = [
    "ActivationWriter",
    "check_target",
    "LayerSpec",
    "partial_path",
    "normalize_ids",
    "PARTIAL_SUFFIX",
]  # the last two: re-exported from files
