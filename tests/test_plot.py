"""plot_heatmap: the Figure returned, drawing into an axis, labels and titles, files written for small and
100-layer results, formats, the older call, and no eager matplotlib import."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from cka_offline.errors import OutputError
from cka_offline.plot import plot_heatmap
from cka_offline.results import CKAResult, FileInfo


def result_with(n_a: int, n_b: int, **extra) -> CKAResult:
    size = n_a + n_b
    cka = np.random.default_rng(0).uniform(0, 1, (size, size))
    cka[2, :] = cka[:, 2] = np.nan
    files = [
        FileInfo(
            "a.h5",
            layers=[f"encoder.layer.{k}.attention.output.dense" for k in range(n_a)],
            provenance={"model": "/models/bert.onnx"},
        ),
        FileInfo("b.h5", layers=[f"b{k}" for k in range(n_b)]),
    ]
    return CKAResult(files=files, cka=cka, se=cka * 0, low=cka, high=cka, pairs=[(0, 1)], n_examples=50, **extra)


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("n_a,n_b", [(3, 4), (100, 100)])
def test_png_written(tmp_path, n_a, n_b):
    path = tmp_path / "cka.png"
    fig = plot_heatmap(result_with(n_a, n_b), path=path, dpi=50)
    assert type(fig).__name__ == "Figure"
    width, height = png_size(path)
    assert width > 200 and height > 200
    if n_a == 100:
        assert height >= 16 * 50 * 0.9  # the figure grows with the layer count
    assert [p.name for p in tmp_path.iterdir()] == ["cka.png"]  # no temporary left behind


def test_pdf_svg_annotations_and_self_pair(tmp_path):
    r = result_with(3, 3)
    plot_heatmap(r, tmp_path / "c.pdf", annotate=True)
    assert open(tmp_path / "c.pdf", "rb").read(4) == b"%PDF"
    # the older call, as cka-analyze makes it: pair= and a path, returning the path
    svg = open(plot_heatmap(r, tmp_path / "c.svg", pair=(1, 1), annotate=True)).read()
    assert "<svg" in svg
    plain = open(plot_heatmap(r, tmp_path / "d.svg", pair=(1, 1), annotate=False)).read()
    assert len(svg) > len(plain)  # the nine annotations add text


def test_bad_extension(tmp_path):
    with pytest.raises(OutputError, match=r"cannot tell the plot format of .*c.jpg.*use .png, .pdf or .svg"):
        plot_heatmap(result_with(3, 3), tmp_path / "c.jpg")
    assert list(tmp_path.iterdir()) == []


def test_import_is_lazy():
    code = "import sys, cka_offline.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tick_labels_keep_the_part_that_differs():
    from cka_offline.plot import tick_labels

    names = [f"encoder.layer.{k}.attention.output.dense" for k in (0, 11)]
    assert tick_labels(names) == ["…0.attention.output.dense", "…11.attention.output.dense"]
    assert tick_labels(["conv1", "fc"]) == ["conv1", "fc"]
    assert len(tick_labels(["x" * 80])[0]) == 32
    names = [f"transformer.encoder.layer_{k}.attention.output" for k in range(1, 13)]
    assert (
        tick_labels(names)[0] == "…layer_1.attention.output" and tick_labels(names)[-1] == "…layer_12.attention.output"
    )


def test_returns_the_figure_and_writes_nothing_without_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"kernel": "rbf", "estimator": "minibatch", "batch_size": 16}
    fig = plot_heatmap(result_with(3, 4, params=params, n_minibatches=12))
    assert list(tmp_path.iterdir()) == []
    heat = fig.axes[0]
    assert heat.get_images()[0].get_array().shape == (3, 4)
    assert (
        heat.get_title() == "bert.onnx vs b.h5\nrbf CKA, minibatch estimator, n = 50 examples, m = 16 (12 minibatches)"
    )
    assert [t.get_text() for t in heat.get_xticklabels()] == ["b0", "b1", "b2", "b3"]
    assert heat.get_ylabel() == "A: bert.onnx (a.h5)" and heat.get_xlabel() == "B: b.h5"
    self_fig = plot_heatmap(result_with(3, 4, params={"estimator": "full"}), i=1, j=1)
    assert (
        self_fig.axes[0].get_title() == "b.h5 (layers against each other)\nlinear CKA, full estimator, n = 50 examples"
    )
    assert self_fig.axes[0].get_images()[0].get_array().shape == (4, 4)


def test_draws_into_a_given_axis(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    left, right = fig.subplots(1, 2)
    out = plot_heatmap(result_with(3, 4), ax=right, path=tmp_path / "both.svg")
    assert out is fig and fig.get_size_inches().tolist() == [8, 4]
    assert not left.get_images() and right.get_images()[0].get_array().shape == (3, 4)
    assert "<svg" in open(tmp_path / "both.svg").read()
    sub = fig.subfigures(1, 1)  # a subfigure's axis: the root figure comes back
    assert plot_heatmap(result_with(3, 4), ax=sub.subplots()) is fig


def test_display_labels():
    r = result_with(3, 2)
    ticks = lambda fig, axis: [t.get_text() for t in getattr(fig.axes[0], f"get_{axis}ticklabels")()]  # noqa: E731
    fig = plot_heatmap(r, labels={"encoder.layer.1.attention.output.dense": "attn1", "b1": "B one"})
    assert ticks(fig, "y")[1] == "attn1" and ticks(fig, "x") == ["b0", "B one"]
    assert ticks(fig, "y")[0] == "encoder.layer.0…ion.output.dense"  # names the mapping lacks stay (shortened)
    fig = plot_heatmap(r, labels=(["x", "y", "z"], ["p", "q"]))
    assert ticks(fig, "y") == ["x", "y", "z"] and ticks(fig, "x") == ["p", "q"]
    fig = plot_heatmap(r, i=0, j=0, labels=["x", "y", "z"])  # one sequence for both axes
    assert ticks(fig, "y") == ticks(fig, "x") == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"labels: expected 2 labels for the columns \(the layers b0, b1\), got 3"):
        plot_heatmap(r, labels=["x", "y", "z"])
    long = [f"transformer.encoder.layer_{k}.attention.output" for k in range(1, 13)]
    r12 = CKAResult(
        files=[FileInfo("a.h5", layers=long), FileInfo("b.h5", layers=list(long))],
        cka=np.eye(24),
        se=np.eye(24),
        low=np.eye(24),
        high=np.eye(24),
        pairs=[(0, 1)],
    )
    assert ticks(plot_heatmap(r12), "x")[11] == "…layer_12.attention.output"
