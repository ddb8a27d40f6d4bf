"""Writes tests/data/result_vMAJOR_MINOR.{json,h5,csv}, the frozen examples of the current result format
(docs/results.md): result_v1_0.* for 1.0, result_v1_1.* for 1.1 (which adds ``params.shuffle``),
result_v1_2.* for 1.2 (the same content; its ``.h5`` adds the layer-name dimension scales), result_v1_3.*
for 1.3 (file A's first layer has the display alias ``block.conv.0``; the CSV holds no aliases), result_v1_4.*
for 1.4 (``params.all_pairs`` false: the within-file blocks' off-diagonal entries are NaN, "not computed").

Run once per released result format version; never regenerate an existing golden file (later releases
must read the bytes as they were written):

    python tests/data/make_result_golden.py

The result compares three files (2, 3 and 1 layers, so the stacked matrices are 6 x 6 and hold three
blocks); the second layer of file B is constant, so its row and column are NaN. Every value is a small
binary fraction, so each format holds it exactly. tests/results/test_golden.py rebuilds the values from
the rules below on its own and checks every golden file against them.
"""

from __future__ import annotations

import os

import numpy as np

from cka_offline.results import CKAResult, FileInfo
from cka_offline.results.schema import FORMAT_VERSION

HERE = os.path.dirname(os.path.abspath(__file__))
#: the version the current writer writes, as in the file names
VERSION = FORMAT_VERSION.replace(".", "_")
LAYERS = (["/block/conv.0/Relu_output_0", "fc"], ["b0", "b1, constant", "b2"], ["c0"])
CONSTANT = 3  # stacked index of "b1, constant"


def golden_result(version: str = VERSION) -> CKAResult:
    """The result the golden files of ``version`` (``1_0`` to ``1_4``) hold."""
    size = sum(len(names) for names in LAYERS)
    r, c = np.indices((size, size))
    cka = np.where(r == c, 1.0, (r + c + 1) / 16)
    se = (1 + np.abs(r - c)) / 256
    low, high = cka - 2 * se, cka + 2 * se
    for m in (cka, se, low, high):
        m[CONSTANT, :] = m[:, CONSTANT] = np.nan
    if version not in ("1_0", "1_1", "1_2", "1_3"):  # 1.4: the within-file blocks were not computed
        start = 0
        for names in LAYERS:
            block = np.s_[start : start + len(names)]
            for m in (cka, se, low, high):
                diagonal = np.diag(m).copy()
                m[block, block] = np.nan
                np.fill_diagonal(m, diagonal)
            start += len(names)
    files = [
        FileInfo(
            label="a.h5",
            paths=["/data/a.h5"],
            layers=LAYERS[0],
            n_examples=40,
            sha256=["a" * 64],
            provenance={"model": "/models/net_a.onnx", "extractor": "onnx", "options": {"reduction": "mean"}},
        ),
        FileInfo(
            label="b.h5",
            paths=["/data/b.0.h5", "/data/b.1.h5"],
            layers=LAYERS[1],
            n_examples=36,
            sha256=["b" * 64, "c" * 64],
            provenance={"model": "pkg.nets:make_b", "extractor": "torch"},
        ),
        FileInfo(label="c.h5", paths=["/data/c.h5"], layers=LAYERS[2], n_examples=32, sha256=[""], provenance={}),
    ]
    params = {
        "batch_size": 8,
        "epochs": 2,
        "seed": 7,
        "kernel": "linear",
        "rbf_fraction": None,
        "precision": "float64",
        "device": "cpu",
        "estimator": "minibatch",
        "n_groups": 4,
        "intersect": True,
        "confidence": 0.9,
        "block_rows": 16,
        "buffer_blocks": 2,
    }
    if version != "1_0":
        params["shuffle"] = "blocks"
    if version not in ("1_0", "1_1", "1_2"):
        files[0].aliases = ["block.conv.0", ""]
    if version not in ("1_0", "1_1", "1_2", "1_3"):
        params["all_pairs"] = False
    return CKAResult(
        files=files,
        cka=cka,
        se=se,
        low=low,
        high=high,
        pairs=[(0, 1), (0, 2), (1, 2)],
        params=params,
        n_examples=32,
        n_minibatches=8,
        timing={"total": 1.5, "read_wait": 0.25, "compute": 1.0, "hash_wait": 0.125},
        warnings=["layer 'b1, constant' of b.h5 is constant over the examples, so its CKA is undefined (NaN)"],
        version="0.1.0",
        confidence=0.9,
    )


def golden_path(ext: str, version: str = VERSION) -> str:
    """``tests/data/result_v<version>.<ext>``."""
    return os.path.join(HERE, f"result_v{version}.{ext}")


def main() -> None:
    result = golden_result()
    for ext in ("json", "h5", "csv"):
        result.save(golden_path(ext), overwrite=False)


if __name__ == "__main__":
    main()
