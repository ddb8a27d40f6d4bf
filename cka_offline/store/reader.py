"""Validating, streaming reader of activation files (format v1, see ``docs/format.md``).

:func:`open_activations` opens one file, or several shard files of one logical file, checks everything
the format promises (type, version, attributes, ids, row counts, completeness, no links outside the
file) and reads row blocks on demand: a layer is never loaded whole unless asked.
"""

from __future__ import annotations

import errno
import glob as globlib
import json
import math
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from ..errors import AlignmentError, CKAOfflineError, FormatError, IncompleteFileError, VersionError
from ..files import PARTIAL_SUFFIX
from ..untrusted import require_regular_file
from . import schema
from .damage import DAMAGED, damaged
from .filters import require_filters
from .links import refuse_external
from .mapped import FileMap, MappedRows
from .writer import _read_ids, format_id

#: largest chunk (uncompressed bytes) the reader decompresses; the writer aims at 4 MiB
MAX_CHUNK_BYTES = 1 << 30


#: one stored layer: its original name and how it was stored (the store's one layer record)
LayerMeta = schema.StoredLayer


class _Shard:
    """One physical file: validated on open, holds the h5py handle."""

    def __init__(self, path: str, *, allow_external: bool) -> None:
        self.path = path
        if not os.path.exists(path):
            if os.path.exists(path + PARTIAL_SUFFIX):
                raise IncompleteFileError(
                    f"{path}: no such file yet, the extraction is incomplete: only {path + PARTIAL_SUFFIX} exists "
                    "(still being written, or its writer stopped); wait for it to finish, or complete it with "
                    "cka-extract --resume"
                )
            raise FormatError(f"{path}: no such file")
        if path.endswith(PARTIAL_SUFFIX):
            raise IncompleteFileError(
                f"{path} is incomplete: an unfinished extraction (still being written, or its writer stopped); "
                "wait for it to finish, or complete it with cka-extract --resume"
            )
        require_regular_file(path, "activation file", FormatError)  # opening a FIFO would block forever
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            text = str(exc).lower()
            # match the lock failure itself: a truncated file's message holds "sblock->base_addr"
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text:
                raise IncompleteFileError(
                    f"{path} is incomplete: another process has it open for writing; wait until it finishes"
                ) from exc
            if "truncated file" in text:
                raise FormatError(
                    f"{path} is truncated (shorter than its HDF5 header says): it was not copied completely or "
                    "its writer died; copy it again or extract it again"
                ) from exc
            raise FormatError(
                f"{path} is not a readable HDF5 file (truncated, corrupt or another file type); "
                "activation files are written by cka-extract"
            ) from exc
        self._mapping = FileMap(path)
        try:
            with damaged(path, "its structure"):
                self._validate(allow_external)
        except BaseException:
            self.file.close()
            raise

    def _validate(self, allow_external: bool) -> None:
        """Every check docs/format.md promises, in the order it lists them (longer than 80 lines on purpose:
        one checklist against the spec, each check one short ``raise``)."""
        f, path = self.file, self.path
        attrs = f.attrs
        fmt = _str_attr(attrs, schema.ATTR_FORMAT)
        if fmt != schema.FORMAT_NAME:
            raise FormatError(
                f"{path} is an HDF5 file but not a cka-offline activation file (attribute "
                f"{schema.ATTR_FORMAT!r} is {fmt!r}, expected {schema.FORMAT_NAME!r}); write it with cka-extract"
            )
        version = _str_attr(attrs, schema.ATTR_VERSION)
        try:
            self.version = schema.parse_version(version)
        except ValueError:
            raise FormatError(
                f"{path}: malformed format version {version!r}; expected MAJOR.MINOR; {DAMAGED}"
            ) from None
        if self.version[0] != schema.FORMAT_MAJOR:
            raise VersionError(
                f"{path} uses activation format {version}, but this cka-offline reads format "
                f"{schema.FORMAT_MAJOR}.x; install a cka-offline release that reads format {self.version[0]}.x "
                "(pip install -U cka-offline)"
            )
        for key in schema.REQUIRED_ROOT_ATTRS:
            if key not in attrs:
                raise FormatError(f"{path}: required attribute {key!r} is missing; {DAMAGED}")
        if not allow_external:
            refuse_external(f, path)
        self.n = _int_attr(attrs, schema.ATTR_N_EXAMPLES, path)
        if self.n < 0:
            raise FormatError(f"{path}: attribute {schema.ATTR_N_EXAMPLES!r} is {self.n}; {DAMAGED}")
        if not _int_attr(attrs, schema.ATTR_COMPLETE, path):
            done = _int_attr(attrs, schema.ATTR_ROWS_COMPLETE, path)
            raise IncompleteFileError(
                f"{path} is incomplete ({done} of {self.n} rows written): it is still being written or its "
                "writer stopped; complete it with cka-extract --resume"
            )
        self.chunk_rows = _int_attr(attrs, schema.ATTR_CHUNK_ROWS, path)
        if self.chunk_rows < 1:
            raise FormatError(
                f"{path}: attribute {schema.ATTR_CHUNK_ROWS!r} is {self.chunk_rows}, expected >= 1; {DAMAGED}"
            )
        ids_ds = f.get(schema.IDS_DATASET)
        if not isinstance(ids_ds, h5py.Dataset):
            raise FormatError(f"{path}: dataset /{schema.IDS_DATASET} (example ids) is missing; {DAMAGED}")
        if ids_ds.ndim != 1 or ids_ds.shape[0] != self.n:
            raise FormatError(
                f"{path}: /{schema.IDS_DATASET} has shape {ids_ds.shape}, expected ({self.n},) as {schema.ATTR_N_EXAMPLES} says; {DAMAGED}"
            )
        if not (ids_ds.dtype.kind in "iu" or h5py.check_string_dtype(ids_ds.dtype) is not None):
            raise FormatError(f"{path}: example ids have dtype {ids_ds.dtype}; expected integers or strings; {DAMAGED}")
        check_stored(ids_ds, path, "the example ids")
        require_filters(ids_ds, path, "the example ids")
        self.ids = _read_ids(ids_ds)
        if self.ids.dtype.kind == "u" and len(self.ids) and int(self.ids.max()) > np.iinfo(np.int64).max:
            raise FormatError(
                f"{path}: example id {int(self.ids.max())} does not fit in 64-bit signed integers, which the "
                f"format stores (docs/format.md /ids); {DAMAGED}"
            )
        if self.ids.dtype.kind in "iu":
            self.ids = self.ids.astype(np.int64)
        uniq, counts = np.unique(self.ids, return_counts=True)
        if len(uniq) != len(self.ids):
            raise FormatError(
                f"{path}: example id {format_id(uniq[counts > 1][0])} occurs more than once; ids must be unique; {DAMAGED}"
            )
        group = f.get(schema.LAYERS_GROUP)
        if not isinstance(group, h5py.Group) or len(group) == 0:
            raise FormatError(f"{path}: group /{schema.LAYERS_GROUP} is missing or holds no layers; {DAMAGED}")
        layers = []
        for key in group:
            ds = group[key]
            if not isinstance(ds, h5py.Dataset):
                raise FormatError(f"{path}: /{schema.LAYERS_GROUP}/{key} is not a dataset; {DAMAGED}")
            for attr in schema.REQUIRED_LAYER_ATTRS:
                if attr not in ds.attrs:
                    raise FormatError(
                        f"{path}: layer dataset /{schema.LAYERS_GROUP}/{key} lacks attribute {attr!r}; {DAMAGED}"
                    )
            name = _str_attr(ds.attrs, schema.LAYER_ATTR_NAME)
            if ds.ndim != 2:
                raise FormatError(
                    f"{path}: layer {name!r} has {ds.ndim} dimensions; expected (examples, features); {DAMAGED}"
                )
            if ds.shape[0] != self.n:
                raise FormatError(
                    f"{path}: layer {name!r} has {ds.shape[0]} rows but the file has {self.n} example ids; {DAMAGED}"
                )
            if ds.dtype.name not in schema.STORED_DTYPES:
                raise FormatError(
                    f"{path}: layer {name!r} is stored as {ds.dtype}; expected float32 or float16; {DAMAGED}"
                )
            features = _int_attr(ds.attrs, schema.LAYER_ATTR_FEATURES, path)
            if features != ds.shape[1]:
                raise FormatError(
                    f"{path}: layer {name!r} says {features} features but stores {ds.shape[1]}; {DAMAGED}"
                )
            check_stored(ds, path, f"layer {name!r}")
            reduction = _str_attr(ds.attrs, schema.LAYER_ATTR_REDUCTION)
            try:
                shape = tuple(int(x) for x in np.asarray(ds.attrs[schema.LAYER_ATTR_ORIGINAL_SHAPE]).reshape(-1))
            except (TypeError, ValueError):
                raise FormatError(
                    f"{path}: layer {name!r} has a malformed original_shape attribute; {DAMAGED}"
                ) from None
            require_filters(ds, path, f"layer {name!r}")
            layers.append(
                LayerMeta(
                    name,
                    shape,
                    reduction,
                    features,
                    ds.dtype.name,
                    _int_attr(ds.attrs, schema.LAYER_ATTR_ORDER, path),
                    key,
                    _str_attr(ds.attrs, schema.LAYER_ATTR_ALIAS),  # 1.1; "" in older files
                )
            )
        layers.sort(key=lambda m: m.order)
        names = [m.name for m in layers]
        if len(set(names)) != len(names):
            raise FormatError(f"{path}: two layers share a name; {DAMAGED}")
        self.layers = layers
        self.shard_index = _int_attr(attrs, schema.ATTR_SHARD_INDEX, path, 0)
        self.shard_count = _int_attr(attrs, schema.ATTR_SHARD_COUNT, path, 1)
        self.offset = _int_attr(attrs, schema.ATTR_EXAMPLE_OFFSET, path, 0)
        self._provenance = self._read_provenance()

    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def layer_meta(self, name: str) -> LayerMeta:
        return next(m for m in self.layers if m.name == name)

    def mapped_blocks(self, meta: LayerMeta) -> list[tuple[int, np.ndarray, mmap.mmap, int]] | None:
        """Layer ``meta``'s rows as views of a memory map of the file (see :meth:`FileMap.blocks`)."""
        return self._mapping.blocks(self.file, meta, self.n)

    def release_mapped(self) -> None:
        """Unmap the pages of this file read so far (see :meth:`FileMap.release`)."""
        self._mapping.release()

    def close(self) -> None:
        self.file.close()
        self._mapping.close()

    def _read_provenance(self) -> dict[str, Any]:
        attrs = self.file.attrs
        out: dict[str, Any] = {key: _str_attr(attrs, key) for key in schema.PROVENANCE_ATTRS if key in attrs}
        for key in (schema.ATTR_TOOL_VERSION, schema.ATTR_CREATED):
            out[key] = _str_attr(attrs, key)
        out["format_version"] = f"{self.version[0]}.{self.version[1]}"
        extra = _str_attr(attrs, schema.ATTR_EXTRA) if schema.ATTR_EXTRA in attrs else "{}"
        try:
            out["extra"] = json.loads(extra or "{}")
        except json.JSONDecodeError:
            raise FormatError(f"{self.path}: attribute 'extra' is not valid JSON; {DAMAGED}") from None
        return out


class ActivationFile:
    """One logical activation file: a single file or several shards concatenated in example order."""

    def __init__(self, paths: Sequence[str], *, allow_external: bool = False, allow_lone_shard: bool = False) -> None:
        self.paths = list(paths)
        shards: list[_Shard] = []
        try:
            for path in self.paths:
                shards.append(_Shard(path, allow_external=allow_external))
            self._shards = _order_shards(shards, allow_lone_shard)
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        first = self._shards[0]
        self.paths = [s.path for s in self._shards]
        self.version = first.version
        self.layers: list[LayerMeta] = first.layers
        self.layer_names = [m.name for m in self.layers]
        self._by_name = {m.name: m for m in self.layers}
        self.chunk_rows = first.chunk_rows
        self.n_examples = sum(s.n for s in self._shards)
        self.ids = np.concatenate([s.ids for s in self._shards]) if len(self._shards) > 1 else first.ids
        self._starts = np.cumsum([0] + [s.n for s in self._shards])
        self.provenance = first.provenance()
        if len(self._shards) > 1:
            self.provenance["shards"] = [s.path for s in self._shards]

    @property
    def path(self) -> str:
        """The first (or only) file's path, for messages."""
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} shards)"

    def layer(self, name: str) -> LayerMeta:
        try:
            return self._by_name[name]
        except KeyError:
            raise FormatError(f"{self.path}: no layer named {name!r}; it has {', '.join(self.layer_names)}") from None

    def read(self, layer: str, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``layer`` (stored dtype), across shard boundaries.

        ``out``: a C-contiguous ``(stop - start, features)`` array of the stored dtype to read into (a
        streaming caller reuses its buffers: fresh pages cost more than the copy itself)."""
        meta = self.layer(layer)
        start, stop = max(0, int(start)), min(self.n_examples, int(stop))
        if out is not None:
            if out.shape != (stop - start, meta.features) or out.dtype != np.dtype(meta.dtype):
                raise ValueError(
                    f"out must be ({stop - start}, {meta.features}) {meta.dtype}, got {out.shape} {out.dtype}"
                )
            for i, shard in enumerate(self._shards):
                lo, hi = self._starts[i], self._starts[i + 1]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    ds = shard.file[schema.LAYERS_GROUP][meta.key]
                    ds.read_direct(out, np.s_[a - lo : b - lo], np.s_[a - start : b - start])
            return out
        parts = []
        for i, shard in enumerate(self._shards):
            lo, hi = self._starts[i], self._starts[i + 1]
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                with damaged(shard.path, f"rows {a - lo}:{b - lo} of layer {meta.name!r}"):
                    parts.append(shard.file[schema.LAYERS_GROUP][meta.key][a - lo : b - lo])
        if not parts:
            return np.empty((0, meta.features), dtype=meta.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_rows(self, layer: str, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order) of ``layer``. Reads the chunk-aligned blocks those rows lie in, one
        block at a time, so memory is the output plus one block."""
        meta = self.layer(layer)
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), meta.features), dtype=meta.dtype)
        if len(index) == 0:
            return out
        if index.min() < 0 or index.max() >= self.n_examples:
            raise IndexError(f"row index out of range 0..{self.n_examples - 1}")
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        block = self.chunk_rows
        block_of = sorted_idx // block
        bounds = np.flatnonzero(np.diff(block_of)) + 1
        for seg in np.split(np.arange(len(sorted_idx)), bounds):
            b = int(block_of[seg[0]])
            lo = b * block
            rows = self.read(layer, lo, lo + block)
            out[order[seg]] = rows[sorted_idx[seg] - lo]
        return out

    def iter_blocks(
        self, layers: Sequence[str] | None = None, block_rows: int | None = None
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yield ``(start, stop, {layer: rows})`` over all examples in chunk-aligned blocks."""
        names = list(layers) if layers is not None else self.layer_names
        step = block_rows or self.chunk_rows
        for start in range(0, self.n_examples, step):
            stop = min(self.n_examples, start + step)
            yield start, stop, {name: self.read(name, start, stop) for name in names}

    def mapped_rows(self, layer: str) -> MappedRows | None:
        """Layer ``layer``'s rows as memory-mapped views (no HDF5 call, no copy until gathered), or ``None``
        when a shard stores it in a way that needs HDF5 (see :meth:`_Shard.mapped_blocks`)."""
        meta = self.layer(layer)
        starts: list[int] = []
        views: list[np.ndarray] = []
        for i, shard in enumerate(self._shards):
            blocks = shard.mapped_blocks(shard.layer_meta(meta.name))
            if blocks is None:
                return None
            for start, view, _, _ in blocks:
                starts.append(int(self._starts[i]) + start)
                views.append(view)
        return MappedRows(np.asarray(starts, dtype=np.int64), views, self.n_examples)

    def release_mapped(self) -> None:
        """Unmap every page of the file's memory maps read so far (see :meth:`MappedRows.gather`)."""
        for shard in self._shards:
            shard.release_mapped()

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> ActivationFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ActivationFile({self.path!r}, n_examples={self.n_examples}, layers={len(self.layers)})"


def expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """A path, a glob pattern or a list of them -> sorted list of existing-or-named paths."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?[") and not os.path.exists(text):
            matches = sorted(p for p in globlib.glob(text) if not p.endswith(PARTIAL_SUFFIX))
            if not matches:
                partial = globlib.glob(text + PARTIAL_SUFFIX)
                hint = (
                    f" ({len(partial)} unfinished .partial file(s) match: finish them with --resume)" if partial else ""
                )
                raise FormatError(f"no activation file matches {text!r}{hint}")
            out.extend(matches)
        else:
            out.append(text)
    if not out:
        raise FormatError("no activation file given")
    return out


def open_activations(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    allow_external: bool = False,
    allow_lone_shard: bool = False,
) -> ActivationFile:
    """Open an activation file, or shard files (list or glob) of one logical file, and validate it.

    Args:
        paths: a path, a glob (``"run/acts-*.h5"``) or a list of paths.
        allow_external: read files holding HDF5 external links, external storage or virtual datasets
            (refused by default: a shared file must not make the reader open arbitrary local files).
        allow_lone_shard: open one shard of a multi-shard logical file on its own (to look at it); by
            default that is refused, so an analysis never silently uses part of the examples.
    """
    return ActivationFile(expand_paths(paths), allow_external=allow_external, allow_lone_shard=allow_lone_shard)


def _order_shards(shards: list[_Shard], allow_lone_shard: bool = False) -> list[_Shard]:
    if len(shards) == 1:
        only = shards[0]
        if only.shard_count > 1 and not allow_lone_shard:
            raise AlignmentError(
                f"{only.path} is shard {only.shard_index} of {only.shard_count} of one logical file; pass all "
                f"{only.shard_count} shard files (a list or a glob such as 'name-*-of-{only.shard_count:05d}.h5')"
            )
        return shards
    shards = sorted(shards, key=lambda s: (s.offset, s.shard_index))
    first = shards[0]
    names = [p.path for p in shards]
    if all(s.shard_count == 1 for s in shards):  # a quoted glob of whole files, meant to be compared
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise AlignmentError(
            f"the glob or list matched {len(names)} files that are not shards of one file ({shown}): a quoted "
            "glob is read as the shards of one extraction; to compare the files pairwise, pass them as separate "
            "files (unquoted on the command line, e.g. cka-analyze r18_s*.h5; in Python, one list item per file)"
        )
    counts = {s.shard_count for s in shards}
    if len(counts) != 1:
        raise AlignmentError(f"shards disagree on the number of shards ({sorted(counts)}): {names}")
    (count,) = counts
    if count != len(shards):
        have = sorted(s.shard_index for s in shards)
        raise AlignmentError(
            f"the logical file has {count} shards but {len(shards)} were given (shard indexes {have}); "
            "pass all shard files"
        )
    if sorted(s.shard_index for s in shards) != list(range(count)):
        raise AlignmentError(f"shard indexes {[s.shard_index for s in shards]} are not 0..{count - 1}: {names}")
    ref = first.provenance()
    ref_layers = [(m.name, m.features, m.reduction, m.original_shape, m.dtype) for m in first.layers]
    expected_offset = 0
    for shard in shards:
        prov = shard.provenance()
        for key in ("model", "model_sha256", "extractor", "options", "inputs_sha256"):
            if prov.get(key, "") != ref.get(key, ""):
                raise AlignmentError(
                    f"shard {shard.path} differs from {first.path} in {key!r}: shards must come from the same "
                    "model, inputs and options"
                )
        layers = [(m.name, m.features, m.reduction, m.original_shape, m.dtype) for m in shard.layers]
        if layers != ref_layers:
            raise AlignmentError(f"shard {shard.path} has other layers than {first.path}")
        if shard.offset != expected_offset:
            raise AlignmentError(
                f"shard {shard.path} starts at example {shard.offset} but the shards before it end at "
                f"{expected_offset}: shards overlap or one is missing"
            )
        expected_offset += shard.n
    all_ids = np.concatenate([s.ids for s in shards])
    uniq, counts_ = np.unique(all_ids, return_counts=True)
    if len(uniq) != len(all_ids):
        raise AlignmentError(
            f"example id {format_id(uniq[counts_ > 1][0])} occurs in more than one shard; shards must be disjoint"
        )
    return shards


def check_stored(
    ds: h5py.Dataset, path: str, what: str, *, fix: str = DAMAGED, error: type[CKAOfflineError] = FormatError
) -> None:
    """The values a dataset declares must be stored in the file: a damaged or hostile file may declare
    2**40 rows it does not hold, and reading it must not allocate for them. ``error`` names ``what`` in
    ``path`` and ends with ``fix``."""
    if ds.size == 0 or ds.is_virtual or ds.external:
        return
    itemsize = ds.dtype.itemsize
    if ds.chunks is None:
        # variable-length values live in the global heap: the dataset itself stores one reference each
        stored_per_value = itemsize if ds.dtype.kind != "O" else min(itemsize, 8)
        if ds.id.get_storage_size() < ds.size * stored_per_value:
            raise error(f"{path}: {what} declares shape {ds.shape} but the file does not store its values; {fix}")
        return
    chunk_bytes = math.prod(ds.chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise error(
            f"{path}: {what} has chunks of {chunk_bytes / 2**20:.0f} MiB (chunk shape {ds.chunks}); the reader "
            f"decompresses at most {MAX_CHUNK_BYTES / 2**20:.0f} MiB per chunk; {fix}"
        )
    expected = math.prod(math.ceil(size / chunk) for size, chunk in zip(ds.shape, ds.chunks))
    stored = ds.id.get_num_chunks()
    if stored < expected:
        raise error(
            f"{path}: {what} declares shape {ds.shape} but stores only {stored} of its {expected} chunks; {fix}"
        )


def _str_attr(attrs: Any, key: str) -> str:
    value = attrs.get(key, "")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    return str(value)


def _int_attr(attrs: Any, key: str, path: str, default: int | None = None) -> int:
    value = attrs.get(key, default)
    try:
        arr = np.asarray(value)
        if arr.shape != () or arr.dtype.kind not in "iub":
            raise TypeError
        return int(arr)
    except (TypeError, ValueError):
        shown = " ".join(repr(value).split())
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        raise FormatError(f"{path}: attribute {key!r} must be an integer, got {shown}; {DAMAGED}") from None


__all__ = [
    "ActivationFile",
    "LayerMeta",
    "MappedRows",
    "check_stored",
    "expand_paths",
    "open_activations",
    "refuse_external",
]
