"""A real non-PyTorch model: Google's magika file-type classifier (JAX-trained, exported by tf2onnx),
shipped inside the ``magika`` package, run on byte windows of real files on this machine."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

magika = pytest.importorskip("magika")
pytest.importorskip("onnxruntime")

from cka_offline_onnx.extractor import OnnxExtractor  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(magika.__file__), "models", "standard_v3_3")
MODEL = os.path.join(MODEL_DIR, "model.onnx")
PREFIX = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/"
LAYERS = [
    PREFIX + "Dense_0/AddV2:0",
    PREFIX + "Conv_0/Conv2D:0",
    PREFIX + "Max_Squeeze__213:0",
    PREFIX + "Dense_1/AddV2:0",
    "target_label",
]

pytestmark = pytest.mark.skipif(not os.path.isfile(MODEL), reason="magika's standard_v3_3 model is not installed")


def magika_config() -> dict:
    with open(os.path.join(MODEL_DIR, "config.min.json")) as fh:
        return json.load(fh)


def magika_features(path: str, cfg: dict) -> np.ndarray:
    """magika's model input for one file (its features v2): the first ``beg_size`` bytes after stripping
    leading whitespace, padded at the end, then the last ``end_size`` bytes after stripping trailing
    whitespace, padded at the front; only ``block_size`` bytes are read at each end; the padding token
    is 256 (a value no byte has). Shape (beg_size + end_size,) = (2048,), int."""
    beg_size, end_size, pad, block = cfg["beg_size"], cfg["end_size"], cfg["padding_token"], cfg["block_size"]
    assert cfg["mid_size"] == 0 and not cfg["use_inputs_at_offsets"]
    size = os.path.getsize(path)
    n = min(block, size)
    with open(path, "rb") as fh:
        beg = fh.read(n)
        fh.seek(size - n)
        end = fh.read(n)
    beg = beg.lstrip()[:beg_size]
    end = end.rstrip()
    end = end[len(end) - min(len(end), end_size) :]
    return np.array(list(beg) + [pad] * (beg_size - len(beg)) + [pad] * (end_size - len(end)) + list(end))


def real_files() -> list[str]:
    """Files of different kinds that exist wherever these tests run."""
    import matplotlib

    mpl = os.path.dirname(matplotlib.__file__)
    candidates = [
        os.path.join(os.path.dirname(magika.__file__), "magika.py"),  # python
        os.path.join(os.path.dirname(magika.__file__), "config", "content_types_kb.min.json"),  # json
        os.path.join(MODEL_DIR, "README.md"),  # markdown
        os.path.join(mpl, "mpl-data", "images", "home.png"),  # png
        os.path.realpath(sys.executable),  # ELF / Mach-O executable
    ]
    return [p for p in candidates if os.path.isfile(p) and os.path.getsize(p) > 64]


def test_features_match_magikas_own_extraction():
    cfg = magika_config()
    seekable = pytest.importorskip("magika.types.seekable")  # private API: skip quietly if it moves
    extract = getattr(magika.Magika, "_extract_features_from_seekable", None)
    if extract is None:
        pytest.skip("magika no longer has _extract_features_from_seekable")
    for path in real_files():
        with open(path, "rb") as fh:
            fs = extract(
                seekable.Seekable(fh),
                cfg["beg_size"],
                cfg["mid_size"],
                cfg["end_size"],
                cfg["padding_token"],
                cfg["block_size"],
                False,
            )
        np.testing.assert_array_equal(magika_features(path, cfg), np.array(fs.beg + fs.end), err_msg=path)


@pytest.fixture(scope="module")
def extractor():
    with OnnxExtractor(MODEL, options={"threads": 1}) as ex:
        yield ex


def test_lists_layers_of_a_tf2onnx_model(extractor):
    infos = {i.name: i for i in extractor.layers()}
    assert extractor.input_names() == ["bytes"]
    assert infos[PREFIX + "Dense_0/AddV2:0"].shape == (2048, 64)
    assert infos[PREFIX + "Conv_0/Conv2D:0"].kind == "Conv"
    assert infos["target_label"].shape == (214,)
    assert not any(i.aliases for i in infos.values())  # module names are a PyTorch export thing
    prov = extractor.provenance()
    assert prov["producer"].startswith("tf2onnx") and "ai.onnx:15" in prov["opset"].split(",")


def test_activations_of_real_files(extractor):
    cfg = magika_config()
    paths = real_files()
    assert len(paths) >= 3
    batch = np.stack([magika_features(p, cfg) for p in paths]).astype(np.int64)  # cast to the model's int32
    out = extractor.run({"bytes": batch}, LAYERS)
    infos = {i.name: i for i in extractor.layers()}
    for name in LAYERS:
        arr = out[name]
        expected = infos[name].shape
        assert arr.shape[0] == len(paths) and len(arr.shape[1:]) == len(expected)
        assert all(e is None or e == g for e, g in zip(expected, arr.shape[1:])), (name, arr.shape, expected)
        assert np.isfinite(arr).all(), name
        for i in range(1, len(paths)):  # different files, different activations
            assert np.max(np.abs(arr[i] - arr[0])) > 1e-3, (name, paths[i])
    np.testing.assert_allclose(out["target_label"].sum(axis=1), 1.0, atol=1e-4)

    # the input is built right if the extracted output layer agrees with magika's own deep-learning verdict
    labels = cfg["target_labels_space"]
    m = magika.Magika()
    for path, probs in zip(paths, out["target_label"]):
        assert labels[int(np.argmax(probs))] == str(m.identify_path(path).dl.label), path


def test_batch_of_one_equals_row_of_batch(extractor):
    cfg = magika_config()
    paths = real_files()[:2]
    batch = np.stack([magika_features(p, cfg) for p in paths]).astype(np.int32)
    together = extractor.run({"bytes": batch}, [PREFIX + "Dense_1/AddV2:0"])[PREFIX + "Dense_1/AddV2:0"]
    alone = extractor.run({"bytes": batch[1:]}, [PREFIX + "Dense_1/AddV2:0"])[PREFIX + "Dense_1/AddV2:0"]
    # not bit-equal: the float32 kernels block the sums differently per batch size (and LayerNorm takes
    # E[x^2] - E[x]^2 over 131072 values), but far closer than two files are to each other
    np.testing.assert_allclose(alone[0], together[1], rtol=0, atol=1e-3)
    assert np.max(np.abs(together[0] - together[1])) > 0.1
