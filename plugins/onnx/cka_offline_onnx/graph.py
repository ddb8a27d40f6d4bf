"""Reading an ONNX graph: which tensors can be extracted, their per-example shapes and module aliases.

Pure ``onnx`` protobuf work, no onnxruntime. Imported only inside the extractor's methods, so that
listing plugins never imports ``onnx``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from cka_offline.extractor import LayerInfo

log = logging.getLogger(__name__)

#: element types whose tensors are activations worth comparing (numpy can hold them)
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
#: ops that own subgraphs; onnxruntime can only fetch tensors of the main graph
SUBGRAPH_REASON = "inside a {op} subgraph; onnxruntime cannot fetch it"


@dataclass(frozen=True)
class TensorType:
    """What shape inference knows about a tensor: element type (0 = unknown) and dims (None = unknown rank)."""

    elem_type: int
    dims: tuple[int | str | None, ...] | None


def tensor_type(vi: onnx.ValueInfoProto) -> TensorType:
    """Element type and dims of a value info (``int`` fixed, ``str`` symbolic, ``None`` unknown).

    A negative ``dim_value`` is unknown too: Paddle2ONNX writes ``dim_value: -1`` for a dynamic axis."""
    if not vi.type.HasField("tensor_type"):
        return TensorType(0, None)
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return TensorType(tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorType(tt.elem_type, tuple(dims))


def infer_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Types of every named tensor, from onnx shape inference where it works (subgraphs included).

    The model is loaded without external data, so inference sees only the graph; it never needs the
    weights. A model that shape inference rejects (custom ops, old opsets) still lists its tensors,
    with unknown shapes.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a nicety: tensors are listed without shapes
        log.warning("onnx shape inference failed (%s); layer shapes are unknown", exc)
        inferred = model
    types: dict[str, TensorType] = {}
    for graph in _graphs(inferred.graph):
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            t = tensor_type(vi)
            if vi.name not in types or (types[vi.name].dims is None and t.dims is not None):
                types[vi.name] = t
    return types


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose value does not depend on the model inputs: initializers, Constant outputs, and
    outputs of nodes all of whose inputs are constant (weights seen through Identity, Shape arithmetic
    on constants). Nodes with subgraphs are never constant (their bodies may read graph inputs)."""
    const = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        real_inputs = [i for i in node.input if i]
        if node.op_type == "Constant" and not node.domain:
            const.update(node.output)
        elif real_inputs and not _subgraphs(node) and all(i in const for i in real_inputs):
            const.update(node.output)
    return const


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: graph inputs that are not initializers (IR < 4 lists weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def per_example_shape(t: TensorType | None, batch_axis: int) -> tuple[int | None, ...] | None:
    """The shape without the batch axis; symbolic or unknown dims become None."""
    if t is None or t.dims is None or not t.dims:
        return None
    axis = batch_axis if batch_axis >= 0 else len(t.dims) + batch_axis
    if not 0 <= axis < len(t.dims):
        return None
    return tuple(d if isinstance(d, int) else None for i, d in enumerate(t.dims) if i != axis)


# --- module names recorded by PyTorch exporters ---------------------------------------------------------


def module_scopes(node: onnx.NodeProto, *, torchscript_names: bool, known: frozenset[str] = frozenset()) -> list[str]:
    """Full module paths (outermost first) a node was exported from, or [] if unknown.

    - dynamo exporter (``torch.onnx.export(dynamo=True)``, default in torch >= 2.9): node metadata
      ``pkg.torch.onnx.name_scopes`` = ``['', 'encoder', 'encoder.layer.0', 'linear']`` (root, full module
      paths, fx node), or the older ``namespace`` = ``": Net/features: Sequential/features.0: Conv2d/..."``.
    - TorchScript exporter (``dynamo=False``): node name ``/encoder/layer.0/dense/MatMul``, where each part
      is torch's *unqualified* name of the module (``torch.onnx.utils._unqualified_variable_name``: its
      path from the last non-numeric part on, so ``encoder.layer.0`` is ``layer.0`` and ``layer1.0`` stays
      ``layer1.0``); :func:`_torchscript_paths` rebuilds the full paths. A module called twice appears as
      ``/act/...`` and ``/act_1/...``; the suffixed name is kept as it is.

    ``known``: module paths that own weights (from the initializer names), used to complete TorchScript
    names of modules held in a container that is not called itself (an ``nn.ModuleDict``); a path that
    stays ambiguous is left out, with everything inside it.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    scopes: list[str] | None = None
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            parsed = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            if isinstance(parsed, (list, tuple)) and all(isinstance(s, str) for s in parsed):
                scopes = list(parsed)
        except (ValueError, SyntaxError):
            scopes = None
    if scopes is None and "namespace" in meta:
        scopes = [seg.split(": ", 1)[0] for seg in meta["namespace"].split("/")]
    if scopes is not None:
        # root first ('' = the top module), the fx node last; the parts between are full paths
        if len(scopes) < 3 or scopes[0] != "":
            return []
        return list(dict.fromkeys(s for s in scopes[1:-1] if s))
    if torchscript_names and node.name.startswith("/"):
        parts = node.name.split("/")
        if len(parts) >= 3:
            return _torchscript_paths([p for p in parts[1:-1] if p], known)
    return []


def _is_number(atom: str) -> bool:
    return atom.isdigit()


def _unqualified(path: str) -> str:
    """torch's unqualified name of a module path: from its last non-numeric part on."""
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not _is_number(atoms[i]):
            return ".".join(atoms[i:])
    return path


def _torchscript_paths(names: list[str], known: frozenset[str]) -> list[str]:
    """Full paths of the nested scopes of a TorchScript node name (``['encoder', 'layer.0', 'dense']`` ->
    ``['encoder', 'encoder.layer.0', 'encoder.layer.0.dense']``); stops at the first that is ambiguous."""
    paths: list[str] = []
    for name in names:
        parent = paths[-1] if paths else ""
        head = _unqualified(parent) if parent else ""
        rest = name[len(head) + 1 :] if head and name.startswith(head + ".") else ""
        if rest and all(_is_number(a) for a in rest.split(".")):
            full = f"{parent}.{rest}"  # a numbered child of a called container: layer1 -> layer1.0
        else:
            full = f"{parent}.{name}" if parent else name  # a named child, or one of an uncalled list: layer.0
        if known and full not in known:
            # a child of a container that is not called (nn.ModuleDict) loses the container's name
            prefix = parent + "." if parent else ""
            others = [k for k in known if k.startswith(prefix) and k.endswith("." + name) and k != full]
            if len(others) > 1:
                log.debug("module path of %r under %r is ambiguous (%s): no alias", name, parent, others)
                break
            if others:
                full = others[0]
        if full in paths:
            continue
        paths.append(full)
    return paths


def weight_modules(model: onnx.ModelProto) -> frozenset[str]:
    """Module paths (and their ancestors) that own a weight, from PyTorch-style initializer names
    (``encoder.layer.0.dense.bias``); names the exporter made up (``onnx::MatMul_50``) are skipped."""
    found: set[str] = set()
    for init in model.graph.initializer:
        name = init.name
        if "." not in name or "::" in name or "/" in name or " " in name:
            continue
        atoms = name.split(".")[:-1]
        found.update(".".join(atoms[: i + 1]) for i in range(len(atoms)))
    return frozenset(found)


def module_aliases(model: onnx.ModelProto, listed: set[str], const: set[str]) -> dict[str, tuple[str, ...]]:
    """``{tensor name: module names}``: each module name goes to the first output of the *last* node
    (in graph order) exported from that module, if that output is a listed float tensor.

    A module called several times per forward pass is not offered (its name would name one call only).
    Every module name is a full path (``encoder.layer.0``),
    so it names one tensor; a name that is already a tensor's name is not offered as an alias.
    """
    torchscript_names = model.producer_name == "pytorch"
    known = weight_modules(model) if torchscript_names else frozenset()
    last: dict[str, onnx.NodeProto] = {}
    runs: dict[str, int] = {}  # how many separate stretches of nodes each module's scope covers
    previous: set[str] = set()
    for node in model.graph.node:
        outs = [o for o in node.output if o]
        if not outs or all(o in const for o in outs):
            continue  # Constant nodes and weight arithmetic carry scopes too, but are not module outputs
        scopes = set(module_scopes(node, torchscript_names=torchscript_names, known=known))
        for path in scopes:
            last[path] = node
            if path not in previous:
                runs[path] = runs.get(path, 0) + 1
        previous = scopes
    # a module called more than once per forward pass has one tensor per call: a module name would name only
    # one of them (incomplete), so it is not offered (select the calls' tensors by name). Its calls show as
    # separate stretches of nodes (the dynamo exporter), or as NAME and NAME_1, NAME_2... (TorchScript's).
    repeated = {p for p, n in runs.items() if n > 1}
    for path in list(last):
        base, _, number = path.rpartition("_")
        if number.isdigit() and base in last and path not in known:
            repeated |= {path, base}
    for path in repeated:
        last.pop(path, None)
    tensors = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    aliases: dict[str, list[str]] = {}
    for path, node in last.items():
        out = node.output[0]
        if out in listed and path not in tensors:
            aliases.setdefault(out, []).append(path)
    return {t: tuple(sorted(names, key=lambda p: (p.count("."), p))) for t, names in aliases.items()}


# --- what --reduction mean averages ------------------------------------------------------------------------

#: ops whose output is channels first, (C, *spatial) per example: ``mean`` averages the spatial positions
CHANNELS_FIRST_OPS = frozenset(
    {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "BatchNormalization",
     "InstanceNormalization", "LRN", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)  # fmt: skip
#: ops whose output has its features on the last axis, (tokens, features) per example
TOKENS_FIRST_OPS = frozenset(
    {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "Attention", "MultiHeadAttention",
     "GroupQueryAttention", "EmbedLayerNormalization"}
)  # fmt: skip
#: tokens first when their ``axis`` attribute is the last axis
LAST_AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "LayerNormalization": -1, "SkipLayerNormalization": -1,
                 "SimplifiedLayerNormalization": -1, "RMSNormalization": -1}  # fmt: skip
#: ops that keep the layout of their (non-constant) inputs: element-wise maps and arithmetic
LAYOUT_KEEPING_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Sigmoid",
     "HardSigmoid", "HardSwish", "Swish", "Mish", "Tanh", "Erf", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log",
     "Sqrt", "Reciprocal", "Pow", "Add", "Sub", "Mul", "Div", "Clip", "Dropout", "Identity", "Cast", "Min", "Max",
     "Sum", "Mean", "ThresholdedRelu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign"}
)  # fmt: skip


def mean_layouts(model: onnx.ModelProto, types: dict[str, TensorType]) -> dict[str, str]:
    """``{tensor: "channels" | "tokens"}`` for the tensors whose layout the producing op tells: Conv and
    pooling give channels first; MatMul, Gemm, attention, and Softmax / LayerNormalization over the last
    axis give (tokens, features); element-wise ops keep the layout their inputs agree on (constants, such as
    a bias, do not count). Tensors of any other op (Reshape, Transpose, Concat...) are not in the result."""
    graph = model.graph
    const = constant_tensors(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    layout: dict[str, str] = {}
    for node in graph.node:
        op = node.op_type
        kind: str | None = None
        if op in CHANNELS_FIRST_OPS:
            kind = "channels"
        elif op in TOKENS_FIRST_OPS:
            kind = "tokens"
        elif op in LAST_AXIS_OPS:
            default = 1 if op in ("Softmax", "LogSoftmax") and opset < 13 else LAST_AXIS_OPS[op]
            axis = next((a.i for a in node.attribute if a.name == "axis"), default)
            rank = _rank(types, node.output[0] if node.output else "")
            if axis == -1 or (rank is not None and axis == rank - 1):
                kind = "tokens"
        elif op == "Gather" and node.input and node.input[0] in const:
            kind = "tokens"  # an embedding lookup: (tokens, features)
        elif op in LAYOUT_KEEPING_OPS:
            found = {layout.get(i) for i in node.input if i and i not in const}
            out_rank = _rank(types, node.output[0] if node.output else "")
            ranks = {_rank(types, i) for i in node.input if i and i not in const}
            if len(found) == 1 and None not in found and (out_rank is None or ranks <= {out_rank, None}):
                kind = found.pop()
        if kind is not None:
            for out in node.output:
                if out:
                    layout[out] = kind
    return layout


def _rank(types: dict[str, TensorType], name: str) -> int | None:
    t = types.get(name)
    return None if t is None or t.dims is None else len(t.dims)


# --- the graph a session runs --------------------------------------------------------------------------


#: spatial positions up to which a float32 mean is pooled in the graph (GlobalAveragePool); beyond, ReduceMean.
#: onnxruntime's NCHWc pooling sums positions one after another in float32: measured relative error 9e-7 at
#: 32 x 32, 5e-6 at 128 x 128, 8e-6 at 224 x 224 (ReduceMean: 2e-7 to 8e-7), against the 1e-5 that
#: ``cka_offline.testing.check_extractor`` allows.
POOL_MAX_POSITIONS = 128 * 128


def add_means(model: onnx.ModelProto, tensors: dict[str, tuple[int, np.dtype, int]], suffix: str) -> None:
    """Append nodes computing ``<tensor><suffix>``, the mean over axes 2.. of each tensor, ``(batch, C)``.

    ``tensors``: ``{name: (rank, dtype, positions)}`` as fetched (positions: the product of axes 2..).
    A float32 or float16 tensor (float16 cast to float32 first) of at most :data:`POOL_MAX_POSITIONS`
    positions is averaged by ``GlobalAveragePool`` and a ``Flatten``: onnxruntime runs the pooling in the
    blocked NCHWc layout its convolutions use on x86, so only the ``(batch, C)`` result is converted back,
    never the whole tensor, and a Conv + Relu fused node stays fused (its output is not a graph output).
    A ``ReduceMean`` needs the whole tensor reordered to NCHW first (measured in bench/bench_onnx.py); it
    averages the larger tensors (more accurate there) and float64 ones, in float64 (onnxruntime's CPU
    pooling is float32 only).
    """
    from onnx import helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for i, (tensor, (rank, dtype, positions)) in enumerate(tensors.items()):
        out, source = tensor + suffix, tensor
        if dtype not in (np.float32, np.float64):
            source = f"{tensor}::cka_cast"  # float16: averaged in float32
            graph.node.append(helper.make_node("Cast", [tensor], [source], to=TensorProto.FLOAT, name=f"cka_cast_{i}"))
        if dtype != np.float64 and positions <= POOL_MAX_POSITIONS:
            pooled = f"{tensor}::cka_pool"
            graph.node.append(helper.make_node("GlobalAveragePool", [source], [pooled], name=f"cka_pool_{i}"))
            graph.node.append(helper.make_node("Flatten", [pooled], [out], axis=1, name=f"cka_mean_{i}"))
            continue
        axes = list(range(2, rank))
        if opset >= 18:  # axes became an input in opset 18
            graph.initializer.append(
                onnx.numpy_helper.from_array(np.array(axes, dtype=np.int64), f"{tensor}::cka_axes")
            )
            node = helper.make_node(
                "ReduceMean", [source, f"{tensor}::cka_axes"], [out], keepdims=0, name=f"cka_mean_{i}"
            )
        else:
            node = helper.make_node("ReduceMean", [source], [out], axes=axes, keepdims=0, name=f"cka_mean_{i}")
        graph.node.append(node)


def keep_needed(graph: onnx.GraphProto) -> None:
    """Drop the nodes the graph's outputs do not depend on (the rest of the network after the last chosen
    tensor): onnxruntime runs every node of a graph, used or not. A node that owns subgraphs needs every
    tensor its bodies read, which may come from the outer graph. Node order is kept (and need not be
    topological: the dependencies are followed by name)."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    todo = [o.name for o in graph.output]
    seen: set[str] = set()
    kept: set[int] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is None or index in kept:
            continue
        kept.add(index)
        node = graph.node[index]
        todo.extend(i for i in node.input if i)
        for sub in _subgraphs(node):
            todo.extend(_names_read(sub))
    if len(kept) < len(graph.node):
        nodes = [node for i, node in enumerate(graph.node) if i in kept]
        del graph.node[:]
        graph.node.extend(nodes)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            names |= _names_read(sub)
    return names


# --- the listing -----------------------------------------------------------------------------------------


def list_layers(
    model: onnx.ModelProto, batch_axis: int = 0, types: dict[str, TensorType] | None = None
) -> list[LayerInfo]:
    """Every float tensor computed by a node, in graph order, with op type, shape and aliases.

    Skipped: initializers, Constant outputs and tensors computable from constants only, graph inputs, and
    tensors of a known non-float type. Tensors inside If/Loop/Scan bodies are listed with
    ``exposable=False``.
    """
    types = infer_types(model) if types is None else types
    const = constant_tensors(model.graph)
    infos: list[LayerInfo] = []

    def is_float(name: str) -> bool:
        t = types.get(name)
        return t is None or t.elem_type == 0 or t.elem_type in FLOAT_TYPES  # unknown type: cannot rule out

    def sub_layers(graph: onnx.GraphProto, outer_op: str) -> None:
        sub_const = constant_tensors(graph)
        for node in graph.node:
            for sub in _subgraphs(node):
                sub_layers(sub, outer_op)
            for out in node.output:
                if out and out not in sub_const and is_float(out):
                    infos.append(
                        LayerInfo(
                            out,
                            node.op_type,
                            per_example_shape(types.get(out), batch_axis),
                            exposable=False,
                            reason=SUBGRAPH_REASON.format(op=outer_op),
                        )
                    )

    for node in model.graph.node:
        for sub in _subgraphs(node):
            sub_layers(sub, node.op_type)
        for out in node.output:
            if not out or out in const or not is_float(out):
                continue
            t = types.get(out)
            if t is not None and t.dims == ():
                infos.append(
                    LayerInfo(
                        out,
                        node.op_type,
                        (),
                        exposable=False,
                        reason="a scalar: it has no batch axis, so it is not a per-example activation",
                    )
                )
                continue
            infos.append(LayerInfo(out, node.op_type, per_example_shape(t, batch_axis)))

    listed = {i.name for i in infos if i.exposable}
    aliases = module_aliases(model, listed, const)
    if aliases:
        infos = [LayerInfo(i.name, i.kind, i.shape, aliases.get(i.name, ()), i.exposable, i.reason) for i in infos]
    return infos
