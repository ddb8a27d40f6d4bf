"""End to end: pack a folder of .npy files with cka_offline.extract() and read the activation file back."""

from __future__ import annotations

import json

import numpy as np

import cka_offline.extraction as extract_mod
from cka_offline.store.reader import open_activations


def test_extract_folder_of_npy_and_read_back(tmp_path):
    rng = np.random.default_rng(1)
    acts = {
        "block1": rng.normal(size=(10, 2, 3, 3)).astype(np.float32),
        "logits": rng.normal(size=(10, 4)).astype(np.float64),
        "score": rng.normal(size=(10,)).astype(np.float32),
    }
    ids = np.arange(10, dtype=np.int64)[::-1] * 3
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name, arr in acts.items():
        np.save(folder / f"{name}.npy", arr)
    np.save(folder / "ids.npy", ids)
    (folder / "layers.json").write_text(json.dumps({"block1.npy": "tf/block1/Relu:0"}))

    out = extract_mod.extract(str(folder), None, str(tmp_path / "theirs.h5"), batch_size=4)

    with open_activations(out) as f:
        assert f.n_examples == 10
        np.testing.assert_array_equal(f.ids, ids)
        assert f.layer_names == ["tf/block1/Relu:0", "logits", "score"]
        assert f.provenance["extractor"] == "arrays"
        assert f.provenance["framework"] == "numpy"
        for name, key in (("tf/block1/Relu:0", "block1"), ("logits", "logits"), ("score", "score")):
            want = acts[key].reshape(10, -1).astype(np.float32)
            np.testing.assert_array_equal(f.read(name, 0, 10), want)
        assert [m.original_shape for m in f.layers] == [(2, 3, 3), (4,), (1,)]
