"""The graph an ONNX session runs keeps onnxruntime's optimisations: a Conv + Relu pair stays fused when only
the Relu's output is chosen, ``--reduction mean`` pools in the blocked (NCHWc) layout and returns only
``(batch, C)``, and the nodes after the last chosen tensor are not run. The values equal those of an
independent reference: a plain onnxruntime session with the node outputs exposed and every optimisation off.
The listing (names, aliases, layouts) is the graph as written, whatever the sessions did."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from cka_offline.store.reader import open_activations  # noqa: E402
from cka_offline_onnx import extractor as onnx_extractor  # noqa: E402
from cka_offline_onnx.extractor import OnnxExtractor  # noqa: E402
from cka_offline_onnx.graph import POOL_MAX_POSITIONS, keep_needed  # noqa: E402

from ..hardening.builders import invoke  # noqa: E402

RNG = np.random.default_rng(11)
POST = ["relu1", "relu2", "relu3"]
PRE = ["conv1", "conv2", "conv3"]


class CNN(nn.Module):
    """Three Conv + ReLU pairs of 16 channels (a multiple of onnxruntime's NCHWc block), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(self.gap(self.relu3(self.conv3(x))).flatten(1))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("fusion") / "cnn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            CNN().eval(),
            (torch.zeros(2, 3, 12, 12),),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            do_constant_folding=False,
        )
    return path


def tensor(module: str) -> str:
    """The TorchScript exporter's name of a module's output tensor (what the alias must resolve to)."""
    op = "Relu" if module.startswith("relu") else "Conv"
    return f"/{module}/{op}_output_0"


def unoptimized(path: str, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: the model as written with ``names`` as its outputs, run with every optimisation off."""
    model = onnx.load(path)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"x": x})))


@pytest.mark.parametrize("selection", ["post", "pre"])
def test_extracted_values_equal_an_unoptimized_session(cnn, tmp_path, selection):
    """Through the command: --reduction mean (pooled in the graph) and flatten, post- and pre-activation
    tensors chosen by module name, against the reference session's tensors (mean in float64 here)."""
    modules = POST if selection == "post" else PRE
    x = RNG.normal(size=(10, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    ref = unoptimized(cnn, [tensor(m) for m in modules], x)
    for reduction in ("mean", "flatten"):
        out = tmp_path / f"{reduction}.h5"
        args = [cnn, "-i", tmp_path / "in.npz", "-o", out, "-l", ",".join(modules), "-r", reduction, "-b", "4"]
        result = invoke("cka-extract", args)
        assert result.exit_code == 0, result.stderr
        with open_activations(str(out)) as f:
            for m in modules:
                full = ref[tensor(m)].astype(np.float64)
                expected = full.mean(axis=(2, 3)) if reduction == "mean" else full.reshape(len(x), -1)
                got = f.read(tensor(m), 0, len(x))
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{m} {reduction}")


def optimized_graph(monkeypatch, tmp_path, path: str, modules: list[str], mean: bool) -> onnx.ModelProto:
    """The graph onnxruntime optimised for the last session the extractor built for ``modules`` (its own
    session options, with ``optimized_model_filepath`` added)."""
    real = onnx_extractor._new_session
    dumped = tmp_path / ("mean" if mean else "raw") / "optimized.onnx"
    dumped.parent.mkdir(exist_ok=True)

    def recording(model, opts, providers):
        opts.optimized_model_filepath = str(dumped)
        return real(model, opts, providers)

    monkeypatch.setattr(onnx_extractor, "_new_session", recording)
    ex = OnnxExtractor(path)
    x = RNG.normal(size=(4, 3, 12, 12)).astype(np.float32)
    ex.run({"x": x}, modules)  # the first batch: full tensors (their rank tells whether the mean is spatial)
    if mean:
        assert sorted(ex.reduce_early({m: "mean" for m in modules})) == sorted(modules)
        dumped.unlink()
        ex.run({"x": x}, modules)  # a new session, with the means in the graph
    monkeypatch.undo()
    assert dumped.exists(), "no session was built"
    return onnx.load(str(dumped))


def fused(model: onnx.ModelProto) -> int:
    """Convolutions that carry their ReLU (the NCHWc Conv on x86 or com.microsoft FusedConv elsewhere)."""
    return sum(
        1
        for n in model.graph.node
        for a in n.attribute
        if a.name == "activation" and a.s == b"Relu" and "Conv" in n.op_type
    )


def test_post_activation_mean_keeps_the_fused_graph(cnn, tmp_path, monkeypatch):
    model = optimized_graph(monkeypatch, tmp_path, cnn, POST, mean=True)
    ops = [n.op_type for n in model.graph.node]
    assert fused(model) == 3 and "Relu" not in ops, ops  # every Conv + Relu pair stayed fused
    assert "ReduceMean" not in ops and "Gemm" not in ops, ops  # pooled, not reduced; the classifier is not run
    if any(n.domain == "com.microsoft.nchwc" for n in model.graph.node):
        # only the pooled (batch, C, 1, 1) results leave the blocked layout, never a whole tensor
        reordered = [n.input[0] for n in model.graph.node if n.op_type == "ReorderOutput"]
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        assert reordered and all(producers[t] == "GlobalAveragePool" for t in reordered), (reordered, producers)
    # flatten needs the whole tensors out; the Relu is still the fused Conv's
    raw = optimized_graph(monkeypatch, tmp_path, cnn, POST, mean=False)
    assert fused(raw) == 3 and "Relu" not in [n.op_type for n in raw.graph.node]


def test_pre_activation_selection_breaks_the_fusion(cnn, tmp_path, monkeypatch):
    """The Conv's own output is chosen: onnxruntime cannot fuse the Relu into it (reported apart in
    bench/bench_onnx.py). This is what the fused-graph test above must tell apart."""
    model = optimized_graph(monkeypatch, tmp_path, cnn, PRE, mean=True)
    ops = [n.op_type for n in model.graph.node]
    # relu1 and relu2 run on their own; relu3 comes after the last chosen tensor (conv3) and is not run
    assert fused(model) == 0 and ops.count("Relu") == 2, ops


def test_listing_is_the_graph_as_written_after_sessions_ran(cnn):
    """Names, aliases (module paths) and layouts come from the unmodified graph, before and after sessions
    with appended means and pruned nodes were built from it."""
    ex = OnnxExtractor(cnn)
    before = ex.layers()
    by_alias = {a: i for i in before for a in i.aliases}
    for m in [*POST, *PRE, "pool", "fc"]:
        assert m in by_alias, sorted(by_alias)
    for m in POST + PRE:
        assert by_alias[m].name == tensor(m) and by_alias[m].layout == "channels_first" and by_alias[m].shape
    x = RNG.normal(size=(3, 3, 12, 12)).astype(np.float32)
    ex.run({"x": x}, ["relu1", "conv2"])
    ex.reduce_early({"relu1": "mean", "conv2": "mean"})
    ex.run({"x": x}, ["relu1", "conv2"])
    assert ex.layers() == before == OnnxExtractor(cnn).layers()
    assert ex._model is not None
    assert ex._model.SerializeToString() == onnx.load(cnn, load_external_data=False).SerializeToString()


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((4, 7), np.float32),
        ((4, 3, 2, 5), np.float32),
        ((4, 3, 5), np.float16),
        ((4, 3, 5), np.float64),
        ((2, 130, 130), np.float32),
    ],
)
def test_mean_in_the_graph_for_other_ranks_and_types(tmp_path, shape, dtype):
    """(C, L) and (C, D, H, W) tensors are pooled too; float16 is pooled in float32 (as before); float64, and
    maps of more than 128 x 128 positions (where float32 pooling drifts), are reduced by ReduceMean. Against
    the float64 mean of the full tensor."""
    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}[dtype]
    dims = ["N", *shape]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Abs", ["m"], ["a"])],
        "g",
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info("a", elem, dims)],
        [numpy_helper.from_array(np.array(1.5, dtype=dtype), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "g.onnx")
    onnx.save(model, path)
    ex = OnnxExtractor(path, options={"mean_layout": "channels_first"})
    x = RNG.normal(size=(6, *shape)).astype(dtype)
    full = ex.run({"x": x}, ["m", "a"])
    assert sorted(ex.reduce_early({"m": "mean", "a": "mean"})) == ["a", "m"]
    reduced = ex.run({"x": x}, ["m", "a"])
    session_graph = onnx.load_from_string(ex._graph_bytes(("a::cka_mean", "m::cka_mean"))).graph
    pooled = dtype != np.float64 and int(np.prod(shape[1:])) <= POOL_MAX_POSITIONS
    ops = [n.op_type for n in session_graph.node]
    assert ops.count("GlobalAveragePool" if pooled else "ReduceMean") == 2, ops
    for name in ("m", "a"):
        expected = full[name].astype(np.float64).mean(axis=tuple(range(2, len(shape) + 1)))
        assert reduced[name].dtype == (np.float64 if dtype == np.float64 else np.float32)
        # float16: onnxruntime may compute the float16 ops in float32 inside the graph (values to float16 rounding)
        tol = {np.float64: 1e-12, np.float32: 1e-6, np.float16: 2e-3}[dtype]
        np.testing.assert_allclose(reduced[name], expected, rtol=tol, atol=tol, err_msg=name)


def test_keep_needed_keeps_what_a_subgraph_reads():
    """A node run only because an If body reads its output (an outer-scope name) is kept; nodes after the
    chosen tensors, and branches of the graph nothing chosen depends on, are dropped."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["m"], ["t"])], "then", [], [helper.make_empty_tensor_value_info("t")]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["m"], ["e"])], "else", [], [helper.make_empty_tensor_value_info("e")]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["m"], name="m"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="s"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="cond"),
        helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=other, name="if"),
        helper.make_node("Exp", ["picked"], ["after"], name="after"),
        helper.make_node("Sigmoid", ["x"], ["unused"], name="unused"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])], [])
    graph.output.append(helper.make_empty_tensor_value_info("picked"))
    keep_needed(graph)
    assert [n.name for n in graph.node] == ["m", "s", "cond", "if"]
    del graph.output[:]
    graph.output.append(helper.make_empty_tensor_value_info("m"))
    keep_needed(graph)
    assert [n.name for n in graph.node] == ["m"]


def test_keep_needed_follows_names_in_a_graph_out_of_order():
    """onnxruntime sorts the nodes itself, so a graph listed out of order loads; its producers are kept."""
    nodes = [
        helper.make_node("Exp", ["b"], ["c"], name="c"),
        helper.make_node("Neg", ["x"], ["unused"], name="unused"),
        helper.make_node("Relu", ["a"], ["b"], name="b"),
        helper.make_node("Abs", ["x"], ["a"], name="a"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])], [])
    graph.output.append(helper.make_empty_tensor_value_info("c"))
    keep_needed(graph)
    assert [n.name for n in graph.node] == ["c", "b", "a"]
