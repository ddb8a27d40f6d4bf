"""The bundled sample data loads and the two networks classify the digits they ship with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
HOLDOUT_EVERY = 3  # make_sample_data.HOLDOUT_EVERY: ids that are multiples of it were not trained on
MODULE_NAMES = [
    "conv1",
    "bn1",
    "relu1",
    "conv2",
    "bn2",
    "relu2",
    "pool2",
    "conv3",
    "relu3",
    "gap",
    "flatten",
    "fc1",
    "relu4",
    "fc2",
]


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    with np.load(SAMPLE / "digits.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _heldout(ids: np.ndarray) -> np.ndarray:
    return ids % HOLDOUT_EVERY == 0


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def _digits_cnn():
    spec = importlib.util.spec_from_file_location("sample_digits_cnn", SAMPLE / "digits_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_npz_arrays(digits):
    assert sorted(digits) == ["ids", "labels", "pixels"]
    pixels, labels, ids = digits["pixels"], digits["labels"], digits["ids"]
    assert pixels.dtype == np.float32 and pixels.shape == (1797, 1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (1797,)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids) == 1797
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert set(np.unique(labels)) == set(range(10))


def test_digits_match_scikit_learn(digits):
    sklearn = pytest.importorskip("sklearn.datasets")
    ref = sklearn.load_digits()
    ids = digits["ids"]
    np.testing.assert_array_equal(digits["pixels"][:, 0] * 16.0, ref.images[ids])
    np.testing.assert_array_equal(digits["labels"], ref.target[ids])


@pytest.fixture(scope="module")
def network_a():
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    model = _digits_cnn().make_model()
    model.load_state_dict(load_file(SAMPLE / "cnn_a.safetensors"), strict=True)
    model.eval()
    return lambda pixels: model(pixels=torch.from_numpy(pixels)).detach().numpy()


@pytest.fixture(scope="module")
def network_b():
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(SAMPLE / "cnn_b.onnx"), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})[0]


def test_network_a_module_names():
    assert [name for name, _ in _digits_cnn().make_model().named_children()] == MODULE_NAMES


def test_network_b_keeps_module_names_and_batchnorm():
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(SAMPLE / "cnn_b.onnx"))
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert model.opset_import[0].version >= 17
    # module names survive in the node names, so layers of A and B can be matched
    scopes = {node.name.split("/")[1] for node in model.graph.node if node.name.startswith("/")}
    assert scopes == set(MODULE_NAMES)
    assert "BatchNormalization" in {node.op_type for node in model.graph.node}  # not folded into Conv


@pytest.mark.parametrize("network", ["network_a", "network_b"])
def test_network_classifies_the_digits(network, digits, request):
    run = request.getfixturevalue(network)
    logits = run(digits["pixels"])
    assert logits.shape == (len(digits["ids"]), 10)
    assert run(digits["pixels"][:3]).shape == (3, 10)  # any batch size
    test = _heldout(digits["ids"])
    assert _accuracy(logits[test], digits["labels"][test]) > 0.95
    assert _accuracy(logits, digits["labels"]) > 0.95


def test_networks_a_and_b_are_different_trainings(digits, network_a, network_b):
    x = digits["pixels"][:64]
    assert not np.allclose(network_a(x), network_b(x), atol=1e-2)


def test_sample_data_is_small():
    total = sum(p.stat().st_size for p in SAMPLE.iterdir() if p.is_file())
    assert total < 2 * 1024 * 1024
    for name in ("cnn_a.safetensors", "cnn_b.onnx"):
        assert (SAMPLE / name).stat().st_size < 500 * 1024
