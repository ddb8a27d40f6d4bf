"""select_layers: names, globs, kind:, aliases, and the errors a person sees."""

from __future__ import annotations

import pytest

from cka_offline.errors import LayerSelectionError
from cka_offline.extractor import LayerInfo
from cka_offline.selection import select_layers

LAYERS = [
    LayerInfo("/conv1/Conv_output_0", "Conv", aliases=("conv1",)),
    LayerInfo("/relu/Relu_output_0", "Relu", aliases=("relu",)),
    LayerInfo("/layer1/conv/Conv_output_0", "Conv", aliases=("layer1.conv",)),
    LayerInfo("/layer1/relu/Relu_output_0", "Relu", aliases=("layer1.relu",)),
    LayerInfo("/if/then/Relu_output_0", "Relu", exposable=False, reason="inside an If subgraph"),
    LayerInfo("/fc/Gemm_output_0", "Gemm", aliases=("fc",)),
]


def test_all_exposable_by_default():
    assert select_layers(LAYERS, None) == [i.name for i in LAYERS if i.exposable]
    assert select_layers(["a", "b"], []) == ["a", "b"]


def test_names_aliases_globs_kinds_in_model_order():
    assert select_layers(LAYERS, ["fc", "conv1"]) == ["/conv1/Conv_output_0", "/fc/Gemm_output_0"]
    assert select_layers(LAYERS, ["layer1.*"]) == ["/layer1/conv/Conv_output_0", "/layer1/relu/Relu_output_0"]
    # kind:Relu skips the layer that cannot be extracted; overlapping patterns give no duplicates
    assert select_layers(LAYERS, ["kind:Relu", "relu"]) == ["/relu/Relu_output_0", "/layer1/relu/Relu_output_0"]
    assert select_layers(LAYERS, ["kind:G*"]) == ["/fc/Gemm_output_0"]
    assert select_layers(LAYERS, ["/fc/Gemm_output_0"]) == ["/fc/Gemm_output_0"]
    assert select_layers(["enc.0", "enc.1", "head"], ["enc.?"]) == ["enc.0", "enc.1"]


def test_not_exposable_quotes_reason():
    with pytest.raises(
        LayerSelectionError, match="'/if/then/Relu_output_0'.*cannot be extracted: inside an If subgraph"
    ):
        select_layers(LAYERS, ["/if/then/Relu_output_0"])
    with pytest.raises(LayerSelectionError, match="selected by '/if/\\*'.*inside an If subgraph"):
        select_layers(LAYERS, ["/if/*"])


def test_no_match_lists_close_names():
    with pytest.raises(
        LayerSelectionError, match="no layer matches 'layer1.reul' in m.onnx; close matches: layer1.relu.*\\(see it\\)"
    ):
        select_layers(LAYERS, ["layer1.reul"], where="m.onnx", hint="see it")
    with pytest.raises(LayerSelectionError, match="no layer matches 'zzz' in the model; 6 layers, for example"):
        select_layers(LAYERS, ["zzz"])
    with pytest.raises(LayerSelectionError, match="no layer matches 'x' in the model; it has no layers"):
        select_layers([], ["x"])
    with pytest.raises(LayerSelectionError, match="no layer of kind 'relu'.*close to it: Relu"):
        select_layers(LAYERS, ["kind:relu"])
    with pytest.raises(LayerSelectionError, match="no layer of kind 'Softmax'.*kinds present: Conv, Gemm, Relu"):
        select_layers(LAYERS, ["kind:Softmax"])
    with pytest.raises(LayerSelectionError, match="no column matches 'q'"):
        select_layers(["a"], ["q"], what="column")


def test_ambiguous_alias():
    layers = [LayerInfo("a", aliases=("block",)), LayerInfo("b", aliases=("block",))]
    with pytest.raises(LayerSelectionError, match="alias 'block' names several layers in the model: a, b"):
        select_layers(layers, ["block"])
