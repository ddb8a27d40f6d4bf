"""A writer run in a child process by test_crash.py: writes deterministic rows, prints after each batch."""

import sys

import numpy as np

from cka_offline.store.writer import ActivationWriter, LayerSpec

N, BATCH = 400, 10


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
    i = np.arange(start, stop, dtype=np.float64)[:, None]
    return {"a/x": np.sin(i * np.arange(1, 33)), "b.y": np.cos(i * np.arange(1, 9))}


def main(path: str, resume: bool) -> None:
    specs = [LayerSpec("a/x", (32,), "none", 32), LayerSpec("b.y", (8,), "none", 8)]
    with ActivationWriter(
        path,
        ids=np.arange(N) * 3,
        layers=specs,
        provenance={"model": "sin"},
        resume=resume,
        resume_key="k1",
        chunk_rows=16,
    ) as w:
        for start in range(w.rows_done, N, BATCH):
            w.write(rows(start, start + BATCH))
            print(start + BATCH, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "resume")
