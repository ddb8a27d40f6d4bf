"""Saving and loading a :class:`~cka_offline.results.CKAResult`: ``.h5``, ``.json`` and ``.csv``.

The formats are specified in ``docs/results.md``; every key comes from :mod:`.schema`, its only mirror here.

- ``.h5`` -- datasets ``cka``, ``se``, ``low``, ``high`` (L x L float64) and a JSON attribute ``meta``
  with everything else (files, layer names, provenance, hashes, parameters, warnings). Never pickle.
- ``.json`` -- the same content in one JSON document; NaN is written as ``null``.
- ``.csv`` -- long format, one row per (layer of A, layer of B) of each reported pair:
  ``file_a, layer_a, file_b, layer_b, cka, se, low, high``; NaN is an empty field. It holds the numbers
  and names only (no provenance, hashes or parameters).

Every save builds the whole file in memory first (results are small: four ``L x L`` matrices and the
metadata), then writes those bytes to a temporary file next to the target and renames it
(:func:`~cka_offline.files.write_bytes`): a failed save never leaves a half-written file under the target
name, and HDF5 never writes to the disk itself, so a full disk is one clear ``OutputError`` (HDF5 cannot
recover from a failed write: its handle is lost and closing it crashed the process).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import FormatError, OutputError
from ..files import refuse_existing, write_bytes
from . import schema
from .model import CKAResult, FileInfo


# -------------------------------------------------------------------- format
def result_format(path: str, format: str | None = None) -> str:
    """The result format for ``path``: ``format`` if given, else from the extension.

    Raises:
        OutputError: an unknown format, or an extension that names none.
    """
    if format is not None:
        fmt = format.lower().lstrip(".")
        fmt = schema.FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in schema.FORMATS:
            raise OutputError(f"unknown result format {format!r}; expected one of {', '.join(schema.FORMATS)}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in schema.EXTENSIONS:
        raise OutputError(
            f"cannot tell the result format of {path!r} from its extension {ext or '(none)'!r}; "
            f"use .h5, .json or .csv (or give the format explicitly)"
        )
    return schema.EXTENSIONS[ext]


# -------------------------------------------------------------------- saving
def result_meta(result: CKAResult) -> dict[str, Any]:
    """The result document without the matrices (the HDF5 ``meta`` attribute)."""
    return {
        schema.KEY_FORMAT: schema.FORMAT_NAME,
        schema.KEY_VERSION: schema.FORMAT_VERSION,
        schema.KEY_TOOL_VERSION: result.version,
        schema.KEY_FILES: [
            {
                schema.FILE_LABEL: f.label,
                schema.FILE_PATHS: list(f.paths),
                schema.FILE_LAYERS: list(f.layers),
                schema.FILE_PROVENANCE: _jsonable(f.provenance),
                schema.FILE_SHA256: list(f.sha256),
                schema.FILE_N_EXAMPLES: int(f.n_examples),
                schema.FILE_ALIASES: list(f.aliases),
            }
            for f in result.files
        ],
        schema.KEY_PAIRS: [list(p) for p in result.pairs],
        schema.KEY_PARAMS: _jsonable(result.params),
        schema.KEY_N_EXAMPLES: int(result.n_examples),
        schema.KEY_N_MINIBATCHES: int(result.n_minibatches),
        schema.KEY_TIMING: _jsonable(result.timing),
        schema.KEY_WARNINGS: list(result.warnings),
        schema.KEY_CONFIDENCE: float(result.confidence),
    }


def result_document(result: CKAResult) -> dict[str, Any]:
    """The whole result document (the JSON file): the meta, then the matrices as lists with NaN as None."""
    doc = result_meta(result)
    for name in schema.MATRICES:
        doc[name] = _nan_to_none(getattr(result, name))
    return doc


def json_bytes(result: CKAResult) -> bytes:
    """The ``.json`` file: the result document as strict JSON (no bare NaN)."""
    return (json.dumps(result_document(result), allow_nan=False, indent=1) + "\n").encode("utf-8")


def h5_bytes(result: CKAResult) -> bytes:
    """The ``.h5`` file, built in memory: the matrices as datasets and the rest as the JSON root attribute
    ``meta``; the stacked layer names are the matrices' dimension scales ``layer_a`` (rows) and ``layer_b``
    (columns), with each layer's file label in ``file_a`` / ``file_b`` (1.2), so netCDF readers show names."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.attrs[schema.H5_ATTR_FORMAT] = schema.FORMAT_NAME
        h5.attrs[schema.H5_ATTR_VERSION] = schema.FORMAT_VERSION
        h5.attrs[schema.H5_ATTR_META] = json.dumps(result_meta(result), allow_nan=False)
        names = [name for f in result.files for name in f.layers]
        labels = [f.label for f in result.files for _ in f.layers]
        text = h5py.string_dtype("utf-8")
        scales = {}
        for dim in (schema.H5_DIM_A, schema.H5_DIM_B):  # 1.2: netCDF readers name the axes after these
            scales[dim] = h5.create_dataset(dim, data=np.array(names, dtype=object), dtype=text)
            scales[dim].make_scale(dim)
        for name, dim in ((schema.H5_FILE_A, schema.H5_DIM_A), (schema.H5_FILE_B, schema.H5_DIM_B)):
            h5.create_dataset(name, data=np.array(labels, dtype=object), dtype=text).dims[0].attach_scale(scales[dim])
        for name in schema.H5_DATASETS:
            data = h5.create_dataset(name, data=getattr(result, name))
            data.dims[0].attach_scale(scales[schema.H5_DIM_A])
            data.dims[1].attach_scale(scales[schema.H5_DIM_B])
            data.attrs[schema.H5_ATTR_COORDINATES] = f"{schema.H5_FILE_A} {schema.H5_FILE_B}"
    return buffer.getvalue()


def csv_bytes(result: CKAResult) -> bytes:
    """The ``.csv`` file: one row per (layer of A, layer of B) of each reported pair; NaN is an empty field."""
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(schema.CSV_COLUMNS)
    for i, j in result.pairs:
        p = result.pair(i, j)
        for a, name_a in enumerate(p.layers_a):
            for b, name_b in enumerate(p.layers_b):
                values = (_csv_float(getattr(p, m)[a, b]) for m in schema.MATRICES)
                out.writerow((p.file_a.label, name_a, p.file_b.label, name_b, *values))
    return text.getvalue().encode("utf-8")


#: the bytes of each format's whole file
ENCODERS: dict[str, Callable[[CKAResult], bytes]] = {"h5": h5_bytes, "json": json_bytes, "csv": csv_bytes}


def write_json(result: CKAResult, path: str) -> None:
    """Write the ``.json`` file to ``path`` (atomically, :func:`~cka_offline.files.write_bytes`)."""
    write_bytes(path, json_bytes(result))


def write_h5(result: CKAResult, path: str) -> None:
    """Write the ``.h5`` file to ``path`` (built in memory, :func:`h5_bytes`, then written atomically)."""
    write_bytes(path, h5_bytes(result))


def write_csv(result: CKAResult, path: str) -> None:
    """Write the ``.csv`` file to ``path`` (atomically)."""
    write_bytes(path, csv_bytes(result))


#: the writer of each format (kept for callers of 1.x; each writes the whole file at ``path``)
WRITERS: dict[str, Callable[[CKAResult, str], None]] = {"h5": write_h5, "json": write_json, "csv": write_csv}


def save_result(
    result: CKAResult, path: str | os.PathLike[str], *, format: str | None = None, overwrite: bool = True
) -> str:
    """Write ``result`` to ``path`` (format from the extension unless ``format`` is given); return the path.

    The file is built in memory and written under a temporary name, then renamed
    (:func:`~cka_offline.files.write_bytes`).

    Raises:
        OutputError: unknown format, ``path`` exists and ``overwrite`` is false, ``path`` is a folder, or it
            cannot be written (its folder is missing or not writable, the disk is full: naming the space
            needed).
    """
    path = os.fspath(path)
    fmt = result_format(path, format)
    refuse_existing(path, overwrite=overwrite, hint="choose another name")
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder; give a file name for the result")
    return write_bytes(path, ENCODERS[fmt](result))


# -------------------------------------------------------------------- loading
def load_result(path: str | os.PathLike[str], *, format: str | None = None, allow_external: bool = False) -> CKAResult:
    """Read a result saved by :meth:`CKAResult.save` (format from the extension unless given).

    A ``.csv`` result holds numbers and names only: provenance, hashes and parameters come back empty,
    and blocks of pairs the file does not list come back NaN.

    An ``.h5`` result holding HDF5 external or soft links, external storage or virtual datasets is refused
    unless ``allow_external`` (a shared file must not make the reader open other local files).

    Raises:
        FormatError: the file is missing, is not a cka-offline result, or has a format major version this
            release does not read (UnsafeFileError: it points outside itself).
    """
    path = os.fspath(path)
    try:
        fmt = result_format(path, format)
    except OutputError as exc:
        raise FormatError(str(exc)) from None
    if not os.path.isfile(path):
        raise FormatError(f"result file {path} not found")
    try:
        if fmt == "csv":
            return _read_csv(path)
        if fmt == "json":
            return _read_json(path)
        return _read_h5(path, allow_external)
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not a readable cka-offline result ({type(exc).__name__}: {exc})") from exc


def is_result_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a saved result rather than an activation file: a ``.json`` or ``.csv`` file,
    or an HDF5 file whose root attribute ``format`` is ``cka-offline-result``. Never raises: a file that
    cannot be opened is not a result (the activation reader then says what is wrong with it)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if schema.EXTENSIONS.get(ext) in ("json", "csv"):
        return True
    if ext not in schema.EXTENSIONS or not os.path.isfile(path):
        return False
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get(schema.H5_ATTR_FORMAT) == schema.FORMAT_NAME)
    except (OSError, ValueError):
        return False


def stored_version(path: str | os.PathLike[str]) -> str | None:
    """The ``format_version`` a saved ``.json`` or ``.h5`` result holds as written (None for a CSV, which
    carries none, or a file that does not say)."""
    path = os.fspath(path)
    fmt = schema.EXTENSIONS.get(os.path.splitext(path)[1].lower())
    try:
        if fmt == "json":
            with open(path, encoding="utf-8") as fh:
                version = json.load(fh).get(schema.KEY_VERSION)
        elif fmt == "h5":
            import h5py

            with h5py.File(path, "r") as h5:
                version = h5.attrs.get(schema.H5_ATTR_VERSION)
        else:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return None if version is None else str(version)


def _read_json(path: str) -> CKAResult:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    check_version(doc, path)
    missing = [name for name in schema.MATRICES if name not in doc]
    if missing:
        raise FormatError(f"{path} is not a complete cka-offline result: matrix {', '.join(missing)} missing")
    matrices = {name: _none_to_nan(doc[name]) for name in schema.MATRICES}
    return _from_meta(doc, matrices)


def _read_h5(path: str, allow_external: bool) -> CKAResult:
    import h5py

    from ..store.reader import refuse_external

    with h5py.File(path, "r") as h5:
        if not allow_external:
            refuse_external(h5, path)
        if h5.attrs.get(schema.H5_ATTR_FORMAT) != schema.FORMAT_NAME:
            raise FormatError(f"{path} is an HDF5 file but not a cka-offline result (attribute 'format' missing)")
        _check_major(h5.attrs.get(schema.H5_ATTR_VERSION), path)
        meta = json.loads(h5.attrs[schema.H5_ATTR_META])
        check_version(meta, path)
        matrices = {name: np.asarray(h5[name][()], dtype=np.float64) for name in schema.H5_DATASETS}
    return _from_meta(meta, matrices)


def check_version(meta: Any, path: str) -> None:
    """Refuse a document that is not a result, or whose format major version this release does not read.

    Raises:
        FormatError: with the fix (a newer cka-offline) in the message.
    """
    if not isinstance(meta, dict) or meta.get(schema.KEY_FORMAT) != schema.FORMAT_NAME:
        found = meta.get(schema.KEY_FORMAT) if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{path} is not a cka-offline result (format {found!r})")
    _check_major(meta.get(schema.KEY_VERSION), path)


def _check_major(version: Any, path: str) -> None:
    try:
        major, _minor = schema.parse_version(version)
    except ValueError:
        raise FormatError(
            f"{path}: result format_version {version!r} is not MAJOR.MINOR (this release writes "
            f"{schema.FORMAT_VERSION}); the file is damaged or was not written by cka-offline"
        ) from None
    if major != schema.FORMAT_MAJOR:
        raise FormatError(
            f"{path} is a cka-offline result of format version {version}; this release reads "
            f"{schema.FORMAT_MAJOR}.x -- upgrade cka-offline to a release that reads format {major}.x"
        )


def _from_meta(meta: dict[str, Any], matrices: dict[str, Any]) -> CKAResult:
    files = [
        FileInfo(
            label=f[schema.FILE_LABEL],
            paths=list(f.get(schema.FILE_PATHS, [])),
            layers=list(f[schema.FILE_LAYERS]),
            provenance=dict(f.get(schema.FILE_PROVENANCE, {})),
            sha256=list(f.get(schema.FILE_SHA256, [])),
            n_examples=int(f.get(schema.FILE_N_EXAMPLES, 0)),
            aliases=[str(a) for a in f.get(schema.FILE_ALIASES, [])],  # 1.3; older results: none
        )
        for f in meta[schema.KEY_FILES]
    ]
    return CKAResult(
        files=files,
        pairs=[(int(i), int(j)) for i, j in meta[schema.KEY_PAIRS]],
        params=dict(meta.get(schema.KEY_PARAMS, {})),
        n_examples=int(meta.get(schema.KEY_N_EXAMPLES, 0)),
        n_minibatches=int(meta.get(schema.KEY_N_MINIBATCHES, 0)),
        timing=dict(meta.get(schema.KEY_TIMING, {})),
        warnings=list(meta.get(schema.KEY_WARNINGS, [])),
        version=str(meta.get(schema.KEY_TOOL_VERSION, "")),
        confidence=float(meta.get(schema.KEY_CONFIDENCE, schema.DEFAULT_CONFIDENCE)),
        **matrices,
    )


def _read_csv(path: str) -> CKAResult:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    known = len(schema.CSV_COLUMNS)
    if not rows or tuple(rows[0][:known]) != schema.CSV_COLUMNS:
        raise FormatError(f"{path} is not a cka-offline CSV result: expected the header {','.join(schema.CSV_COLUMNS)}")
    width, body = len(rows[0]), rows[1:]  # columns after the known ones are a later minor's: ignored
    for line, row in enumerate(body, start=2):
        if len(row) != width:
            raise FormatError(f"{path}, line {line}: expected {width} fields, got {len(row)}")
    files = _csv_files(body)
    index = {f.label: k for k, f in enumerate(files)}
    offsets = np.cumsum([0] + [len(f.layers) for f in files])
    position = {(f.label, name): int(offsets[k]) + r for k, f in enumerate(files) for r, name in enumerate(f.layers)}
    size = int(offsets[-1])
    matrices: dict[str, Any] = {name: np.full((size, size), np.nan) for name in schema.MATRICES}
    pairs: list[tuple[int, int]] = []
    for line, row in enumerate(body, start=2):
        a, b = position[(row[0], row[1])], position[(row[2], row[3])]
        pair = (index[row[0]], index[row[2]])
        if pair not in pairs:
            pairs.append(pair)
        for name, text in zip(schema.MATRICES, row[4:known]):
            try:
                matrices[name][a, b] = float(text) if text.strip() else np.nan
            except ValueError:
                raise FormatError(f"{path}, line {line}: {name} is not a number: {text!r}") from None
    return CKAResult(files=files, pairs=pairs, **matrices)


def _csv_files(body: list[list[str]]) -> list[FileInfo]:
    """The files of a CSV result: labels, then each label's layers, in order of first appearance
    (the ``file_a`` column first, then ``file_b``)."""
    layers: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for columns in ((0, 1), (2, 3)):
        for row in body:
            label, layer = row[columns[0]], row[columns[1]]
            layers.setdefault(label, [])
            if (label, layer) not in seen:
                seen.add((label, layer))
                layers[label].append(layer)
    return [FileInfo(label=label, layers=names) for label, names in layers.items()]


# -------------------------------------------------------------------- value conversions
def _csv_float(value: float) -> str:
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _nan_to_none(array: np.ndarray) -> list[Any]:
    return [[None if math.isnan(v) else v for v in row] for row in np.asarray(array, dtype=np.float64).tolist()]


def _none_to_nan(rows: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64).reshape(
        len(rows), -1 if rows else 0
    )


def _jsonable(value: Any) -> Any:
    """Plain JSON types, NaN/Inf as None (numpy scalars and arrays converted)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = [
    "ENCODERS",
    "WRITERS",
    "check_version",
    "csv_bytes",
    "h5_bytes",
    "is_result_file",
    "json_bytes",
    "load_result",
    "result_document",
    "result_meta",
    "result_format",
    "save_result",
    "stored_version",
    "write_csv",
    "write_h5",
    "write_json",
]
