"""Writes tests/data/golden_v1_1.h5, the frozen example of activation format 1.1: the layers and values of
golden_v1_0.h5 (make_golden.py), plus the 1.1 layer attribute ``alias`` on the first layer only.
Run once; never regenerate it (later releases must read the bytes as they were written).

    python tests/data/make_golden_v1_1.py
"""

import os

import numpy as np

from cka_offline.store.writer import ActivationWriter, LayerSpec

try:
    from . import make_golden
except ImportError:  # run as a script
    import make_golden  # type: ignore[no-redef]

ALIAS = "block.conv.0"  # the PyTorch module of make_golden.CONV


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_v1_1.h5")
    specs = [LayerSpec(make_golden.CONV, (6, 2, 2), "mean", 6, alias=ALIAS), LayerSpec("head", (3,), "none", 3)]
    provenance = {"extractor": "golden", "model": "formula", "command": "python tests/data/make_golden_v1_1.py"}
    ids = np.array([f"ex-{k:03d}" for k in range(make_golden.N)])
    with ActivationWriter(path, ids=ids, layers=specs, provenance=provenance, chunk_rows=8) as w:
        w.write(make_golden.golden_rows())


if __name__ == "__main__":
    main()
