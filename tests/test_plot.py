"""plot_heatmap: files written for small and 100-layer results, formats, and no eager matplotlib import."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from cka_offline.errors import OutputError
from cka_offline.plot import plot_heatmap
from cka_offline.results import CKAResult, FileInfo


def result_with(n_a: int, n_b: int) -> CKAResult:
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
    return CKAResult(files=files, cka=cka, se=cka * 0, low=cka, high=cka, pairs=[(0, 1)], n_examples=50)


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("n_a,n_b", [(3, 4), (100, 100)])
def test_png_written(tmp_path, n_a, n_b):
    path = plot_heatmap(result_with(n_a, n_b), tmp_path / "cka.png", dpi=50)
    width, height = png_size(path)
    assert width > 200 and height > 200
    if n_a == 100:
        assert height >= 16 * 50 * 0.9  # the figure grows with the layer count
    assert [p.name for p in tmp_path.iterdir()] == ["cka.png"]  # no temporary left behind


def test_pdf_svg_annotations_and_self_pair(tmp_path):
    r = result_with(3, 3)
    assert open(plot_heatmap(r, tmp_path / "c.pdf", annotate=True), "rb").read(4) == b"%PDF"
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
