"""Writes tests/data/golden_v1_0.h5, the frozen example of format 1.0. Run once per released version;
never regenerate an existing golden file (later releases must read the bytes as they were written).

    python tests/data/make_golden.py
"""

import os

import numpy as np

from cka_offline.store.writer import ActivationWriter, LayerSpec

N = 24
CONV = "/block/conv.0/Relu_output_0"


def golden_rows() -> dict[str, np.ndarray]:
    """The values the golden file holds, by formula (the test recomputes them)."""
    i = np.arange(N, dtype=np.float64)[:, None]
    return {CONV: i * 0.5 + np.arange(6), "head": np.sin(i + np.arange(3))}


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_v1_0.h5")
    specs = [LayerSpec(CONV, (6, 2, 2), "mean", 6), LayerSpec("head", (3,), "none", 3)]
    provenance = {
        "extractor": "golden",
        "extractor_version": "0",
        "framework": "numpy",
        "framework_version": np.__version__,
        "model": "formula",
        "model_sha256": "0" * 64,
        "inputs": "none",
        "inputs_sha256": "",
        "command": "python tests/data/make_golden.py",
        "options": '{"reduction": "mean"}',
        "note": "golden file of format 1.0",
    }
    ids = np.array([f"ex-{k:03d}" for k in range(N)])
    rows = golden_rows()
    with ActivationWriter(path, ids=ids, layers=specs, provenance=provenance, chunk_rows=8) as w:
        for start in range(0, N, 10):
            w.write({name: a[start : start + 10] for name, a in rows.items()})


if __name__ == "__main__":
    main()
