"""A :class:`~cka_offline.results.CKAResult` as pandas DataFrames and xarray Datasets.

pandas and xarray are optional (``pip install 'cka-offline[frames]'``): they are imported inside the
functions, and a missing one raises an ImportError that names the package to install.

- :func:`to_pandas` -- one pair's matrix as a DataFrame: rows the layers of file ``i`` in file order,
  columns those of file ``j``; ``long=True``: one row per layer pair with ``cka``, ``se``, ``low``, ``high``.
- :func:`to_frame` -- every reported pair in long form: the rows and columns of the CSV serialisation.
- :func:`to_xarray` -- one pair as a Dataset of ``cka``, ``se``, ``low``, ``high`` over the dimensions
  ``layer_a`` and ``layer_b`` (coordinates: the layer names), with the parameters as attributes;
  ``stacked=True``: the whole stacked matrices, as ``xarray.open_dataset`` shows a saved ``.h5``.
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema

if TYPE_CHECKING:
    from .model import CKAPair, CKAResult

#: the dimensions of a pair's Dataset and of the stacked matrices in a saved ``.h5``: rows, columns
DIM_A, DIM_B = schema.H5_DIM_A, schema.H5_DIM_B
#: a pair's coordinates of each layer's display alias (``""`` where none) along each dimension
ALIAS_A, ALIAS_B = "alias_a", "alias_b"


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module}, which is not installed: pip install {module} (or pip install 'cka-offline[frames]')"
        ) from None


def _long_rows(p: CKAPair) -> dict[str, list[Any]]:
    n_a, n_b = len(p.layers_a), len(p.layers_b)
    columns: dict[str, list[Any]] = {
        schema.CSV_FILE_A: [p.file_a.label] * (n_a * n_b),
        schema.CSV_LAYER_A: [name for name in p.layers_a for _ in range(n_b)],
        schema.CSV_FILE_B: [p.file_b.label] * (n_a * n_b),
        schema.CSV_LAYER_B: list(p.layers_b) * n_a,
    }
    for name in schema.MATRICES:
        columns[name] = np.asarray(getattr(p, name), dtype=np.float64).reshape(-1).tolist()
    return columns


def to_pandas(result: CKAResult, i: int = 0, j: int | None = None, *, long: bool = False, matrix: str = "cka") -> Any:
    """The block of files ``i`` (rows) and ``j`` (columns) as a pandas DataFrame (``j`` as in
    :meth:`CKAResult.pair`).

    Wide (the default): the ``matrix`` (``cka``, ``se``, ``low`` or ``high``) with the layers of file ``i``
    as the index and those of file ``j`` as the columns, both in file order; the index and columns are
    named after the files' labels. ``long=True``: one row per (layer of A, layer of B), A's layers in
    order and within each B's, with the columns of the CSV serialisation: ``file_a``, ``layer_a``,
    ``file_b``, ``layer_b``, ``cka``, ``se``, ``low``, ``high`` (NaN where undefined).

    Raises:
        ImportError: pandas is not installed.
        ValueError: ``matrix`` is not one of the four.
        IndexError: no such file.
    """
    if matrix not in schema.MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; expected one of {', '.join(schema.MATRICES)}")
    pd = _require("pandas", "to_pandas")
    p = result.pair(i, j)
    if long:
        return pd.DataFrame(_long_rows(p), columns=list(schema.CSV_COLUMNS))
    return pd.DataFrame(
        np.asarray(getattr(p, matrix), dtype=np.float64),
        index=pd.Index(list(p.layers_a), name=p.file_a.label),
        columns=pd.Index(list(p.layers_b), name=p.file_b.label),
    )


def to_frame(result: CKAResult) -> Any:
    """Every reported pair in long form, pair by pair in the order of ``result.pairs``: the rows and
    columns of the CSV serialisation (``pandas.read_csv`` of a saved ``.csv`` gives the same frame)."""
    pd = _require("pandas", "to_frame")
    frames = [to_pandas(result, i, j, long=True) for i, j in result.pairs]
    if not frames:
        return pd.DataFrame(columns=list(schema.CSV_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def attributes(result: CKAResult) -> dict[str, Any]:
    """Dataset attributes: the run's numbers and each parameter (netCDF types: text, numbers; a bool as
    0/1; other values as JSON text)."""
    out: dict[str, Any] = {
        schema.KEY_FORMAT: schema.FORMAT_NAME,
        schema.KEY_VERSION: schema.FORMAT_VERSION,
        "cka_offline_version": result.version,
        schema.KEY_N_EXAMPLES: int(result.n_examples),
        schema.KEY_N_MINIBATCHES: int(result.n_minibatches),
        schema.KEY_CONFIDENCE: float(result.confidence),
        "files": json.dumps([f.label for f in result.files]),
        "models": json.dumps([f.model_name for f in result.files]),
    }
    for key, value in result.params.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float, str)) and not isinstance(value, np.generic):
            out[key] = value
        else:
            from .io import _jsonable

            out[key] = json.dumps(_jsonable(value))
    if result.warnings:
        out[schema.KEY_WARNINGS] = "\n".join(result.warnings)
    return out


def to_xarray(result: CKAResult, i: int = 0, j: int | None = None, *, stacked: bool = False) -> Any:
    """The block of files ``i`` (rows) and ``j`` (columns) as an xarray Dataset (``j`` as in
    :meth:`CKAResult.pair`).

    Variables ``cka``, ``se``, ``low``, ``high`` over the dimensions ``layer_a`` (the layers of file ``i``,
    in file order) and ``layer_b`` (those of file ``j``), whose coordinates are the layer names; the
    attributes hold ``file_a``, ``file_b``, ``model_a``, ``model_b``, the example and minibatch counts, the
    confidence level and every parameter (:func:`attributes`). ``ds.cka.sel(layer_a="conv1")`` is a row.
    The coordinates ``alias_a`` / ``alias_b`` hold each layer's display alias (:attr:`FileInfo.aliases
    <cka_offline.results.FileInfo>`, ``""`` where none); the names stay the index.

    ``stacked=True``: the four whole (L, L) matrices over the stacked layers of every file instead, with
    the coordinates ``layer_a`` / ``layer_b`` (names) and ``file_a`` / ``file_b`` (each layer's file label):
    what ``xarray.open_dataset(path, engine="h5netcdf")`` shows of a saved ``.h5`` (less its ``meta``).

    Raises:
        ImportError: xarray is not installed.
        IndexError: no such file.
    """
    xr = _require("xarray", "to_xarray")
    attrs = attributes(result)
    if stacked:
        names = [name for f in result.files for name in f.layers]
        labels = [f.label for f in result.files for _ in f.layers]
        coords = {DIM_A: names, DIM_B: names, schema.H5_FILE_A: (DIM_A, labels), schema.H5_FILE_B: (DIM_B, labels)}
        data = {name: ((DIM_A, DIM_B), np.asarray(getattr(result, name))) for name in schema.MATRICES}
        return xr.Dataset(data, coords=coords, attrs=attrs)
    p = result.pair(i, j)
    attrs.update(file_a=p.file_a.label, file_b=p.file_b.label, model_a=p.file_a.model_name, model_b=p.file_b.model_name)
    data = {name: ((DIM_A, DIM_B), np.asarray(getattr(p, name))) for name in schema.MATRICES}
    coords = {
        DIM_A: list(p.layers_a),
        DIM_B: list(p.layers_b),
        ALIAS_A: (DIM_A, list(p.file_a.aliases)),
        ALIAS_B: (DIM_B, list(p.file_b.aliases)),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


__all__ = ["attributes", "to_frame", "to_pandas", "to_xarray"]
