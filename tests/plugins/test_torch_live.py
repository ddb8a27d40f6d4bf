"""The Python API with a live torch.nn.Module and inputs in memory: extract() and compare()."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cka_offline as ck
from cka_offline.errors import InputError

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


@pytest.fixture
def digits():
    sys.path.insert(0, str(SAMPLE))
    try:
        from digits_cnn import make_model
    finally:
        sys.path.remove(str(SAMPLE))
    return make_model, np.load(SAMPLE / "digits.npz")["pixels"][:120]


def test_a_live_module_gives_the_activations_of_its_factory_and_weights(tmp_path, digits):
    from safetensors.torch import load_file

    make_model, x = digits
    model = make_model()
    model.load_state_dict(load_file(SAMPLE / "cnn_a.safetensors"))
    model.train()  # the extraction runs it in eval mode and gives it back as it was
    live = ck.extract(model, torch.from_numpy(x), tmp_path / "live.h5", layers=["conv1", "relu4"])
    assert model.training
    ref = ck.extract(
        f"{SAMPLE / 'digits_cnn.py'}:make_model",
        SAMPLE / "digits.npz",
        tmp_path / "ref.h5",
        layers=["conv1", "relu4"],
        options={"weights": str(SAMPLE / "cnn_a.safetensors")},
        max_examples=120,
    )
    with ck.open_activations(live) as a, ck.open_activations(ref) as b:
        for name in a.layer_names:
            np.testing.assert_array_equal(a.read(name, 0, 120), b.read(name, 0, 120))
        assert a.provenance["model"] == "<live DigitsCNN>"
        identity = a.provenance["model_sha256"]
    # the identity is the parameters as they are: other weights, another identity
    torch.manual_seed(5)
    other = ck.extract(make_model(), x, tmp_path / "other.h5", layers=["conv1"])
    with ck.open_activations(other) as f:
        assert len(identity) == 64 and f.provenance["model_sha256"] != identity


def test_compare_two_live_models_returns_a_labelled_result(tmp_path, digits):
    make_model, x = digits
    torch.manual_seed(0)
    a = make_model()
    torch.manual_seed(1)
    b = make_model()
    r = ck.compare(a, b, {"input": x}, layers=["conv1", "relu4"], m=32, precision="float64", keep_dir=tmp_path)
    assert [f.label for f in r.files] == ["A: <live DigitsCNN>", "B: <live DigitsCNN>"]
    assert r.matrix(0, 1).shape == (2, 2) and np.isfinite(r.matrix(0, 1)).all()
    same = ck.analyze([tmp_path / "a.h5", tmp_path / "b.h5"], batch_size=32, precision="float64", device="cpu")
    np.testing.assert_array_equal(r.cka, same.cka)  # compare() is extract + analyze, nothing else
    self_r = ck.compare(a, a, x, layers=["relu4"], m=32, precision="float64")
    np.testing.assert_allclose(self_r.matrix(0, 1), [[1.0]], atol=1e-12)


def test_inputs_in_memory_must_agree_on_their_examples(tmp_path, digits):
    make_model, x = digits
    with pytest.raises(InputError, match="different numbers of examples"):
        ck.extract(make_model(), {"input": x, "other": x[:10]}, tmp_path / "a.h5", layers=["conv1"])
    assert not (tmp_path / "a.h5").exists()
