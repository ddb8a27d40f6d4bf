"""`-r PATTERN=REDUCTION` patterns match what `--layers` matches (cka_offline.selection), aliases included."""

from __future__ import annotations

import pytest

from cka_offline.errors import LayerSelectionError
from cka_offline.extractor import LayerInfo
from cka_offline.reduce import resolve_reductions

LAYERS = [
    LayerInfo("/conv1/Conv_output_0", "Conv", (4, 8, 8), ("conv1",)),
    LayerInfo("/layer1/Relu_output_0", "Relu", (4, 8, 8), ("layer1",)),
    LayerInfo("/fc/Gemm_output_0", "Gemm", (10,), ("fc",)),
    LayerInfo("/unselected/Add_output_0", "Add", (3,), ("extra",)),
]
SELECTED = ["/conv1/Conv_output_0", "/layer1/Relu_output_0", "/fc/Gemm_output_0"]


def resolved(reduction):
    return resolve_reductions(reduction, [info for info in LAYERS if info.name in SELECTED])


def test_aliases_kinds_and_globs():
    assert resolved({"fc": "none", "*": "mean"}) == {
        "/conv1/Conv_output_0": "mean",
        "/layer1/Relu_output_0": "mean",
        "/fc/Gemm_output_0": "none",
    }
    assert resolved({"kind:Relu": "mean", "fc": "none"})["/layer1/Relu_output_0"] == "mean"
    assert resolved({"conv*": "mean"})["/conv1/Conv_output_0"] == "mean"  # a glob over aliases
    assert resolved({"conv*": "mean"})["/fc/Gemm_output_0"] == "flatten"  # no match: the default
    assert set(resolved("none").values()) == {"none"}


def test_an_exact_name_wins_over_an_earlier_glob():
    got = resolved({"/*": "mean", "fc": "none", "*": "flatten"})
    assert got["/fc/Gemm_output_0"] == "none" and got["/conv1/Conv_output_0"] == "mean"


@pytest.mark.parametrize("pattern", ["fcc", "extra", "kind:Softmax"])
def test_a_pattern_matching_no_selected_layer_is_an_error(pattern):
    with pytest.raises(LayerSelectionError, match=rf"reduction given for '{pattern}', which matches no selected layer"):
        resolved({pattern: "none"})
