from __future__ import annotations

import numpy as np
import pytest

from cka_offline.store.writer import ActivationWriter, LayerSpec


def make_layers(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Activations of three layers with names that are not valid HDF5 paths."""
    rng = np.random.default_rng(seed)
    return {
        "/conv1/Conv_output_0": rng.normal(size=(n, 12)).astype(np.float32),
        "layer1.0.relu": np.maximum(rng.normal(size=(n, 8)), 0).astype(np.float32),
        "fc": rng.normal(size=(n, 5)).astype(np.float32),
    }


def specs_for(arrays: dict[str, np.ndarray]) -> list[LayerSpec]:
    return [LayerSpec(name, (a.shape[1],), "none", a.shape[1]) for name, a in arrays.items()]


def write_file(path, arrays, ids=None, batch=7, provenance=None, **kwargs) -> str:
    n = len(next(iter(arrays.values())))
    ids = np.arange(n) if ids is None else ids
    with ActivationWriter(
        path, ids=ids, layers=specs_for(arrays), provenance=provenance or {"model": "m"}, **kwargs
    ) as w:
        for s in range(0, n, batch):
            w.write({k: v[s : s + batch] for k, v in arrays.items()})
    return str(path)


@pytest.fixture
def small_file(tmp_path):
    arrays = make_layers(50)
    return write_file(tmp_path / "a.h5", arrays, chunk_rows=8), arrays
