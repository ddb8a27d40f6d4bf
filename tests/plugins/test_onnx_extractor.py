"""The ONNX extractor on small graphs built here with onnx.helper, checked against numpy float64."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cka_offline_onnx  # noqa: E402
from cka_offline.errors import DeviceError, InputError, LayerSelectionError, ModelError, OptionError  # noqa: E402
from cka_offline_onnx import extractor as onnx_extractor  # noqa: E402
from cka_offline_onnx.extractor import OnnxExtractor  # noqa: E402

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 5)).astype(np.float32)
B1 = RNG.normal(size=(5,)).astype(np.float32)
W2 = RNG.normal(size=(5, 3)).astype(np.float32)


def mlp_model(batch: int | str = "N") -> onnx.ModelProto:
    """x[N,4] -> MatMul -> Add -> Relu -> MatMul -> y[N,3], plus tensors that must not be listed
    (Constant, Identity of a weight, Shape) and an If whose branches hold a float tensor."""
    nodes = [
        helper.make_node("Identity", ["W1"], ["W1_copy"], name="weight_identity"),
        helper.make_node("MatMul", ["x", "W1_copy"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "B1"], ["h_bias"], name="bias1"),
        helper.make_node("Relu", ["h_bias"], ["act"], name="relu1"),
        helper.make_node("MatMul", ["act", "W2"], ["y"], name="fc2"),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Shape", ["act"], ["act_shape"]),
        helper.make_node("ReduceSum", ["y"], ["ysum"], keepdims=0),
        helper.make_node("Greater", ["ysum", "zero"], ["cond"]),
        helper.make_node(
            "If",
            ["cond"],
            ["branch_out"],
            then_branch=helper.make_graph(
                [helper.make_node("Mul", ["act", "two"], ["then_inner"])],
                "then",
                [],
                [helper.make_tensor_value_info("then_inner", TensorProto.FLOAT, [batch, 5])],
            ),
            else_branch=helper.make_graph(
                [helper.make_node("Add", ["act", "two"], ["else_inner"])],
                "else",
                [],
                [helper.make_tensor_value_info("else_inner", TensorProto.FLOAT, [batch, 5])],
            ),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [batch, 5]),
            helper.make_tensor_value_info("act_shape", TensorProto.INT64, [2]),
        ],
        initializer=[
            numpy_helper.from_array(W1, "W1"),
            numpy_helper.from_array(B1, "B1"),
            numpy_helper.from_array(W2, "W2"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="unit-test", producer_version="1.2"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    h = x @ W1.astype(np.float64)
    act = np.maximum(h + B1, 0)
    return {"h": h, "h_bias": h + B1, "act": act, "y": act @ W2.astype(np.float64)}


@pytest.fixture()
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model(), str(path))
    return str(path)


def test_plugin_registration_and_class_attributes():
    from cka_offline.registry import get_extractor, get_plugin_manager

    assert get_extractor("onnx", get_plugin_manager()) is OnnxExtractor
    assert OnnxExtractor.name == "onnx" and OnnxExtractor.framework == "onnxruntime"
    assert OnnxExtractor.description and {o.name for o in OnnxExtractor.declared_options} == {
        "optimization_level",
        "batch_axis",
        "threads",
        "fixed_inputs",
        "mean_layout",
    }
    assert cka_offline_onnx.__version__ == "0.1.0"


def test_can_open(tmp_path, mlp_path):
    assert OnnxExtractor.can_open(mlp_path) and OnnxExtractor.can_open("elsewhere/Model.ONNX")
    assert not OnnxExtractor.can_open(str(tmp_path))  # a folder without model.onnx
    assert not OnnxExtractor.can_open("model.safetensors")
    folder = tmp_path / "exported"
    folder.mkdir()
    onnx.save_model(mlp_model(), str(folder / "model.onnx"))
    assert OnnxExtractor.can_open(str(folder))
    with OnnxExtractor(str(folder)) as ex:
        assert ex.path == str(folder / "model.onnx")


def test_layers_list_float_node_outputs_only(mlp_path):
    ex = OnnxExtractor(mlp_path)
    infos = {i.name: i for i in ex.layers()}
    # weights (even through Identity), Constant outputs, int tensors (Shape) and bool tensors are skipped
    assert [n for n, i in infos.items() if i.exposable] == ["h", "h_bias", "act", "y", "branch_out"]
    assert infos["h"].kind == "MatMul" and infos["act"].kind == "Relu"
    assert infos["h"].shape == (5,) and infos["y"].shape == (3,)
    assert ex.input_names() == ["x"]


def test_if_subgraph_tensors_are_listed_but_refused(mlp_path):
    ex = OnnxExtractor(mlp_path)
    inner = {i.name: i for i in ex.layers() if not i.exposable}
    assert set(inner) >= {"then_inner", "else_inner"}
    assert inner["then_inner"].reason == "inside a If subgraph; onnxruntime cannot fetch it"
    with pytest.raises(ModelError, match="'then_inner' cannot be extracted: inside a If subgraph"):
        ex.run({"x": np.zeros((2, 4), np.float32)}, ["then_inner"])


def test_scalar_tensor_is_not_exposable(mlp_path):
    ysum = next(i for i in OnnxExtractor(mlp_path).layers() if i.name == "ysum")
    assert ysum.shape is None or ysum.shape == ()
    model = mlp_model()
    inferred = onnx.shape_inference.infer_shapes(model)
    # ReduceSum over every axis of y is a scalar: the listing marks it as having no batch axis
    assert any(v.name == "ysum" and not v.type.tensor_type.shape.dim for v in inferred.graph.value_info)
    assert not ysum.exposable and "no batch axis" in ysum.reason


def test_run_matches_numpy_reference_and_returns_only_chosen(mlp_path):
    x = RNG.normal(size=(6, 4))  # float64: cast to the model's float32
    with OnnxExtractor(mlp_path) as ex:
        out = ex.run({"x": x}, ["act", "y", "h"])
    assert set(out) == {"act", "y", "h"}
    ref = reference(x.astype(np.float32))
    for name, arr in out.items():
        assert arr.shape == ref[name].shape and arr.dtype == np.float32
        np.testing.assert_allclose(arr, ref[name], atol=1e-5)


def test_outputs_of_a_batch_survive_the_next_batch(mlp_path):
    # the session's memory arena is reused run after run: what run() returned must not live in it
    ex = OnnxExtractor(mlp_path)
    first_x, second_x = RNG.normal(size=(6, 4)).astype(np.float32), RNG.normal(size=(6, 4)).astype(np.float32)
    first = ex.run({"x": first_x}, ["h", "act", "y"])
    ex.run({"x": second_x}, ["h", "act", "y"])
    for name in first:
        np.testing.assert_allclose(first[name], reference(first_x)[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_single_input_is_passed_by_position(mlp_path):
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    out = OnnxExtractor(mlp_path).run({"images": x}, ["y"])
    np.testing.assert_allclose(out["y"], reference(x)["y"], atol=1e-5)


def test_session_is_cached_per_layer_set(mlp_path, monkeypatch):
    calls = []
    real = onnx_extractor._new_session
    monkeypatch.setattr(onnx_extractor, "_new_session", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = OnnxExtractor(mlp_path)
    x = np.ones((2, 4), np.float32)
    ex.run({"x": x}, ["act", "y"])
    ex.run({"x": x}, ["y", "act"])
    assert len(calls) == 1
    ex.run({"x": x}, ["h"])
    assert len(calls) == 2


def test_external_data_model(tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        mlp_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert os.path.getsize(folder / "weights.bin") >= W1.nbytes + W2.nbytes
    x = RNG.normal(size=(4, 4)).astype(np.float32)
    ex = OnnxExtractor(str(path))
    np.testing.assert_allclose(ex.run({"x": x}, ["y"])["y"], reference(x)["y"], atol=1e-5)
    assert "external_data_sha256" in ex.provenance()
    assert sorted(os.listdir(folder)) == ["model.onnx", "weights.bin"]


def test_external_data_fallback_through_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    onnx.save_model(mlp_model(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    real = onnx_extractor._new_session
    seen = []

    def only_files(model, opts, providers):  # an onnxruntime that cannot resolve external data of bytes
        seen.append(model)
        if isinstance(model, bytes):
            raise RuntimeError("External data path validation failed")
        return real(model, opts, providers)

    monkeypatch.setattr(onnx_extractor, "_new_session", only_files)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    out = OnnxExtractor(str(path)).run({"x": x}, ["act"])
    np.testing.assert_allclose(out["act"], reference(x)["act"], atol=1e-5)
    assert isinstance(seen[-1], str) and os.path.dirname(seen[-1]) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "w.bin"]  # temporary graph removed


def test_missing_external_data_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(mlp_model(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(ModelError, match="external data file 'w.bin'.*keep the .onnx file and its data files together"):
        OnnxExtractor(str(path))


def transpose_model() -> onnx.ModelProto:
    """x[N,4] -> Relu -> Transpose -> t[4,N]: the batch sits on axis 1 of t."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0])],
        "transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, "N"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_axis_option(tmp_path):
    path = str(tmp_path / "t.onnx")
    onnx.save_model(transpose_model(), path)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    ex = OnnxExtractor(path, options={"batch_axis": "1"})  # CLI values arrive as strings
    assert {i.name: i.shape for i in ex.layers()}["t"] == (4,)
    np.testing.assert_array_equal(ex.run({"x": x}, ["t"])["t"], np.maximum(x, 0))
    with pytest.raises(ModelError, match=r"'t' has shape \(4, 3\) for a batch of 3: its axis 0 is not the batch axis"):
        OnnxExtractor(path).run({"x": x}, ["t"])


def test_fixed_batch_of_one_runs_example_by_example(tmp_path):
    # Reshape to a constant [1, 5] is what tracing at batch 1 bakes in: feeding a batch of 3 would break it
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["flat"]),
            helper.make_node("Tanh", ["flat"], ["out"]),
        ],
        "b1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(np.array([1, 5], np.int64), "shape")],
    )
    path = str(tmp_path / "b1.onnx")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    ex = OnnxExtractor(path)
    assert ex.fixed_batch_one and {i.name: i.shape for i in ex.layers()}["out"] == (5,)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    out = ex.run({"x": x}, ["out", "h"])
    np.testing.assert_allclose(out["out"], np.tanh(x.astype(np.float64) @ W1), atol=1e-5)
    assert out["h"].shape == (3, 5)


def test_optimization_levels_keep_values(mlp_path):
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    names = ["h", "h_bias", "act", "y"]
    expected = reference(x)
    assert OnnxExtractor(mlp_path).provenance()["optimization_level"] == "all"  # the default
    for level in ("disable", "basic", "extended", "all"):
        ex = OnnxExtractor(mlp_path, options={"optimization_level": level})
        together = ex.run({"x": x}, names)
        assert ex.provenance()["optimization_level"] == level
        for name in names:
            # alone, MatMul + Add may be fused into one Gemm whose output is the requested tensor
            alone = OnnxExtractor(mlp_path, options={"optimization_level": level}).run({"x": x}, [name])[name]
            np.testing.assert_allclose(together[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=f"{level} {name}")
            np.testing.assert_allclose(alone, expected[name], rtol=1e-5, atol=1e-5, err_msg=f"{level} {name} alone")


def conv_bn_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,2,5,5] -> Conv -> BatchNormalization -> Relu -> GlobalAveragePool: the pattern onnxruntime
    folds (Conv+BN) and fuses (Conv+Relu) when the intermediate tensors are not graph outputs."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    mean, var = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w, "w"), (b, "b"), (scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var"))
    ]
    graph = helper.make_graph(
        nodes,
        "convbn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", 3, 1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"w": w, "b": b, "scale": scale, "bias": bias, "mean": mean, "var": var}


def test_optimization_levels_keep_the_meaning_of_folded_tensors(tmp_path):
    model, p = conv_bn_model()
    path = str(tmp_path / "convbn.onnx")
    onnx.save_model(model, path)
    x = RNG.normal(size=(4, 2, 5, 5)).astype(np.float32)
    # float64 reference written from the operators' definitions
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N, C, 5, 5, 3, 3
    conv = np.einsum("ncijkl,ockl->noij", windows, p["w"].astype(np.float64)) + p["b"][None, :, None, None]
    shape = (1, 3, 1, 1)
    bn = (conv - p["mean"].reshape(shape)) / np.sqrt(p["var"].reshape(shape) + 1e-5) * p["scale"].reshape(shape) + p[
        "bias"
    ].reshape(shape)
    expected = {
        "conv": conv,
        "bn": bn,
        "relu": np.maximum(bn, 0),
        "pool": np.maximum(bn, 0).mean(axis=(2, 3), keepdims=True),
    }
    for level in ("disable", "basic", "extended", "all"):
        together = OnnxExtractor(path, options={"optimization_level": level}).run({"x": x}, list(expected))
        for name, want in expected.items():
            alone = OnnxExtractor(path, options={"optimization_level": level}).run({"x": x}, [name])[name]
            np.testing.assert_allclose(together[name], want, rtol=1e-4, atol=1e-4, err_msg=f"{level} {name}")
            np.testing.assert_allclose(alone, want, rtol=1e-4, atol=1e-4, err_msg=f"{level} {name} alone")


def test_vanished_tensor_is_an_error(mlp_path, monkeypatch):
    class FusedSession:  # what a session looks like when an optimiser dropped a requested output
        def get_outputs(self):
            return []

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(onnx_extractor, "_new_session", lambda *a, **k: FusedSession())
    ex = OnnxExtractor(mlp_path, options={"optimization_level": "all"})
    with pytest.raises(ModelError, match="'act' vanished at optimization_level=all.*optimization_level=disable"):
        ex.run({"x": np.ones((1, 4), np.float32)}, ["act"])


def test_provenance(mlp_path):
    prov = OnnxExtractor(mlp_path).provenance()
    with open(mlp_path, "rb") as fh:
        assert prov["model_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert prov["framework"] == "onnxruntime" and prov["framework_version"] == ort.__version__
    assert prov["model"] == mlp_path and prov["opset"] == "ai.onnx:17"
    assert prov["producer"] == "unit-test 1.2" and prov["execution_provider"] == "CPUExecutionProvider"
    assert all(isinstance(v, str) for v in prov.values())


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_layer_lists_close_matches(mlp_path):
    with pytest.raises(LayerSelectionError, match="no tensor named 'acts'; close matches: act"):
        OnnxExtractor(mlp_path).run({"x": np.ones((1, 4), np.float32)}, ["acts"])


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"x": np.ones((2, 4)), "mask": np.ones((2, 4))}, "has no input 'mask'; it takes: x \\[N, 4\\] float32"),
        ({"x": np.ones((2, 4, 1))}, r"input 'x' expects shape \[N, 4\] \(rank 2\), got \(2, 4, 1\) \(rank 3\)"),
        ({"x": np.ones((2, 7))}, r"input 'x' expects shape \[N, 4\], got \(2, 7\): needs 4 on axis 1"),
    ],
)
def test_input_errors(mlp_path, inputs, message):
    with pytest.raises(InputError, match=message):
        OnnxExtractor(mlp_path).run(inputs, ["y"])


def two_input_model(batch: int | str = "N") -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["ids_f", "x"], ["s"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT32, [batch, 3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3]),
        ],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_by_name_cast_to_declared_type(tmp_path):
    path = str(tmp_path / "two.onnx")
    onnx.save_model(two_input_model(), path)
    ex = OnnxExtractor(path)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    out = ex.run({"x": np.full((2, 3), 0.5), "ids": ids.astype(np.float64)}, ["s"])  # integral floats are fine
    np.testing.assert_array_equal(out["s"], ids + 0.5)
    with pytest.raises(InputError, match="input 'ids' of .* is int32 in the model, but the given float64 values"):
        ex.run({"x": np.zeros((1, 3)), "ids": np.full((1, 3), 0.5)}, ["s"])
    with pytest.raises(InputError, match="input 'x' is missing; the model takes: ids \\[N, 3\\] int32, x"):
        ex.run({"ids": ids}, ["s"])
    with pytest.raises(InputError, match="input 'x' has 1 examples, the other inputs 2"):
        ex.run({"ids": ids, "x": np.zeros((1, 3))}, ["s"])


def test_fixed_batch_other_than_one(tmp_path):
    path = str(tmp_path / "b8.onnx")
    onnx.save_model(two_input_model(batch=8), path)
    with pytest.raises(InputError, match=r"needs a batch of 8 \(the graph fixes it; use --batch-size 8\)"):
        OnnxExtractor(path).run({"ids": np.zeros((2, 3), np.int32), "x": np.zeros((2, 3))}, ["s"])


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", bytes(range(256)) * 8])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken.onnx is not (a readable ONNX model|an ONNX model)"):
        OnnxExtractor(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such ONNX file"):
        OnnxExtractor(str(tmp_path / "absent.onnx"))


def test_device_cuda_without_provider(mlp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="needs onnxruntime's CUDAExecutionProvider.*install onnxruntime-gpu"):
        OnnxExtractor(mlp_path, device="cuda")
    with pytest.raises(DeviceError, match="needs onnxruntime's CUDAExecutionProvider"):
        OnnxExtractor(mlp_path, device="cuda:1")
    assert OnnxExtractor(mlp_path, device="auto").provenance()["execution_provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_device_not_understood(mlp_path, device):
    with pytest.raises(DeviceError, match=f"device '{device}'.*auto, cpu or cuda, cuda:N"):
        OnnxExtractor(mlp_path, device=device)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimisation": "all"}, "unknown option\\(s\\) optimisation for the onnx extractor"),
        ({"optimization_level": "max"}, "optimization_level='max' is not one of disable, basic, extended, all"),
        ({"batch_axis": "first"}, "batch_axis='first' is not an integer"),
        ({"threads": -1}, "threads=-1 must be >= 0"),
    ],
)
def test_option_errors(mlp_path, options, message):
    with pytest.raises(OptionError, match=message):
        OnnxExtractor(mlp_path, options=options)


# --- the core's conformance checks -----------------------------------------------------------------------


def test_conformance(mlp_path):
    from cka_offline.testing import check_extractor

    # branch_out is left out: the If picks its branch from the sum over the whole batch, on purpose
    layers = ["h", "h_bias", "act", "y"]
    checked = check_extractor(OnnxExtractor, mlp_path, {"x": RNG.normal(size=(5, 4)).astype(np.float32)}, layers=layers)
    assert checked == layers


def test_conformance_external_data_and_batch_axis(tmp_path):
    from cka_offline.testing import check_extractor

    path = str(tmp_path / "t.onnx")
    onnx.save_model(transpose_model(), path, save_as_external_data=True, location="t.bin", size_threshold=0)
    check_extractor(
        OnnxExtractor, path, {"x": RNG.normal(size=(3, 4)).astype(np.float32)}, layers=["t"], options={"batch_axis": 1}
    )


def test_end_to_end_through_the_core(mlp_path, tmp_path):
    from cka_offline.extraction import extract
    from cka_offline.store.reader import open_activations

    x = RNG.normal(size=(7, 4)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x)
    out = extract(
        mlp_path, str(tmp_path / "inputs.npz"), str(tmp_path / "acts.h5"), layers=["kind:Relu", "y"], batch_size=3
    )
    with open_activations(out) as f:
        assert f.layer_names == ["act", "y"] and f.provenance["framework"] == "onnxruntime"
        np.testing.assert_allclose(f.read("y", 0, 7), reference(x)["y"], atol=1e-5)


@pytest.mark.parametrize("opset", [17, 18])
def test_mean_taken_in_the_graph_matches_the_core_s_reduction(tmp_path, opset):
    """reduce_early("mean"): a ReduceMean per tensor (axes as an attribute before opset 18, an input from
    18 on); the same numbers as the core's mean of the full tensor, every level, tensors alone and together."""
    from cka_offline.reduce import reduce

    model, _ = conv_bn_model()
    model.opset_import[0].version = opset
    if opset >= 18:
        model.ir_version = 8
    path = str(tmp_path / f"convbn{opset}.onnx")
    onnx.save_model(model, path)
    x = RNG.normal(size=(4, 2, 5, 5)).astype(np.float32)
    names = ["conv", "bn", "relu"]
    for level in ("disable", "all"):
        ex = OnnxExtractor(path, options={"optimization_level": level})
        full = ex.run({"x": x}, names + ["pool"])
        assert sorted(ex.reduce_early({n: "mean" for n in names})) == sorted(names)
        reduced = ex.run({"x": x}, names + ["pool"])
        for name in names:
            assert reduced[name].shape == (4, 3)
            np.testing.assert_allclose(
                reduced[name],
                reduce(name, "mean", full[name].astype(np.float64)),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{level} {name}",
            )
        np.testing.assert_array_equal(reduced["pool"], full["pool"])  # not asked: unchanged
        alone = ex.run({"x": x}, ["bn"])["bn"]
        np.testing.assert_allclose(alone, reduced["bn"], rtol=1e-6, atol=1e-6)


def test_mean_in_the_graph_through_extract_and_check_extractor(tmp_path):
    from cka_offline.extraction import extract
    from cka_offline.store.reader import open_activations
    from cka_offline.testing import check_extractor

    model, _ = conv_bn_model()
    path = str(tmp_path / "convbn.onnx")
    onnx.save_model(model, path)
    x = RNG.normal(size=(11, 2, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    check_extractor(OnnxExtractor, path, {"x": x[:5]}, layers=["conv", "relu"])  # checks the early mean too
    out = extract(path, tmp_path / "in.npz", tmp_path / "a.h5", batch_size=4, reduction="mean", layers=["conv", "relu"])
    full = OnnxExtractor(path).run({"x": x}, ["conv", "relu"])
    with open_activations(out) as f:
        for name in ("conv", "relu"):
            assert f.layer(name).original_shape == (3, 5, 5)
            np.testing.assert_allclose(
                f.read(name, 0, 11), full[name].astype(np.float64).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6
            )
