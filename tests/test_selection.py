"""select_layers: names, globs, kind:, aliases, and the errors a person sees."""

from __future__ import annotations

import pytest

from cka_offline.errors import LayerSelectionError
from cka_offline.extractor import LayerInfo
from cka_offline.selection import call_name, glob_matches, match_layers, select_layers, split_call

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


RESNET = [  # a torchvision ResNet's names, each block's twice-called relu as one layer per call
    LayerInfo("conv1", "Conv2d"),
    LayerInfo("layer1", "Sequential"),
    LayerInfo("layer1.0", "BasicBlock"),
    LayerInfo("layer1.0.conv1", "Conv2d"),
    LayerInfo("layer1.0.relu:1", "ReLU", group="layer1.0.relu", aliases=("layer1.0.act:1",)),
    LayerInfo("layer1.0.relu:2", "ReLU", group="layer1.0.relu", aliases=("layer1.0.act:2",)),
    LayerInfo("layer2", "Sequential"),
    LayerInfo("layer2.0.downsample.0", "Conv2d"),
    LayerInfo("fc", "Linear"),
]


def test_star_stays_within_one_component_and_double_star_crosses():
    assert select_layers(RESNET, ["layer*"]) == ["layer1", "layer2"]
    assert select_layers(RESNET, ["layer1.*"]) == ["layer1.0"]
    assert select_layers(RESNET, ["layer1.**"]) == [
        "layer1.0",
        "layer1.0.conv1",
        "layer1.0.relu:1",
        "layer1.0.relu:2",
    ]
    assert select_layers(RESNET, ["**.conv1"]) == ["conv1", "layer1.0.conv1"]
    assert select_layers(RESNET, ["layer?.*.downsample.*"]) == ["layer2.0.downsample.0"]
    assert select_layers(RESNET, ["layer[!1]"]) == ["layer2"]
    encoder = [f"encoder.layer.{i}{sub}" for i in range(2) for sub in ("", ".attention", ".attention.self.query")]
    assert select_layers(encoder, ["encoder.layer.*"]) == ["encoder.layer.0", "encoder.layer.1"]


def test_a_module_name_selects_each_of_its_calls():
    assert select_layers(RESNET, ["layer1.0.relu"]) == ["layer1.0.relu:1", "layer1.0.relu:2"]
    assert select_layers(RESNET, ["layer1.0.relu:2"]) == ["layer1.0.relu:2"]
    assert select_layers(RESNET, ["layer1.*.relu"]) == ["layer1.0.relu:1", "layer1.0.relu:2"]
    assert select_layers(RESNET, ["layer1.0.act:1"]) == ["layer1.0.relu:1"]  # a call's alias
    assert select_layers(RESNET, ["kind:ReLU"]) == ["layer1.0.relu:1", "layer1.0.relu:2"]
    assert match_layers("layer1.0.relu", RESNET) == ["layer1.0.relu:1", "layer1.0.relu:2"]
    # plain names (an activation file's layers): NAME:N is call N of NAME
    assert select_layers(["relu:1", "relu:2", "fc"], ["relu"]) == ["relu:1", "relu:2"]
    assert select_layers(["x:0", "fc"], ["x:0"]) == ["x:0"]
    assert split_call("layer1.0.relu:2") == ("layer1.0.relu", 2) and split_call("x:0") is None
    assert split_call(call_name("a.b", 3)) == ("a.b", 3)


def test_a_star_that_would_have_crossed_dots_says_how_to_cross():
    with pytest.raises(LayerSelectionError, match=r"no layer matches '\*conv\*'.*use '\*\*' to cross dots"):
        select_layers(["features.conv1", "features.conv2"], ["*conv*"])
    assert glob_matches("features.conv1", "**conv*") and not glob_matches("features.conv1", "*conv*")
