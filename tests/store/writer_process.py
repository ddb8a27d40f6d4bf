"""A writer run in a child process by test_crash.py: writes deterministic rows, prints after each batch.

python writer_process.py PATH fresh|resume [COMPRESSION]
"""

import sys

import numpy as np

from cka_offline.store.writer import ActivationWriter, LayerSpec

N, BATCH = 400, 10


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
    i = np.arange(start, stop, dtype=np.float64)[:, None]
    return {"a/x": np.sin(i * np.arange(1, 33)), "b.y": np.cos(i * np.arange(1, 9))}


def main(path: str, resume: bool, compression: str | None = None) -> None:
    specs = [LayerSpec("a/x", (32,), "none", 32), LayerSpec("b.y", (8,), "none", 8)]
    with ActivationWriter(
        path,
        ids=np.arange(N) * 3,
        layers=specs,
        provenance={"model": "sin"},
        resume=resume,
        resume_key="k1",
        chunk_rows=16,
        compression=compression,
    ) as w:
        for start in range(w.rows_done, N, BATCH):
            stop = min(N, start + BATCH)
            w.write(rows(start, stop))
            print(stop, w.rows_stored, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "resume", sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None)
