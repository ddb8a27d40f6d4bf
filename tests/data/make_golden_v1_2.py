"""Writes tests/data/golden_v1_2.h5, the frozen example of activation format 1.2: the layers, values and
alias of golden_v1_1.h5 (make_golden_v1_1.py), written by the 1.2 writer, which adds ``/checksums`` (the
CRC-32 of every chunk of every layer). Run once; never regenerate it (later releases must read the bytes as
they were written).

    python tests/data/make_golden_v1_2.py
"""

import os

import numpy as np

from cka_offline.store.writer import ActivationWriter, LayerSpec

try:
    from . import make_golden
    from .make_golden_v1_1 import ALIAS
except ImportError:  # run as a script
    import make_golden  # type: ignore[no-redef]
    from make_golden_v1_1 import ALIAS  # type: ignore[no-redef]


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_v1_2.h5")
    specs = [LayerSpec(make_golden.CONV, (6, 2, 2), "mean", 6, alias=ALIAS), LayerSpec("head", (3,), "none", 3)]
    provenance = {"extractor": "golden", "model": "formula", "command": "python tests/data/make_golden_v1_2.py"}
    ids = np.array([f"ex-{k:03d}" for k in range(make_golden.N)])
    with ActivationWriter(path, ids=ids, layers=specs, provenance=provenance, chunk_rows=8) as w:
        rows = make_golden.golden_rows()
        for start in range(0, make_golden.N, 5):  # batches that end inside chunks: the CRCs are continued
            w.write({name: values[start : start + 5] for name, values in rows.items()})


if __name__ == "__main__":
    main()
