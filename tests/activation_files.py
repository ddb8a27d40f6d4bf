"""The one helper the tests use to write an activation file from arrays (the store's own writer)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cka_offline.store.schema import StoredLayer
from cka_offline.store.writer import ActivationWriter


def layer_specs(arrays: Mapping[str, np.ndarray]) -> list[StoredLayer]:
    """One stored layer per ``(n, d)`` array: shape ``(d,)``, no reduction."""
    return [StoredLayer(name, (a.shape[1],), "none", a.shape[1]) for name, a in arrays.items()]


def write_acts(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    ids: Any = None,
    *,
    chunk_rows: int | None = 16,
    model: str = "chain",
    provenance: Mapping[str, Any] | None = None,
    rows_per_write: int = 10,
    **writer_options: Any,
) -> str:
    """Write ``arrays`` (``{layer name: (n, d) array}``) as an activation file at ``path`` and return it.

    ``ids``: the example ids (default ``0..n-1``); ``provenance``: default ``{"model": model, "extractor":
    "test"}``; ``rows_per_write``: rows per :meth:`ActivationWriter.write` call; ``writer_options``: the
    writer's other arguments (``dtype``, ``shard``, ``compression``, ``overwrite``, ``resume_key``...).
    """
    n = len(next(iter(arrays.values())))
    ids = np.arange(n) if ids is None else ids
    with ActivationWriter(
        path,
        ids=ids,
        layers=layer_specs(arrays),
        provenance=dict(provenance) if provenance is not None else {"model": model, "extractor": "test"},
        chunk_rows=chunk_rows,
        **writer_options,
    ) as w:
        for s in range(0, n, rows_per_write):
            w.write({k: v[s : s + rows_per_write] for k, v in arrays.items()})
    return os.fspath(path)
