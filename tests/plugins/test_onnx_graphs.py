"""ONNX graphs shaped like other exporters' (Paddle2ONNX's -1 dims, Silero VAD's shared inputs), the
``mean`` layout decision, onnxruntime's own logging, and sessions as model sources; built here with
onnx.helper, run through ``cka-extract`` (the installed script where the process matters, its click entry
point otherwise) and checked against numpy float64."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cka_offline.errors import InputError, LayerSelectionError, OptionError  # noqa: E402
from cka_offline.store.reader import open_activations  # noqa: E402
from cka_offline_onnx.extractor import OnnxExtractor  # noqa: E402
from cka_offline_onnx.graph import tensor_type  # noqa: E402

from ..hardening.builders import invoke  # noqa: E402

RNG = np.random.default_rng(7)
BIN = os.path.dirname(sys.executable)


def cka_extract(*args: object) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (onnxruntime's own logging writes to the process's stderr)."""
    return subprocess.run(
        [os.path.join(BIN, "cka-extract"), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def extract_cli(*args: object) -> Any:
    """The command's click entry point in this process (faster than a new process; same code and exit codes)."""
    result = invoke("cka-extract", list(args))
    result.returncode = result.exit_code
    return result


def save(graph: onnx.GraphProto, path: os.PathLike, opset: int = 17) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


# --- Paddle2ONNX's dim_value: -1 -------------------------------------------------------------------------

CONV_W = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)


def paddle_classifier(path: os.PathLike) -> str:
    """A classifier whose input and output dims are written as ``dim_value: -1``, as Paddle2ONNX does."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "cls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
        initializer=[init("W", CONV_W)],
    )
    return save(graph, path, opset=13)


def test_minus_one_dims_are_dynamic(tmp_path):
    path = paddle_classifier(tmp_path / "cls.onnx")
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # really written as -1
    assert tensor_type(model.graph.input[0]).dims == (None, 3, None, None)
    x = RNG.normal(size=(5, 3, 6, 7)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    run = cka_extract(path, "-i", tmp_path / "in.npz", "-o", tmp_path / "a.h5", "-l", "relu,y", "-b", "2")
    assert run.returncode == 0, run.stderr
    conv = np.einsum("oc,bchw->bohw", CONV_W[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
    relu = np.maximum(conv, 0)
    logits = relu.mean(axis=(2, 3))
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    with open_activations(str(tmp_path / "a.h5")) as f:
        np.testing.assert_allclose(f.read("relu", 0, 5), relu.reshape(5, -1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f.read("y", 0, 5), softmax, rtol=1e-5, atol=1e-6)


# --- inputs given once: Silero VAD's sample rate and recurrent state ---------------------------------------

VAD_W = RNG.normal(size=(16, 8)).astype(np.float32)
VAD_W2 = RNG.normal(size=(8, 1)).astype(np.float32)


def vad_model(path: os.PathLike, batch: str | None = "batch") -> str:
    """Shaped like Silero VAD: ``input`` (batch, 16), ``state`` (2, batch, 8), ``sr`` int64 scalar;
    outputs ``output`` (batch, 1) and ``stateN`` (2, batch, 8)."""
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("ReduceSum", ["state", "axes0"], ["s_sum"], keepdims=0),
        helper.make_node("Add", ["h", "s_sum"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["t"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k16"], ["scale"]),
        helper.make_node("Mul", ["t", "scale"], ["ts"]),
        helper.make_node("MatMul", ["ts", "W2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Unsqueeze", ["t", "axes0"], ["t1"]),
        helper.make_node("Concat", ["t1", "t1"], ["stateN"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 16]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 8]),
        ],
        initializer=[
            init("W", VAD_W),
            init("W2", VAD_W2),
            init("axes0", np.array([0], np.int64)),
            init("k16", np.array(16000.0, np.float32)),
        ],
    )
    return save(graph, path)


def vad_reference(x: np.ndarray, state: np.ndarray, sr: float) -> dict[str, np.ndarray]:
    """float64 numpy of the graph; ``state`` is (2, B, 8)."""
    t = np.tanh(x.astype(np.float64) @ VAD_W.astype(np.float64) + state.astype(np.float64).sum(axis=0))
    logit = (t * (sr / 16000.0)) @ VAD_W2.astype(np.float64)
    return {"t": t, "output": 1.0 / (1.0 + np.exp(-logit))}


def test_inputs_given_once_through_the_command(tmp_path):
    path = vad_model(tmp_path / "vad.onnx")
    x = RNG.normal(size=(5, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    common = [path, "-i", tmp_path / "in.npz", "-l", "t,output", "-b", "2"]

    # not given: one line naming both inputs and the option
    run = extract_cli(*common, "-o", tmp_path / "none.h5")
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert "inputs 'state' [2, batch, 8], 'sr' [] are not per example" in run.stderr
    assert """-X fixed_inputs='{"state": VALUE, "sr": VALUE}'""" in run.stderr
    assert not (tmp_path / "none.h5").exists()

    # zeros built per batch (batches of 2, 2, 1), the sample rate broadcast
    run = extract_cli(*common, "-o", tmp_path / "zeros.h5", "-X", 'fixed_inputs={"sr": 16000, "state": "zeros"}')
    assert run.returncode == 0, run.stderr
    ref = vad_reference(x, np.zeros((2, 5, 8)), 16000)
    with open_activations(str(tmp_path / "zeros.h5")) as f:
        for name in ("t", "output"):
            np.testing.assert_allclose(f.read(name, 0, 5), ref[name], rtol=1e-5, atol=1e-6)

    # a state of batch size 1, broadcast to every batch
    state = RNG.normal(size=(2, 1, 8)).round(3)
    fixed = json.dumps({"sr": 8000, "state": state.tolist()})
    run = extract_cli(*common, "-o", tmp_path / "bcast.h5", "-X", f"fixed_inputs={fixed}")
    assert run.returncode == 0, run.stderr
    ref = vad_reference(x, np.broadcast_to(state, (2, 5, 8)), 8000)
    with open_activations(str(tmp_path / "bcast.h5")) as f:
        np.testing.assert_allclose(f.read("output", 0, 5), ref["output"], rtol=1e-5, atol=1e-6)

    # a value of the wrong shape is a usage error naming the input and its shape
    run = extract_cli(*common, "-o", tmp_path / "bad.h5", "-X", 'fixed_inputs={"sr": 8000, "state": [1, 2]}')
    assert run.returncode == 2, run.stderr
    assert "fixed input 'state'" in run.stderr and "expects shape [2, batch, 8], got (2,)" in run.stderr


def test_fixed_inputs_in_the_python_api(tmp_path):
    path = vad_model(tmp_path / "vad.onnx")
    ex = OnnxExtractor(path, options={"fixed_inputs": {"sr": 16000, "state": np.ones((2, 3, 8), np.float32)}})
    assert ex.input_names() == ["input"]
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    out = ex.run({"input": x}, ["t"])
    np.testing.assert_allclose(out["t"], vad_reference(x, np.ones((2, 3, 8)), 16000)["t"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"fixed input 'state' .* has 3 on its batch axis 1, but the batch has 2"):
        ex.run({"input": x[:2]}, ["t"])
    # unnamed dynamic dims, and a session as the source: state [2, ?, 8] is still seen as shared
    unnamed = vad_model(tmp_path / "unnamed.onnx", batch=None)
    assert OnnxExtractor(unnamed).input_names() == ["input"]
    session = ort.InferenceSession(unnamed)
    out = OnnxExtractor(session, options={"fixed_inputs": {"sr": 16000, "state": "zeros"}}).run({"input": x}, ["t"])
    np.testing.assert_allclose(out["t"], vad_reference(x, np.zeros((2, 3, 8)), 16000)["t"], rtol=1e-5, atol=1e-6)
    with pytest.raises(OptionError, match=r"fixed_inputs names 'rate', which is not an input .* input, state, sr"):
        OnnxExtractor(path, options={"fixed_inputs": {"rate": 1}})
    with pytest.raises(OptionError, match=r"fixed input 'sr' .* 'fast' is not a value"):
        OnnxExtractor(path, options={"fixed_inputs": {"sr": "fast"}})
    with pytest.raises(InputError, match=r"input 'sr' .* int64 in the model, but the given float64 values do not"):
        OnnxExtractor(path, options={"fixed_inputs": {"sr": 16000.5}})


# --- what --reduction mean averages ----------------------------------------------------------------------

K1 = RNG.normal(size=(4, 3, 3)).astype(np.float32)  # Conv1d: 3 -> 4 channels, kernel 3
WT = RNG.normal(size=(6, 5)).astype(np.float32)
WV = RNG.normal(size=(6, 2)).astype(np.float32)


def layouts_model(path: os.PathLike) -> str:
    """x (N, 3, 6): a Conv1d branch (channels, length) and a token branch (tokens, features) on x^T, a
    Transpose whose layout no op tells, and a per-example vector."""
    nodes = [
        helper.make_node("Conv", ["x", "K"], ["conv"]),  # (N, 4, 4)
        helper.make_node("Relu", ["conv"], ["conv_relu"]),  # keeps channels first
        helper.make_node("MatMul", ["x", "WT"], ["tokens"]),  # (N, 3, 5)
        helper.make_node("Add", ["tokens", "bias"], ["tokens_bias"]),  # a constant bias: still tokens
        helper.make_node("Softmax", ["tokens_bias"], ["attn"], axis=-1),
        helper.make_node("Transpose", ["tokens"], ["swapped"], perm=[0, 2, 1]),  # (N, 5, 3): unknown
        helper.make_node("ReduceMean", ["x", "axes2"], ["xm"], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["xm", "WV3"], ["vector"]),  # (N, 2)
    ]
    graph = helper.make_graph(
        nodes,
        "layouts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
            for n, shape in [
                ("conv_relu", ["N", 4, 4]),
                ("attn", ["N", 3, 5]),
                ("swapped", ["N", 5, 3]),
                ("vector", ["N", 2]),
            ]
        ],
        initializer=[
            init("K", K1),
            init("WT", WT),
            init("bias", RNG.normal(size=(5,)).astype(np.float32)),
            init("axes2", np.array([2], np.int64)),
            init("WV3", WV[:3]),
        ],
    )
    return save(graph, path, opset=18)


def conv1d(x: np.ndarray) -> np.ndarray:
    """float64 valid Conv1d of (N, 3, 6) with K1: (N, 4, 4)."""
    x64, k = x.astype(np.float64), K1.astype(np.float64)
    return np.stack([np.einsum("ncl,ocl->no", x64[:, :, i : i + 3], k) for i in range(4)], axis=2)


def test_mean_is_decided_from_the_producing_op(tmp_path):
    path = layouts_model(tmp_path / "layouts.onnx")
    ex = OnnxExtractor(path)
    x = RNG.normal(size=(5, 3, 6)).astype(np.float32)
    layers = ["conv", "conv_relu", "tokens", "tokens_bias", "attn", "swapped", "vector"]
    ex.run({"x": x}, layers)  # the first batch: ranks known
    assert [ex.mean_layout_of(n) for n in layers] == [
        "channels",
        "channels",
        "tokens",
        "tokens",
        "tokens",
        None,
        "tokens",
    ]
    # channels first: the graph takes the mean over the length, as numpy float64 does
    assert sorted(ex.reduce_early({"conv": "mean", "conv_relu": "mean"})) == ["conv", "conv_relu"]
    out = ex.run({"x": x}, ["conv", "conv_relu"])
    np.testing.assert_allclose(out["conv"], conv1d(x).mean(axis=2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["conv_relu"], np.maximum(conv1d(x), 0).mean(axis=2), rtol=1e-5, atol=1e-6)
    # (tokens, features): refused, naming token_mean; the bias and the Softmax on the last axis keep it
    for name in ("tokens", "tokens_bias", "attn"):
        with pytest.raises(
            LayerSelectionError, match=rf"tensor '{name}' .* is \(tokens, features\).*-r '{name}=token_mean'"
        ):
            ex.reduce_early({name: "mean"})
    # no op tells: refused, naming both ways out
    with pytest.raises(
        LayerSelectionError, match=r"mean on tensor 'swapped' \(Transpose.* is ambiguous.*token_mean.*mean_layout"
    ):
        ex.reduce_early({"swapped": "mean"})
    # a per-example vector is not the graph's to reduce: left to the core as it is
    assert ex.reduce_early({"vector": "mean"}) == []
    # the user says channels first: every (a, b) tensor is (C, L)
    forced = OnnxExtractor(path, options={"mean_layout": "channels_first"})
    full = forced.run({"x": x}, ["swapped"])["swapped"]
    assert forced.reduce_early({"swapped": "mean"}) == ["swapped"]
    np.testing.assert_allclose(
        forced.run({"x": x}, ["swapped"])["swapped"], full.astype(np.float64).mean(axis=2), rtol=1e-5, atol=1e-6
    )


def test_mean_through_the_command(tmp_path):
    path = layouts_model(tmp_path / "layouts.onnx")
    x = RNG.normal(size=(5, 3, 6)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    # the producing op tells the layout: the Conv's (C, L) is averaged over L, the MatMul's (tokens, features)
    # over its tokens (recorded as token_mean, what the file's reduction then says)
    run = extract_cli(path, "-i", tmp_path / "in.npz", "-o", tmp_path / "t.h5", "-l", "conv,tokens", "-r", "mean")
    assert run.returncode == 0, run.stderr
    tokens = x.astype(np.float64) @ WT.astype(np.float64)
    with open_activations(str(tmp_path / "t.h5")) as f:
        assert [f.layer(n).reduction for n in ("conv", "tokens")] == ["mean", "token_mean"]
        np.testing.assert_allclose(f.read("conv", 0, 5), conv1d(x).mean(axis=2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f.read("tokens", 0, 5), tokens.mean(axis=1), rtol=1e-5, atol=1e-6)
    run = extract_cli(
        path, "-i", tmp_path / "in.npz", "-o", tmp_path / "m.h5", "-l", "conv,tokens", "-r", "mean", "-r",
        "tokens=token_mean", "-b", "2", "--mask-input", "none",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    tokens = x.astype(np.float64) @ WT.astype(np.float64)
    with open_activations(str(tmp_path / "m.h5")) as f:
        np.testing.assert_allclose(f.read("conv", 0, 5), conv1d(x).mean(axis=2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f.read("tokens", 0, 5), tokens.mean(axis=1), rtol=1e-5, atol=1e-6)


# --- onnxruntime's own log lines ---------------------------------------------------------------------------


def test_onnxruntime_logs_stay_quiet_unless_debug(tmp_path):
    """A kernel error (channels the Conv cannot take) is one line of ours, without onnxruntime's
    ``[E:onnxruntime:...]`` line and traceback; an unused initializer's ``[W:onnxruntime:...]`` warning
    shows only with --debug."""
    w = np.ones((4, 3, 1, 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        initializer=[init("W", w), init("unused", np.ones(7, np.float32))],
    )
    path = save(graph, tmp_path / "sym.onnx")
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 5, 2, 2), np.float32))
    np.savez(tmp_path / "good.npz", x=np.ones((3, 3, 2, 2), np.float32))
    run = cka_extract(path, "-i", tmp_path / "bad.npz", "-o", tmp_path / "a.h5")
    assert run.returncode == 3
    assert run.stderr.splitlines() == [run.stderr.splitlines()[-1]], run.stderr  # one line
    assert "onnxruntime could not run the model on these inputs" in run.stderr and "C: 5" in run.stderr
    assert "[E:onnxruntime" not in run.stderr and "Traceback" not in run.stderr
    assert "Removing initializer" not in run.stderr  # the unused initializer's warning: only with --debug
    loud = cka_extract(path, "-i", tmp_path / "good.npz", "-o", tmp_path / "d.h5", "--debug")
    assert loud.returncode == 0 and "Removing initializer 'unused'" in loud.stderr, loud.stderr


# --- an InferenceSession as the model source --------------------------------------------------------------


def test_inference_session_as_model_source(tmp_path, caplog):
    import cka_offline

    path = paddle_classifier(tmp_path / "cls.onnx")
    x = RNG.normal(size=(4, 3, 5, 5)).astype(np.float32)
    by_path = cka_offline.extract(path, {"x": x}, tmp_path / "p.h5", layers=["relu", "y"])
    data = open(path, "rb").read()

    from_file = cka_offline.extract(ort.InferenceSession(path), {"x": x}, tmp_path / "f.h5", layers=["relu", "y"])
    from_bytes = cka_offline.extract(ort.InferenceSession(data), {"x": x}, tmp_path / "b.h5", layers=["relu", "y"])
    with open_activations(by_path) as ref, open_activations(from_file) as f, open_activations(from_bytes) as b:
        assert f.provenance["model"] == os.path.abspath(path)
        assert b.provenance["model"].startswith("<InferenceSession from ")
        for found in (f, b):
            assert found.provenance["model_sha256"] == hashlib.sha256(data).hexdigest()
            for name in ("relu", "y"):
                np.testing.assert_array_equal(found.read(name, 0, 4), ref.read(name, 0, 4))

    # the file is gone: only the session's own output is offered, and a warning says why
    gone = tmp_path / "gone.onnx"
    gone.write_bytes(data)
    session = ort.InferenceSession(str(gone))
    gone.unlink()
    with caplog.at_level("WARNING"):
        ex = OnnxExtractor(session)
    assert [i.name for i in ex.layers()] == ["y"]
    assert "only the session's own outputs (y)" in caplog.text and "no longer exists" in caplog.text
    with pytest.raises(LayerSelectionError, match="no layer matches 'relu'"):
        cka_offline.extract(session, {"x": x}, tmp_path / "g.h5", layers=["relu"])
    out = cka_offline.extract(session, {"x": x}, tmp_path / "g.h5")
    with open_activations(out) as g, open_activations(by_path) as ref:
        np.testing.assert_array_equal(g.read("y", 0, 4), ref.read("y", 0, 4))
        assert g.provenance["model_sha256"] == "" and "unknown" in g.provenance["extra"]["model_identity"]


def test_a_session_whose_file_changed_since_is_refused(tmp_path):
    """Intermediate tensors come from sessions rebuilt from the session's file: when that file was
    re-exported since (other weights under the same name), the extraction must not run the new model."""
    import shutil

    import onnx

    import cka_offline
    from cka_offline.errors import ModelError

    path = str(tmp_path / "m.onnx")
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "..", "sample_data", "cnn_b.onnx"), path)
    session = ort.InferenceSession(path)
    model = onnx.load(path)
    for init_ in model.graph.initializer:
        if init_.data_type == TensorProto.FLOAT:
            init_.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init_) * 1.5, init_.name))
    onnx.save(model, path)
    x = RNG.normal(size=(8, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ModelError, match="no longer holds the model of the InferenceSession"):
        cka_offline.extract(session, x, tmp_path / "a.h5", layers=["conv1", "fc1"], progress=False)
    assert not (tmp_path / "a.h5").exists()
    # the session's own outputs come from the session itself, and a fresh session of the file works
    cka_offline.extract(ort.InferenceSession(path), x, tmp_path / "b.h5", layers=["conv1", "fc1"], progress=False)


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_module_called_twice_is_not_offered_as_an_alias(tmp_path, dynamo):
    """A ResNet block's relu runs twice: its module name would name one of the two tensors only (a silent,
    incomplete selection), so neither exporter's graph offers it; modules called once keep their alias."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "sample_data"))
    import resnet18

    model = resnet18.resnet18(width=4, num_classes=3).eval()
    path = str(tmp_path / "rn.onnx")
    kw: dict[str, Any] = dict(dynamo=True, optimize=False) if dynamo else dict(dynamo=False, do_constant_folding=False)
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), path, input_names=["x"], **kw)
    aliases = {a for info in OnnxExtractor(path).layers() for a in info.aliases}
    assert {"layer1.0.conv1", "layer1.0.bn2", "layer1.0", "fc"} <= aliases
    assert not {a for a in aliases if a.startswith("layer") and ".relu" in a}, sorted(aliases)
    with pytest.raises(LayerSelectionError, match="layer1.0.relu"):
        from cka_offline.selection import select_layers

        select_layers(OnnxExtractor(path).layers(), ["layer1.0.relu"])
