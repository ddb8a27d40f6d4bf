"""Display aliases: the name a layer was selected by (an ONNX tensor's PyTorch module), stored in the
activation file (format 1.1 ``alias``), carried into the result (1.3 ``aliases``) and shown on the heatmap,
in the summary, by ``cka-inspect`` and as an xarray coordinate; the names stay the keys."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cka_offline import analyze, extract, load_result
from cka_offline.errors import FormatError
from cka_offline.extraction import display_aliases
from cka_offline.extractor import LayerInfo
from cka_offline.plot import plot_heatmap
from cka_offline.results import FileInfo
from cka_offline.store.reader import open_activations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data")
BIN = os.path.dirname(sys.executable)  # the installed commands of this environment


def _cli(prog: str, *args: str) -> str:
    run = subprocess.run([os.path.join(BIN, prog), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _aliases(path: str) -> list[tuple[str, str]]:
    with open_activations(path) as f:
        return [(m.name, m.alias) for m in f.layers]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo's networks on 24 digits: B (ONNX) through the installed cka-extract, by module names and
    by tensor names; A (torch) through the Python API."""
    out = tmp_path_factory.mktemp("aliases")
    common = ["--inputs", os.path.join(SAMPLE, "digits.npz"), "--max-examples", "24", "--quiet"]
    onnx = os.path.join(SAMPLE, "cnn_b.onnx")
    by_module, by_tensor = str(out / "b.h5"), str(out / "b_tensors.h5")
    _cli("cka-extract", onnx, "--layers", "conv1,fc1", "-o", by_module, *common)
    _cli("cka-extract", onnx, "--layers", "/conv1/Conv_output_0,logits", "-o", by_tensor, *common)
    torch_file = extract(
        os.path.join(SAMPLE, "digits_cnn.py") + ":make_model",
        os.path.join(SAMPLE, "digits.npz"),
        out / "a.h5",
        layers=["conv1", "fc1"],
        options={"weights": os.path.join(SAMPLE, "cnn_a.safetensors")},
        max_examples=24,
    )
    return {"a": str(torch_file), "b": by_module, "b_tensors": by_tensor}


def test_onnx_layers_chosen_by_module_name_store_that_name(demo_files):
    assert _aliases(demo_files["b"]) == [("/conv1/Conv_output_0", "conv1"), ("/fc1/Gemm_output_0", "fc1")]
    text = _cli("cka-inspect", demo_files["b"])
    assert "  name                  alias  stored shape" in text
    assert "/conv1/Conv_output_0  conv1  24x1024" in text


def test_onnx_layers_chosen_by_tensor_name_store_their_first_alias(demo_files):
    assert _aliases(demo_files["b_tensors"]) == [("/conv1/Conv_output_0", "conv1"), ("logits", "fc2")]


def test_a_torch_model_stores_no_alias(demo_files):
    assert _aliases(demo_files["a"]) == [("conv1", ""), ("fc1", "")]
    header = next(line for line in _cli("cka-inspect", demo_files["a"]).splitlines() if "stored shape" in line)
    assert header.split() == ["#", "name", "stored", "shape", "original", "shape", "dtype", "reduction"]  # no alias


def test_the_result_carries_shows_and_round_trips_the_aliases(demo_files, tmp_path):
    r = analyze([demo_files["a"], demo_files["b"]], batch_size=8, device="cpu", progress=False)
    assert [f.aliases for f in r.files] == [["", ""], ["conv1", "fc1"]]
    assert r.files[1].layers == ["/conv1/Conv_output_0", "/fc1/Gemm_output_0"]  # names stay the keys
    for ext in ("json", "h5"):
        back = load_result(r.save(tmp_path / f"r.{ext}"))
        assert [f.aliases for f in back.files] == [["", ""], ["conv1", "fc1"]], ext
    doc = json.load(open(tmp_path / "r.json", encoding="utf-8"))
    assert doc["format_version"] == "1.4" and doc["files"][1]["aliases"] == ["conv1", "fc1"]
    assert [f.aliases for f in load_result(r.save(tmp_path / "r.csv")).files] == [["", ""], ["", ""]]  # CSV: none

    fig = plot_heatmap(r)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "fc1"]  # B's aliases
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "fc1"]  # A's names
    ax = plot_heatmap(r, labels={"/fc1/Gemm_output_0": "dense"}).axes[0]  # explicit labels win, the rest default
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "dense"]
    ax = plot_heatmap(r, labels=(["x", "y"], ["u", "v"])).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["u", "v"]

    summary = r.summary()
    assert re.search(r"^  conv1 +conv1 +\d", summary, flags=re.M) and "Conv_output_0" not in summary

    pytest.importorskip("pandas")
    assert list(r.to_pandas(0, 1).columns) == ["/conv1/Conv_output_0", "/fc1/Gemm_output_0"]
    pytest.importorskip("xarray")
    ds = r.to_xarray(0, 1)
    assert list(ds.layer_b.values) == ["/conv1/Conv_output_0", "/fc1/Gemm_output_0"]
    assert list(ds.alias_b.values) == ["conv1", "fc1"] and list(ds.alias_a.values) == ["", ""]


def test_display_alias_rules():
    infos = [
        LayerInfo("/enc/Relu_output_0", aliases=("enc", "dec")),  # one tensor, two module names
        LayerInfo("/fc/Gemm_output_0", aliases=("fc",)),
        LayerInfo("block:1", group="block"),  # call 1 of a module run twice
        LayerInfo("head"),
    ]
    assert display_aliases(infos, ["dec", "**"]) == {  # the alias a pattern named wins over the first
        "/enc/Relu_output_0": "dec",
        "/fc/Gemm_output_0": "fc",
        "block:1": "",  # a module's calls keep their call names
        "head": "",
    }
    assert display_aliases(infos, None)["/enc/Relu_output_0"] == "enc"  # all layers: the first alias


def test_display_layers_fall_back_to_names_and_aliases_must_fit(tmp_path):
    f = FileInfo("a.h5", layers=["x", "y", "z"], aliases=["same", "same", "zed"])
    assert f.display_layers == ["x", "y", "zed"]  # two layers would look alike: their names
    assert FileInfo("b.h5", layers=["x", "y"]).aliases == ["", ""]
    with pytest.raises(ValueError, match="a.h5: 1 aliases for 2 layers"):
        FileInfo("a.h5", layers=["x", "y"], aliases=["x"])
    from tests.data import make_result_golden

    doc = json.load(open(make_result_golden.golden_path("json"), encoding="utf-8"))
    doc["files"][0]["aliases"] = ["only one"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"bad\.json is not a readable cka-offline result .*1 aliases for 2 layers"):
        load_result(tmp_path / "bad.json")


def test_in_memory_activations_have_no_aliases():
    rng = np.random.default_rng(0)
    r = analyze([{"x": rng.normal(size=(16, 3)), "y": rng.normal(size=(16, 2))}], batch_size=8, progress=False)
    assert r.files[0].aliases == ["", ""] and r.files[0].display_layers == ["x", "y"]


def test_cka_analyze_selects_layers_by_their_stored_alias(demo_files, tmp_path):
    """An ONNX file's layers are picked in cka-analyze by the module names they were extracted by, as in
    cka-extract (B holds /conv1/Conv_output_0 and logits, aliases conv1 and fc2): --layers-b conv1 selects
    the tensor; a name that is neither a layer nor an alias still fails, naming the file."""
    out = tmp_path / "r.json"
    _cli("cka-analyze", demo_files["a"], demo_files["b_tensors"], "--layers-b", "conv1", "-o", str(out), "-q")
    doc = json.loads(out.read_text())
    assert doc["files"][1]["layers"] == ["/conv1/Conv_output_0"] and doc["files"][1]["aliases"] == ["conv1"]
    run = subprocess.run(
        [os.path.join(BIN, "cka-analyze"), demo_files["a"], demo_files["b_tensors"], "--layers-b", "conv9"],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "conv9" in run.stderr and "b_tensors.h5" in run.stderr
    assert run.stderr.count("\n") == 1
