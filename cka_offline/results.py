"""The result of an analysis: CKA matrices with uncertainty, what was compared and how.

A :class:`CKAResult` holds one CKA matrix over the *stacked* layers of every compared file (file 0's
layers first, then file 1's, ...); the matrix of a pair of files is a block of it (:meth:`CKAResult.pair`).
It saves to and loads from three formats, chosen by extension:

- ``.h5`` -- datasets ``cka``, ``se``, ``low``, ``high`` (L x L float64) and a JSON attribute ``meta``
  with everything else (files, layer names, provenance, hashes, parameters, warnings). Never pickle.
- ``.json`` -- the same content in one JSON document; NaN is written as ``null``.
- ``.csv`` -- long format, one row per (layer of A, layer of B) of each reported pair:
  ``file_a, layer_a, file_b, layer_b, cka, se, low, high``; NaN is an empty field. It holds the numbers
  and names only (no provenance, hashes or parameters).

Every save writes a temporary file next to the target and renames it, so a failed save never leaves a
half-written file under the target name.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .errors import FormatError, OutputError

RESULT_FORMAT = "cka-offline-result"
RESULT_FORMAT_VERSION = "1.0"
FORMATS = ("h5", "json", "csv")
_EXTENSIONS = {".h5": "h5", ".hdf5": "h5", ".json": "json", ".csv": "csv"}
CSV_COLUMNS = ("file_a", "layer_a", "file_b", "layer_b", "cka", "se", "low", "high")
_MATRICES = ("cka", "se", "low", "high")


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
    """

    label: str
    paths: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    sha256: list[str] = field(default_factory=list)
    n_examples: int = 0

    @property
    def model_name(self) -> str:
        """A short human name: the provenance ``model`` (its basename) or the label."""
        model = str(self.provenance.get("model") or "")
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


@dataclass
class CKAResult:
    """CKA between the layers of one or more activation files.

    Attributes:
        files: the compared files, in order.
        cka: (L, L) float64 CKA over the stacked layers of all files (L = sum of layer counts); NaN where
            undefined (a constant layer).
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
    confidence: float = 0.95

    def __post_init__(self) -> None:
        size = sum(len(f.layers) for f in self.files)
        for name in _MATRICES:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (size, size):
                raise ValueError(f"{name} must have shape ({size}, {size}), got {value.shape}")
            setattr(self, name, value)
        self.pairs = [(int(i), int(j)) for i, j in self.pairs]

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
        block = {name: getattr(self, name)[rows, cols].copy() for name in _MATRICES}
        return CKAPair(i=i, j=j, file_a=self.files[i], file_b=self.files[j], **block)

    def matrix(self, i: int = 0, j: int | None = None) -> np.ndarray:
        """CKA matrix (La, Lb) of file ``i`` against file ``j`` (see :meth:`pair`)."""
        return self.pair(i, j).cka

    # ---------------------------------------------------------------- text
    def summary(self, *, max_detailed_pairs: int = 3) -> str:
        """A terminal summary.

        For each reported pair (the first ``max_detailed_pairs`` in detail): for every layer of A the
        best-matching layer of B with its CKA and interval, and, when both files have the same number of
        layers, the layer-identification check of Kornblith et al. (2019): how many layers of A have their
        most similar B layer at the same depth, and within one layer of it. Further pairs get one line.
        """
        lines = [self._header()]
        for k, (i, j) in enumerate(self.pairs):
            p = self.pair(i, j)
            if k < max_detailed_pairs:
                lines.append("")
                lines.extend(_pair_detail(p, self.confidence))
            else:
                if k == max_detailed_pairs:
                    lines.append("")
                    lines.append("other pairs (mean best-match CKA; layer identification):")
                lines.append("  " + _pair_line(p))
        if self.warnings:
            lines.append("")
            lines.append("warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(lines)

    def _header(self) -> str:
        p = self.params
        est = p.get("estimator", "minibatch")
        parts = [f"CKA ({p.get('kernel', 'linear')} kernel, {est} estimator)"]
        parts.append(f"{self.n_examples} examples")
        if est == "minibatch" and self.n_minibatches:
            per_epoch = max(1, self.n_minibatches // max(1, int(p.get("epochs") or 1)))
            small, large = self.n_examples // per_epoch, -(-self.n_examples // per_epoch)
            size = f"{small}" if small == large else f"{small}-{large}"
            parts.append(
                f"{self.n_minibatches} minibatches of {size} examples (batch size {p.get('batch_size')}) over "
                f"{p.get('epochs')} epoch(s), seed {p.get('seed')}"
            )
        total = self.timing.get("total")
        if total is not None:
            parts.append(f"{total:.1f} s")
        return ", ".join(parts)

    # ---------------------------------------------------------------- save/load
    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able Python (matrices as nested lists with NaN as None)."""
        meta = self._meta()
        for name in _MATRICES:
            meta[name] = _nan_to_none(getattr(self, name))
        return meta

    def _meta(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "version": self.version,
            "files": [
                {
                    "label": f.label,
                    "paths": list(f.paths),
                    "layers": list(f.layers),
                    "provenance": _jsonable(f.provenance),
                    "sha256": list(f.sha256),
                    "n_examples": int(f.n_examples),
                }
                for f in self.files
            ],
            "pairs": [list(p) for p in self.pairs],
            "params": _jsonable(self.params),
            "n_examples": int(self.n_examples),
            "n_minibatches": int(self.n_minibatches),
            "timing": _jsonable(self.timing),
            "warnings": list(self.warnings),
            "confidence": float(self.confidence),
        }

    def save(self, path: str | os.PathLike[str], *, format: str | None = None, overwrite: bool = True) -> str:
        """Write the result to ``path`` (format from the extension unless ``format`` is given); return it.

        Raises:
            OutputError: unknown format, ``path`` exists and ``overwrite`` is false, or it cannot be written.
        """
        path = os.fspath(path)
        fmt = result_format(path, format)
        if not overwrite and os.path.exists(path):
            raise OutputError(f"{path} already exists; remove it or allow overwriting (--overwrite)")
        writer = {"h5": self._write_h5, "json": self._write_json, "csv": self._write_csv}[fmt]
        with atomic_output(path) as tmp:
            writer(tmp)
        return path

    def _write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, allow_nan=False, indent=1)
            fh.write("\n")

    def _write_h5(self, path: str) -> None:
        import h5py

        with h5py.File(path, "w") as h5:
            h5.attrs["format"] = RESULT_FORMAT
            h5.attrs["format_version"] = RESULT_FORMAT_VERSION
            h5.attrs["meta"] = json.dumps(self._meta(), allow_nan=False)
            for name in _MATRICES:
                h5.create_dataset(name, data=getattr(self, name))

    def _write_csv(self, path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(CSV_COLUMNS)
            for i, j in self.pairs:
                p = self.pair(i, j)
                for a, name_a in enumerate(p.layers_a):
                    for b, name_b in enumerate(p.layers_b):
                        values = (_csv_float(getattr(p, m)[a, b]) for m in _MATRICES)
                        out.writerow((p.file_a.label, name_a, p.file_b.label, name_b, *values))


# -------------------------------------------------------------------- loading
def result_format(path: str, format: str | None = None) -> str:
    """The result format for ``path``: ``format`` if given, else from the extension."""
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt == "hdf5":
            fmt = "h5"
        if fmt not in FORMATS:
            raise OutputError(f"unknown result format {format!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise OutputError(
            f"cannot tell the result format of {path!r} from its extension {ext or '(none)'!r}; "
            f"use .h5, .json or .csv (or give the format explicitly)"
        )
    return _EXTENSIONS[ext]


def load_result(path: str | os.PathLike[str], *, format: str | None = None, allow_external: bool = False) -> CKAResult:
    """Read a result saved by :meth:`CKAResult.save` (format from the extension unless given).

    A ``.csv`` result holds numbers and names only: provenance, hashes and parameters come back empty,
    and blocks of pairs the file does not list come back NaN.

    An ``.h5`` result holding HDF5 external or soft links, external storage or virtual datasets is refused
    unless ``allow_external`` (a shared file must not make the reader open other local files).

    Raises:
        FormatError: the file is missing or is not a cka-offline result (UnsafeFileError: it points outside itself).
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
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            _check_meta(doc, path)
            matrices = {name: _none_to_nan(doc.get(name)) for name in _MATRICES}
            return _from_meta(doc, matrices, path)
        return _read_h5(path, allow_external)
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not a readable cka-offline result ({type(exc).__name__}: {exc})") from exc


def _read_h5(path: str, allow_external: bool) -> CKAResult:
    import h5py

    from .store.reader import refuse_external

    with h5py.File(path, "r") as h5:
        if not allow_external:
            refuse_external(h5, path)
        if h5.attrs.get("format") != RESULT_FORMAT:
            raise FormatError(f"{path} is an HDF5 file but not a cka-offline result (attribute 'format' missing)")
        meta = json.loads(h5.attrs["meta"])
        matrices = {name: np.asarray(h5[name][()], dtype=np.float64) for name in _MATRICES}
    return _from_meta(meta, matrices, path)


def _check_meta(meta: Any, path: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{path} is not a cka-offline result (format {found!r})")
    major = str(meta.get("format_version", "")).split(".")[0]
    if major != RESULT_FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{path} is a cka-offline result of format version {meta.get('format_version')}; this release reads "
            f"{RESULT_FORMAT_VERSION.split('.')[0]}.x -- upgrade cka-offline"
        )


def _from_meta(meta: dict[str, Any], matrices: dict[str, Any], path: str) -> CKAResult:
    _check_meta(meta, path)
    files = [
        FileInfo(
            label=f["label"],
            paths=list(f.get("paths", [])),
            layers=list(f["layers"]),
            provenance=dict(f.get("provenance", {})),
            sha256=list(f.get("sha256", [])),
            n_examples=int(f.get("n_examples", 0)),
        )
        for f in meta["files"]
    ]
    return CKAResult(
        files=files,
        pairs=[tuple(p) for p in meta["pairs"]],  # type: ignore[misc]
        params=dict(meta.get("params", {})),
        n_examples=int(meta.get("n_examples", 0)),
        n_minibatches=int(meta.get("n_minibatches", 0)),
        timing=dict(meta.get("timing", {})),
        warnings=list(meta.get("warnings", [])),
        version=str(meta.get("version", "")),
        confidence=float(meta.get("confidence", 0.95)),
        **matrices,
    )


def _read_csv(path: str) -> CKAResult:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != CSV_COLUMNS:
        raise FormatError(f"{path} is not a cka-offline CSV result: expected the header {','.join(CSV_COLUMNS)}")
    labels: list[str] = []
    layers: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}

    def note(label: str, layer: str) -> None:
        if label not in layers:
            labels.append(label)
            layers[label] = []
            seen[label] = set()
        if layer not in seen[label]:
            seen[label].add(layer)
            layers[label].append(layer)

    body = rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(CSV_COLUMNS):
            raise FormatError(f"{path}, line {line}: expected {len(CSV_COLUMNS)} fields, got {len(row)}")
        note(row[0], row[1])
    for row in body:
        note(row[2], row[3])
    files = [FileInfo(label=label, layers=layers[label]) for label in labels]
    index = {label: k for k, label in enumerate(labels)}
    offsets = np.cumsum([0] + [len(f.layers) for f in files])
    position = {(label, name): offsets[index[label]] + r for label in labels for r, name in enumerate(layers[label])}
    size = int(offsets[-1])
    matrices = {name: np.full((size, size), np.nan) for name in _MATRICES}
    pairs: list[tuple[int, int]] = []
    for line, row in enumerate(body, start=2):
        a, b = position[(row[0], row[1])], position[(row[2], row[3])]
        pair = (index[row[0]], index[row[2]])
        if pair not in pairs:
            pairs.append(pair)
        for name, text in zip(_MATRICES, row[4:]):
            try:
                matrices[name][a, b] = float(text) if text.strip() else np.nan
            except ValueError:
                raise FormatError(f"{path}, line {line}: {name} is not a number: {text!r}") from None
    return CKAResult(files=files, pairs=pairs, **matrices)


# -------------------------------------------------------------------- helpers
@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it.

    Raises:
        OutputError: the folder does not exist or is not writable, or the write failed (disk full).
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:  # created like open() would (mode 0o666 less the umask), unlike mkstemp's 0o600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _csv_float(value: float) -> str:
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _nan_to_none(array: np.ndarray) -> list[Any]:
    return [[None if math.isnan(v) else v for v in row] for row in np.asarray(array, dtype=np.float64).tolist()]


def _none_to_nan(rows: Any) -> np.ndarray:
    if rows is None:
        raise KeyError("matrix missing")
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


# -------------------------------------------------------------------- summary helpers
def _interval(p: CKAPair, a: int, b: int) -> str:
    low, high = p.low[a, b], p.high[a, b]
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


def best_matches(p: CKAPair) -> list[int | None]:
    """For each layer of A, the index of the B layer with the highest CKA (None if the row is all NaN)."""
    out: list[int | None] = []
    for row in p.cka:
        out.append(None if np.all(np.isnan(row)) else int(np.nanargmax(row)))
    return out


def layer_identification(p: CKAPair) -> tuple[int, int, int] | None:
    """Kornblith et al. (2019) layer identification for two files with the same number of layers.

    Returns ``(same, within_one, defined)``: how many layers of A have their highest-CKA layer of B at the
    same depth, within one layer of it, out of ``defined`` layers whose row is not all NaN; None when the
    layer counts differ or the pair is a file against itself.
    """
    if p.i == p.j or len(p.layers_a) != len(p.layers_b) or not p.layers_a:
        return None
    best = best_matches(p)
    defined = [(a, b) for a, b in enumerate(best) if b is not None]
    same = sum(1 for a, b in defined if a == b)
    near = sum(1 for a, b in defined if abs(a - b) <= 1)
    return same, near, len(defined)


def _pair_detail(p: CKAPair, confidence: float) -> list[str]:
    title_a = f"{p.file_a.label} ({p.file_a.model_name})" if p.file_a.model_name != p.file_a.label else p.file_a.label
    title_b = f"{p.file_b.label} ({p.file_b.model_name})" if p.file_b.model_name != p.file_b.label else p.file_b.label
    lines = [f"A = {title_a}", f"B = {title_b}" + ("  (self-comparison)" if p.i == p.j else "")]
    width_a = min(40, max([len("layer of A"), *(len(n) for n in p.layers_a)]))
    width_b = min(40, max([len("best layer of B"), *(len(n) for n in p.layers_b)]))
    level = f"{round(confidence * 100)}% interval"
    lines.append(f"  {'layer of A':<{width_a}}  {'best layer of B':<{width_b}}     CKA  {level}")
    for a, b in enumerate(best_matches(p)):
        name_a = shorten_name(p.layers_a[a], width_a)
        if b is None:
            lines.append(f"  {name_a:<{width_a}}  {'-':<{width_b}}     nan  (undefined: constant layer)")
            continue
        name_b = shorten_name(p.layers_b[b], width_b)
        lines.append(f"  {name_a:<{width_a}}  {name_b:<{width_b}}  {p.cka[a, b]:6.3f}  {_interval(p, a, b)}")
    ident = layer_identification(p)
    if ident is not None:
        same, near, defined = ident
        lines.append(
            f"layer identification (Kornblith et al. 2019): {same}/{defined} layers of A match the B layer at the "
            f"same depth, {near}/{defined} within one layer"
        )
    return lines


def _pair_line(p: CKAPair) -> str:
    best = [p.cka[a, b] for a, b in enumerate(best_matches(p)) if b is not None]
    mean = f"{np.mean(best):.3f}" if best else "nan"
    ident = layer_identification(p)
    ident_text = f"; {ident[0]}/{ident[2]} same depth, {ident[1]}/{ident[2]} within one" if ident else ""
    return f"{p.file_a.label} vs {p.file_b.label}: {mean}{ident_text}"


def shorten_name(name: str, width: int = 32) -> str:
    """``name`` cut to ``width`` characters with an ellipsis in the middle (layer names end informatively)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2) :]


__all__ = ["CKAResult", "CKAPair", "FileInfo", "load_result", "result_format", "atomic_output",
           "best_matches", "layer_identification", "shorten_name"]
