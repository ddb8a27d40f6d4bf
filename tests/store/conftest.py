from __future__ import annotations

import numpy as np
import pytest

from ..activation_files import layer_specs, write_acts


def make_layers(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Activations of three layers with names that are not valid HDF5 paths."""
    rng = np.random.default_rng(seed)
    return {
        "/conv1/Conv_output_0": rng.normal(size=(n, 12)).astype(np.float32),
        "layer1.0.relu": np.maximum(rng.normal(size=(n, 8)), 0).astype(np.float32),
        "fc": rng.normal(size=(n, 5)).astype(np.float32),
    }


specs_for = layer_specs


def write_file(path, arrays, ids=None, batch=7, provenance=None, chunk_rows=None, **kwargs) -> str:
    """The store tests' defaults (7 rows per write, the writer's own chunk size) for :func:`write_acts`."""
    return write_acts(
        path,
        arrays,
        ids,
        chunk_rows=chunk_rows,
        provenance=provenance or {"model": "m"},
        rows_per_write=batch,
        **kwargs,
    )


@pytest.fixture
def small_file(tmp_path):
    arrays = make_layers(50)
    return write_file(tmp_path / "a.h5", arrays, chunk_rows=8), arrays
