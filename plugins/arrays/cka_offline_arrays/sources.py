"""Reading precomputed arrays in row blocks without loading them: .npy folders, .npz and .safetensors files.

Every array of a source has one row per example on axis 0. :func:`open_arrays` validates a source
(readable headers, numeric dtypes, the same number of rows everywhere, ids) from the file headers alone
and returns an :class:`ArraySet` whose :meth:`ArraySet.rows` reads only the requested rows:

- ``.npy`` files and *stored* (uncompressed, ``np.savez``) ``.npz`` members are memory-mapped;
- *compressed* (``np.savez_compressed``) ``.npz`` members cannot be: each one is decompressed once, when
  first read, into a temporary ``.npy`` file (under ``$TMPDIR``) which is then memory-mapped;
- ``.safetensors`` tensors are read with ``safetensors.safe_open(...).get_slice(name)[start:stop]``.

An array called ``ids`` (``ids.npy`` in a folder, member ``ids`` of an ``.npz``, tensor ``ids`` of a
``.safetensors``) holds the example ids and is not a layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import weakref
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cka_offline.errors import CKAOfflineError, FormatError, InputError
from cka_offline.inputs import check_ids
from cka_offline.untrusted import (
    NpyHeader,
    check_npy_stored,
    read_npy_header,
    require_regular_file,
    shown,
)

log = logging.getLogger(__name__)

IDS_NAME = "ids"
LAYER_NAMES_FILE = "layers.json"
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
#: deflate's largest expansion: a compressed member cannot decompress to more than this times its size
_DEFLATE_MAX_RATIO = 1032


@dataclass
class ArrayEntry:
    """One array of a source: a layer (or the ids), described from its header; rows read on demand."""

    name: str  #: layer name
    where: str  #: file (and member) for messages
    shape: tuple[int, ...]  #: full shape, rows first
    dtype: np.dtype
    read_range: Callable[[int, int], np.ndarray]  #: rows start:stop (may be a memory-mapped view)
    aliases: tuple[str, ...] = ()  #: other names it may be selected by (its file name, if renamed)

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Per-example shape; a 1-D array has one feature per example."""
        return self.shape[1:] if len(self.shape) > 1 else (1,)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (1-D ints in range) as a native-endian C-contiguous ``(len(index), *example_shape)``."""
        if len(index) == 0:
            return np.empty((0, *self.example_shape), dtype=self.dtype.newbyteorder("="))
        # read each run of consecutive rows as one block: a slice of the map, or one get_slice call
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(index)]])
        parts = [self.read_range(int(index[s]), int(index[e - 1]) + 1) for s, e in zip(starts, ends)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        block = np.ascontiguousarray(block, dtype=self.dtype.newbyteorder("="))
        return block.reshape(len(index), *self.example_shape)


class ArraySet:
    """The validated arrays of one source: ``layers`` in order, ``ids`` (one per row), ``n_rows``."""

    def __init__(
        self,
        source: str,
        kind: str,
        layers: list[ArrayEntry],
        ids: np.ndarray,
        ids_from: str,
        closers: list[Callable[[], None]],
    ) -> None:
        self.source = source
        self.kind = kind  #: one line: what was imported, for provenance
        self.layers = {entry.name: entry for entry in layers}
        self.ids = ids
        self.ids_from = ids_from
        self.n_rows = len(ids)
        self._closers = closers

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        return self.layers[name].rows(index)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def open_arrays(source: str, *, ids: str | None = None) -> ArraySet:
    """Open and validate a folder of ``.npy`` files, an ``.npz`` or a ``.safetensors`` file.

    Args:
        source: the folder or file.
        ids: a ``.npy`` (1-D integers or strings) or ``.txt`` (one id per line) file of example ids; it
            overrides an ``ids`` array inside the source. Without either, the ids are the row numbers.

    Raises:
        FormatError: unreadable or empty source, non-numeric or scalar arrays, different numbers of rows.
        InputError: ids that are missing, of the wrong length or not unique.
    """
    closers: list[Callable[[], None]] = []
    try:
        if os.path.isdir(source):
            kind, entries = _open_folder(source)
        elif source.endswith(".npz") and os.path.exists(source):
            kind, entries = _open_npz(source, closers)
        elif source.endswith(".safetensors") and os.path.exists(source):
            require_regular_file(source, "array file", FormatError)  # a FIFO would block safetensors
            kind, entries = _open_safetensors(source, closers)
        elif not os.path.exists(source):
            raise FormatError(f"{source}: no such file or folder")
        else:
            raise FormatError(
                f"{source}: expected a folder of .npy files (one per layer), an .npz or a .safetensors file"
            )
        ids_entry = next((e for e in entries if e.name == IDS_NAME), None)
        layers = [e for e in entries if e is not ids_entry]
        if not layers:
            raise FormatError(f"{source}: no layer arrays found (only {IDS_NAME!r}); expected one array per layer")
        for entry in layers:
            _check_entry(entry)
        first = layers[0]
        for entry in layers[1:]:
            if entry.n_rows != first.n_rows:
                hint = ""
                if kind.startswith(".safetensors"):
                    hint = (
                        "; if this is a model's weights rather than activations, give it to the torch "
                        "extractor as --weights"
                    )
                raise FormatError(
                    f"{entry.where} has {entry.n_rows} rows but {first.where} has {first.n_rows}; every array "
                    f"must hold one row per example on axis 0{hint}"
                )
        if ids is not None:
            id_values, ids_from = _load_ids_file(ids), ids
        elif ids_entry is not None:
            if ids_entry.dtype.hasobject:
                raise InputError(
                    f"{ids_entry.where}: ids stored as Python objects are never unpickled; save "
                    "them as integers or fixed-width strings (np.array(ids, dtype=str))"
                )
            id_values, ids_from = ids_entry.read_range(0, ids_entry.n_rows), ids_entry.where
        else:
            id_values, ids_from = np.arange(first.n_rows, dtype=np.int64), "row numbers"
        id_values = _check_ids(id_values, ids_from, first.n_rows)
        return ArraySet(source, kind, layers, id_values, ids_from, closers)
    except BaseException:
        for close in reversed(closers):
            close()
        raise


# --- .npy folders ----------------------------------------------------------------------------------------


def _open_folder(folder: str) -> tuple[str, list[ArrayEntry]]:
    files = sorted((e.name for e in os.scandir(folder) if e.name.endswith(".npy") and e.is_file()), key=_natural_key)
    if not files:
        raise FormatError(
            f"{folder}: no .npy files in this folder; expected one .npy file per layer "
            "(layer name = file name without .npy)"
        )
    names = {f: f[: -len(".npy")] for f in files}
    order = files
    mapping_path = os.path.join(folder, LAYER_NAMES_FILE)
    if os.path.isfile(mapping_path):
        mapping = _read_layer_names(mapping_path, files)
        names.update(mapping)
        order = list(mapping) + [f for f in files if f not in mapping]
    entries: list[ArrayEntry] = []
    seen: dict[str, str] = {}
    for fname in order:
        name = names[fname]
        if name in seen:
            raise FormatError(
                f"{mapping_path}: {seen[name]} and {fname} are both named {name!r}; give every file its own layer name"
            )
        seen[name] = fname
        entry = _map_npy(os.path.join(folder, fname), name)
        if name != fname[: -len(".npy")]:
            entry.aliases = (fname[: -len(".npy")],)
        entries.append(entry)
    return f"folder of {len(files)} .npy files", entries


def _read_layer_names(path: str, files: list[str]) -> dict[str, str]:
    """``layers.json``: ``{"file.npy" (or "file"): "original layer name"}``; keys in model order."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise FormatError(f'{path}: expected a JSON object {{"file.npy": "layer name", ...}}')
    mapping = {}
    for key, name in raw.items():
        fname = key if key.endswith(".npy") else key + ".npy"
        if fname not in files:
            raise FormatError(f"{path}: {key!r} is not a .npy file of the folder; files: {', '.join(files)}")
        if IDS_NAME in (fname[: -len(".npy")], name):
            raise FormatError(
                f"{path}: {key!r}: the name {IDS_NAME!r} is kept for the example ids; remove it from the mapping"
            )
        mapping[fname] = name
    return mapping


def _map_npy(
    path: str, name: str, where: str | None = None, *, exact: bool = False, error: type[CKAOfflineError] = FormatError
) -> ArrayEntry:
    """A ``.npy`` file, memory-mapped on first read once its header is checked against its size."""
    where = where or shown(path)
    size = require_regular_file(path, "array file", error)
    with open(path, "rb") as fh:
        header = read_npy_header(fh, where, error)
    check_npy_stored(header, size - header.header_bytes, where, error, exact=exact)
    return _mapped_entry(name, where, path, header.header_bytes, header)


def _mapped_entry(name: str, where: str, path: str, offset: int, header: NpyHeader) -> ArrayEntry:
    """An array whose values (checked to be stored) start at byte ``offset`` of ``path``."""
    state: dict[str, Any] = {}
    shape, dtype = header.shape, header.dtype

    def read_range(start: int, stop: int) -> np.ndarray:
        if header.nbytes == 0:  # no rows: nothing to map
            return np.empty((0, *shape[1:]), dtype=dtype)
        if "map" not in state:  # opened on first read: validation reads headers only
            order: Literal["C", "F"] = "F" if header.fortran else "C"
            state["map"] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        return state["map"][start:stop]

    return ArrayEntry(name, where, shape, dtype, read_range)


# --- .npz --------------------------------------------------------------------------------------------


def _open_npz(path: str, closers: list[Callable[[], None]]) -> tuple[str, list[ArrayEntry]]:
    size = require_regular_file(path, "array file", FormatError)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{path}: not a readable .npz (zip) file ({exc})") from exc
    closers.append(zf.close)
    tmp = _TempDir()
    entries, compressed = [], []
    with open(path, "rb") as raw:
        for info in zf.infolist():
            if info.is_dir():
                continue
            where = f"{path}:{info.filename}"
            if not info.filename.endswith(".npy"):
                raise FormatError(f"{where}: not a .npy member; an .npz must hold only arrays (np.savez)")
            if info.flag_bits & 0x1:
                raise FormatError(f"{where}: encrypted members cannot be read")
            name = info.filename[: -len(".npy")]
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                local = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                if local[0] != b"PK\x03\x04":
                    raise FormatError(f"{where}: broken zip local header")
                raw.seek(info.header_offset + _LOCAL_HEADER.size + local[9] + local[10])
                start = raw.tell()
                header = read_npy_header(raw, where, FormatError)
                stored = min(info.file_size, size - start) - header.header_bytes
                check_npy_stored(header, stored, where, FormatError)
                entries.append(_mapped_entry(name, where, path, start + header.header_bytes, header))
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                try:
                    with zf.open(info) as member:
                        header = read_npy_header(member, where, FormatError)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise FormatError(f"{where}: damaged compressed member ({exc}); save the arrays again") from None
                # deflate expands at most _DEFLATE_MAX_RATIO times: a larger declaration cannot be real
                bound = min(info.file_size, _DEFLATE_MAX_RATIO * info.compress_size + 1024)
                check_npy_stored(header, bound - header.header_bytes, where, FormatError)
                compressed.append(info.filename)
                reader = _spilled_reader(zf, info, where, tmp, closers)
                entries.append(ArrayEntry(name, where, header.shape, header.dtype, reader))
            else:
                raise FormatError(
                    f"{where}: compressed with zip method {info.compress_type}; np.savez and np.savez_compressed "
                    "write stored or deflated members: save the arrays with one of them"
                )
    if compressed:
        log.info(
            "%s: %d of %d members are compressed (np.savez_compressed) and cannot be memory-mapped; "
            "each is decompressed once, when first read, to a temporary file under %s. Save with np.savez "
            "to read them in place.",
            path,
            len(compressed),
            len(entries),
            tempfile.gettempdir(),
        )
    return f".npz file with {len(entries)} arrays ({len(compressed)} compressed)", entries


class _TempDir:
    path: str | None = None


def _spilled_reader(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, tmp: _TempDir, closers: list[Callable[[], None]]
) -> Callable[[int, int], np.ndarray]:
    state: dict[str, ArrayEntry] = {}

    def read_range(start: int, stop: int) -> np.ndarray:
        if "entry" not in state:
            if tmp.path is None:
                tmp.path = tempfile.mkdtemp(prefix="cka-arrays-")
                # removed by close(), or when the arrays are garbage-collected, or at exit
                closers.append(weakref.finalize(tmp, shutil.rmtree, tmp.path, ignore_errors=True))
            target = os.path.join(tmp.path, f"{len(os.listdir(tmp.path))}.npy")
            log.info("%s: decompressing %d bytes to %s", where, info.file_size, target)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise FormatError(f"{where}: damaged compressed member ({exc}); save the arrays again") from None
            except OSError as exc:
                raise InputError(
                    f"{where}: cannot decompress it to {target} ({exc}); free space there, point "
                    "TMPDIR elsewhere, or save the arrays with np.savez (uncompressed)"
                ) from exc
            # the header was checked against the zip's declared size; the data must really be there too
            state["entry"] = _map_npy(target, info.filename, where, exact=True)
        return state["entry"].read_range(start, stop)

    return read_range


# --- .safetensors ----------------------------------------------------------------------------------------


def _open_safetensors(path: str, closers: list[Callable[[], None]]) -> tuple[str, list[ArrayEntry]]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="numpy")
    except Exception as exc:  # safetensors raises its own SafetensorError for broken headers
        raise FormatError(f"{path}: not a readable .safetensors file ({exc})") from exc
    closers.append(lambda: handle.__exit__(None, None, None))
    entries = []
    for name in sorted(handle.keys(), key=_natural_key):
        tensor = handle.get_slice(name)
        where = f"{path}:{name}"
        code = tensor.get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise FormatError(
                f"{where}: dtype {code} has no numpy equivalent; save it as float32 (e.g. tensor.float()) or float16"
            )
        entries.append(
            ArrayEntry(
                name,
                where,
                tuple(tensor.get_shape()),
                np.dtype(_SAFETENSORS_DTYPES[code]),
                _slicer(tensor),
            )
        )
    return f".safetensors file with {len(entries)} tensors", entries


# --- validation ------------------------------------------------------------------------------------------


def _check_entry(entry: ArrayEntry) -> None:
    if entry.dtype.hasobject:
        raise FormatError(
            f"{entry.where}: holds Python objects (dtype {entry.dtype}), which are never unpickled; "
            "save numeric arrays, e.g. np.save(path, x.astype(np.float32))"
        )
    if entry.dtype.kind not in _NUMERIC_KINDS or entry.dtype.fields is not None:
        raise FormatError(
            f"{entry.where}: dtype {entry.dtype} is not numeric; expected bool, integer or float activations"
        )
    if len(entry.shape) == 0:
        raise FormatError(f"{entry.where}: is a single number (0-d); expected one row per example on axis 0")
    if entry.shape[0] == 0:
        raise FormatError(f"{entry.where}: has no rows (shape {entry.shape}); expected one row per example")
    if 0 in entry.shape[1:]:
        raise FormatError(f"{entry.where}: has no features per example (shape {entry.shape})")


def _load_ids_file(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise InputError(f"ids file {shown(path)}: no such file")
    require_regular_file(path, "ids file")
    if path.endswith(".npy"):
        entry = _map_npy(path, IDS_NAME, f"ids file {shown(path)}", error=InputError)
        if not entry.shape:
            raise InputError(f"ids file {shown(path)}: holds a single value; expected a 1-D array of ids")
        return np.array(entry.read_range(0, entry.n_rows))
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(
                f"ids file {shown(path)}: byte {exc.start} is not valid UTF-8; save it as UTF-8 text, one id per line"
            ) from None
        if lines and all(re.fullmatch(r"-?[1-9][0-9]*|0", s) and len(s) < 19 for s in lines):
            return np.array([int(s) for s in lines], dtype=np.int64)  # ids such as "007" stay strings
        return np.array(lines, dtype=str)
    raise InputError(f"ids file {path}: expected a .npy array or a .txt file with one id per line")


def _check_ids(ids: np.ndarray, where: str, n_rows: int) -> np.ndarray:
    """Ids checked here for shape, type, length and duplicates (naming the rows), then stored faithfully by
    the core's :func:`~cka_offline.inputs.check_ids` (bytes decoded as UTF-8; unsigned ids above 2**63-1
    and text that is not UTF-8 refused)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise InputError(f"ids from {where}: expected a 1-D array, got shape {ids.shape}")
    if ids.dtype.kind not in "iuSU":
        raise InputError(f"ids from {where}: expected integers or strings, got dtype {ids.dtype}")
    if len(ids) != n_rows:
        raise InputError(f"ids from {where}: {len(ids)} ids for {n_rows} rows; give exactly one id per example")
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if len(uniq) != len(ids):
        dup = int(np.flatnonzero(counts > 1)[0])
        rows = np.flatnonzero(ids == uniq[dup])
        raise InputError(
            f"ids from {where}: id {uniq[dup].item()!r} occurs {counts[dup]} times (rows "
            f"{', '.join(map(str, rows[:5]))}); every example needs its own id"
        )
    return check_ids(ids, f"ids from {where}")


def _natural_key(name: str) -> list[Any]:
    """``layer2`` before ``layer10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _slicer(tensor: Any) -> Any:
    """Rows ``start:stop`` of a safetensors slice, read when asked for."""
    return lambda start, stop: tensor[start:stop]
