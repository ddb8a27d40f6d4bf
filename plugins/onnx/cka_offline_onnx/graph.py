"""Reading an ONNX graph: which tensors can be extracted, their per-example shapes and module aliases.

Pure ``onnx`` protobuf work, no onnxruntime. Imported only inside the extractor's methods, so that
listing plugins never imports ``onnx``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from dataclasses import dataclass

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
    """Element type and dims of a value info (``int`` fixed, ``str`` symbolic, ``None`` unknown)."""
    if not vi.type.HasField("tensor_type"):
        return TensorType(0, None)
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return TensorType(tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
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


def module_scopes(node: onnx.NodeProto, *, torchscript_names: bool) -> list[str]:
    """Full module paths (outermost first) a node was exported from, or [] if unknown.

    - dynamo exporter (``torch.onnx.export(dynamo=True)``, default in torch >= 2.9): node metadata
      ``pkg.torch.onnx.name_scopes`` = ``['', 'features', 'features.0', 'conv2d']`` (root, modules,
      fx node), or the older ``namespace`` = ``": Net/features: Sequential/features.0: Conv2d/conv2d: aten..."``.
    - TorchScript exporter (``dynamo=False``): node name ``/features/features.0/Conv`` or
      ``/layer1/layer1.0/conv1/Conv`` (a child's local name under its parent). A module called twice
      appears as ``/act/...`` and ``/act_1/...``; the suffixed name is kept as it is.
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
    if scopes is None and torchscript_names and node.name.startswith("/"):
        scopes = node.name.split("/")
    # root first ('' = the top module), the op or fx node last; anything else is not a module path
    if not scopes or len(scopes) < 3 or scopes[0] != "":
        return []
    paths: list[str] = []
    for s in scopes[1:-1]:
        if not s:
            continue
        # exporters write either the full path ("layer1.0") or the local name ("conv1")
        full = s if ("." in s or not paths) else f"{paths[-1]}.{s}"
        if full not in paths:
            paths.append(full)
    return paths


def module_aliases(model: onnx.ModelProto, listed: set[str], const: set[str]) -> dict[str, tuple[str, ...]]:
    """``{tensor name: module names}``: each module name goes to the first output of the *last* node
    (in graph order) exported from that module, if that output is a listed float tensor.

    For a module called several times that is its last call, which is what a PyTorch forward hook
    leaves behind when it keeps the latest output.
    """
    torchscript_names = model.producer_name == "pytorch"
    last: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        outs = [o for o in node.output if o]
        if not outs or all(o in const for o in outs):
            continue  # Constant nodes and weight arithmetic carry scopes too, but are not module outputs
        for path in module_scopes(node, torchscript_names=torchscript_names):
            last[path] = node
    aliases: dict[str, list[str]] = {}
    for path, node in last.items():
        out = node.output[0]
        if out in listed and path != out:
            aliases.setdefault(out, []).append(path)
    return {t: tuple(sorted(names, key=lambda p: (p.count("."), p))) for t, names in aliases.items()}


# --- the listing -----------------------------------------------------------------------------------------


def list_layers(model: onnx.ModelProto, batch_axis: int = 0) -> list[LayerInfo]:
    """Every float tensor computed by a node, in graph order, with op type, shape and aliases.

    Skipped: initializers, Constant outputs and tensors computable from constants only, graph inputs, and
    tensors of a known non-float type. Tensors inside If/Loop/Scan bodies are listed with
    ``exposable=False``.
    """
    types = infer_types(model)
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
