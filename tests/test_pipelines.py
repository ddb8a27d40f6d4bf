"""End-to-end pipelines on real models, run the way a user runs them: extract -> file -> analyze.

- the bundled demo (network A in PyTorch, network B in ONNX) on a reduced input, through `sample_data/demo.sh`;
- a PyTorch CNN against its own ONNX export: the same activations, CKA > 0.9999 on the diagonal;
- magika (a JAX/TF-trained ONNX model no one here wrote) on byte windows of real files;
- the MiniLM sentence encoder (transformers) on a few hundred real sentences with masked mean pooling.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cka_offline import analyze, extract, load_result
from cka_offline.analysis import plan_minibatches
from cka_offline.store.reader import open_activations

from .cka import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data")
DEMO_LAYERS = "conv1,bn1,relu1,conv2,bn2,relu2,pool2,conv3,relu3,fc1,relu4,fc2".split(",")


def stored_layers(path: str) -> list[np.ndarray]:
    """Every layer of an activation file, read with plain h5py (not through the package's reader)."""
    with h5py.File(path, "r") as f:
        keys = sorted(f["layers"], key=lambda k: int(f["layers"][k].attrs["order"]))
        return [f["layers"][k][()].astype(np.float64) for k in keys]


def reference_cka(layers_a: list[np.ndarray], layers_b: list[np.ndarray], batches: list[np.ndarray]) -> np.ndarray:
    """Minibatch CKA from the formulas (tests/cka/reference.py) over the given minibatches."""
    grams_a = [[ref.linear_gram(x[b]) for b in batches] for x in layers_a]
    grams_b = [[ref.linear_gram(y[b]) for b in batches] for y in layers_b]
    return np.array([[ref.minibatch_cka(ga, gb) for gb in grams_b] for ga in grams_a])


def test_demo_on_reduced_input(tmp_path):
    env = dict(os.environ, DEMO_OUTPUT=str(tmp_path), DEMO_MAX_EXAMPLES="300")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    run = subprocess.run(
        ["bash", os.path.join(SAMPLE, "demo.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    for name in ("cnn_a.h5", "cnn_b.h5", "a_vs_b.json", "a_vs_b.png", "a_vs_a.json", "a_vs_a.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "layer identification" in run.stdout
    self_result = load_result(tmp_path / "a_vs_a.json")
    self_matrix = self_result.matrix(0, 0)
    assert self_matrix.shape == (12, 12)
    np.testing.assert_allclose(np.diag(self_matrix), 1.0, atol=1e-6)
    cross = load_result(tmp_path / "a_vs_b.json")
    matrix = cross.matrix(0, 1)
    assert matrix.shape == (12, 12)
    assert cross.pair(0, 1).layers_a == DEMO_LAYERS
    assert cross.files[1].aliases == DEMO_LAYERS  # B (ONNX) was chosen by module names: shown by them
    # independent computation on the same activations and the same minibatches
    a = stored_layers(str(tmp_path / "cnn_a.h5"))
    b = stored_layers(str(tmp_path / "cnn_b.h5"))
    assert len(a[0]) == 300
    params = cross.params
    with open_activations(str(tmp_path / "cnn_a.h5")) as f:
        ids = f.ids
    batches = plan_minibatches(
        300, params["batch_size"], seed=params["seed"], epochs=params["epochs"], n_groups=params["n_groups"], ids=ids
    )
    np.testing.assert_allclose(matrix, reference_cka(a, b, batches), atol=1e-6)


def test_torch_cnn_and_its_onnx_export_agree(tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, SAMPLE)
    try:
        import digits_cnn
    finally:
        sys.path.remove(SAMPLE)
    from safetensors.torch import load_file

    model = digits_cnn.make_model().eval()
    model.load_state_dict(load_file(os.path.join(SAMPLE, "cnn_a.safetensors")))
    onnx_path = str(tmp_path / "cnn_a.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 8, 8),),
        onnx_path,
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
    )
    common = dict(inputs=os.path.join(SAMPLE, "digits.npz"), layers=DEMO_LAYERS, max_examples=400, batch_size=100)
    a = extract(
        os.path.join(SAMPLE, "digits_cnn.py") + ":make_model",
        output=str(tmp_path / "torch.h5"),
        options={"weights": os.path.join(SAMPLE, "cnn_a.safetensors")},
        **common,
    )
    b = extract(onnx_path, output=str(tmp_path / "onnx.h5"), **common)
    with open_activations(a) as fa, open_activations(b) as fb:
        assert fb.provenance["framework"] == "onnxruntime" and fa.provenance["framework"] == "torch"
        for name_a, name_b in zip(fa.layer_names, fb.layer_names):
            diff = np.abs(fa.read(name_a, 0, 400) - fb.read(name_b, 0, 400)).max()
            assert diff < 1e-4, (name_a, name_b, diff)
    result = analyze([a, b], device="cpu")
    diagonal = np.diag(result.matrix(0, 1))
    assert diagonal.shape == (12,) and diagonal.min() > 0.9999, diagonal


def _magika():
    magika = pytest.importorskip("magika")
    from .plugins.test_onnx_magika import MODEL, PREFIX, magika_config, magika_features

    return magika, MODEL, PREFIX, magika_config, magika_features


def real_files(limit: int = 48) -> list[str]:
    """Files of several kinds on this machine: Python sources, PNG and SVG images, JSON, text."""
    import matplotlib

    mpl_data = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data")
    stdlib = os.path.dirname(inspect.__file__)
    groups = [
        sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py")),
        sorted(
            os.path.join(mpl_data, "images", f)
            for f in os.listdir(os.path.join(mpl_data, "images"))
            if f.endswith(".png")
        ),
        sorted(
            os.path.join(mpl_data, "images", f)
            for f in os.listdir(os.path.join(mpl_data, "images"))
            if f.endswith(".svg")
        ),
        sorted(
            os.path.join(root, f)
            for root, _, files in os.walk(mpl_data)
            for f in files
            if f.endswith((".json", ".txt", ".afm"))
        ),
    ]
    per_group = limit // len(groups)
    files = [p for group in groups for p in group[:per_group] if os.path.getsize(p) > 64]
    return files


def test_magika_real_files_extracted_and_analysed(tmp_path):
    _, model, prefix, magika_config, magika_features = _magika()
    files = real_files()
    assert len(files) >= 40
    cfg = magika_config()
    features = np.stack([magika_features(p, cfg) for p in files]).astype(np.int32)
    ids = np.array([os.path.basename(p) + f"#{i}" for i, p in enumerate(files)])
    np.savez(tmp_path / "bytes.npz", bytes=features, ids=ids)
    layers = [prefix + "Dense_0/AddV2:0", prefix + "Max_Squeeze__213:0", prefix + "Dense_1/AddV2:0"]
    out = extract(
        model,
        inputs=str(tmp_path / "bytes.npz"),
        output=str(tmp_path / "magika.h5"),
        layers=layers,
        reduction={"*Dense_0*": "token_mean", "*": "flatten"},
        mask_input=None,
        batch_size=16,
    )
    with open_activations(out) as f:
        assert f.provenance["framework"] == "onnxruntime"
        assert "tf2onnx" in f.provenance["extra"]["producer"]
        assert list(f.ids) == list(ids)
    result = analyze([out], estimator="full-debiased", device="cpu")
    stored = stored_layers(out)
    expected = np.array([[ref.cka_debiased(x, y) for y in stored] for x in stored])
    np.testing.assert_allclose(result.matrix(0, 0), expected, atol=1e-9)
    np.testing.assert_allclose(np.diag(result.matrix(0, 0)), 1.0, atol=1e-12)
    minibatch = analyze([out], batch_size=16, device="cpu").matrix(0, 0)
    assert np.all(np.isfinite(minibatch)) and minibatch[0, 2] < 0.999  # different layers are not identical


def real_sentences(count: int = 300) -> list[str]:
    """English sentences from the docstrings of Python's standard library (real prose, always installed)."""
    import argparse
    import collections
    import json as json_mod
    import logging
    import pathlib
    import subprocess as sp
    import textwrap
    import threading
    import unittest

    text = " ".join(
        inspect.getdoc(obj) or ""
        for module in (collections, argparse, json_mod, logging, pathlib, sp, textwrap, threading, unittest)
        for _, obj in sorted(vars(module).items())
        if callable(obj)
    )
    sentences = []
    for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        words = s.split()
        if 6 <= len(words) <= 30 and s[0].isupper() and s not in sentences and not any(c in s for c in "{}<>=`|"):
            sentences.append(s)
    return sentences[:count]


def test_minilm_sentences_masked_mean_pooling(tmp_path):
    torch = pytest.importorskip("torch")
    from .plugins import minilm_factory

    sentences = real_sentences()
    assert len(sentences) == 300
    tokens = minilm_factory.tokenize(sentences, max_length=32)
    mask = tokens["attention_mask"]
    assert (mask == 0).any(), "some sentences must be padded for the test to mean anything"
    np.savez(tmp_path / "tokens.npz", **tokens, ids=np.arange(len(sentences)) + 1000)
    layers = ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    out = extract(
        os.path.join(ROOT, "tests", "plugins", "minilm_factory.py") + ":make",
        inputs=str(tmp_path / "tokens.npz"),
        output=str(tmp_path / "minilm.h5"),
        layers=layers,
        reduction="token_mean",
        batch_size=64,
    )
    stored = stored_layers(out)
    # independent pooling of the model's own hidden states, over the real (unpadded) tokens only
    model = minilm_factory.make()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.as_tensor(tokens["input_ids"][:40]),
            attention_mask=torch.as_tensor(mask[:40]),
            output_hidden_states=True,
        ).hidden_states
    m = mask[:40, :, None].astype(np.float64)
    for layer, h in zip(stored, hidden):
        pooled = (h.double().numpy() * m).sum(1) / m.sum(1)
        np.testing.assert_allclose(layer[:40], pooled, atol=2e-5)
    result = analyze([out], batch_size=64, device="cpu")
    matrix = result.matrix(0, 0)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    params = result.params
    with open_activations(out) as f:
        ids = f.ids
    batches = plan_minibatches(300, 64, seed=0, epochs=1, n_groups=params["n_groups"], ids=ids)
    np.testing.assert_allclose(matrix, reference_cka(stored, stored, batches), atol=1e-6)
    assert json.loads(open_activations(out).provenance["options"])["reduction"]["encoder.layer.0"] == "token_mean"


def test_shards_analyse_exactly_like_one_file(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "acts"
    folder.mkdir()
    h = rng.normal(size=(530, 20))
    for i in range(3):
        h = np.maximum(h @ rng.normal(size=(h.shape[1], 24)) / 4, 0) + 2.0
        np.save(folder / f"layer{i}.npy", h.astype(np.float32))
    single = extract(str(folder), output=str(tmp_path / "one.h5"), batch_size=64)
    for i in range(3):
        extract(str(folder), output=str(tmp_path / f"part-{i}.h5"), batch_size=64, shard=(i, 3))
    with open_activations(str(tmp_path / "part-*.h5")) as shards, open_activations(single) as one:
        assert shards.chunk_rows == one.chunk_rows and shards.n_examples == 530
    whole = analyze([single], batch_size=64, device="cpu")
    parts = analyze([str(tmp_path / "part-*.h5")], batch_size=64, device="cpu")
    np.testing.assert_array_equal(parts.cka, whole.cka)
    np.testing.assert_array_equal(parts.se, whole.se)
