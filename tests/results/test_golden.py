"""Every release must read the golden results of every earlier result format version, unchanged.

The expected values are written out here from docs/results.md's description of the golden result, not
taken from tests/data/make_result_golden.py, so a change to either shows.
"""

from __future__ import annotations

import csv
import json
import math
import os

import h5py
import numpy as np
import pytest

from cka_offline.results import load_result

from ..data import make_result_golden

DATA = os.path.dirname(make_result_golden.__file__)
LAYERS = [["/block/conv.0/Relu_output_0", "fc"], ["b0", "b1, constant", "b2"], ["c0"]]
NAN = 3  # stacked index of the constant layer "b1, constant"


FILE_OF = [0, 0, 1, 1, 1, 2]  # the file of each stacked layer


def expected(name: str, version: str = "1_0") -> np.ndarray:
    """The 6 x 6 matrix ``name`` of the golden result of ``version``: from 1.4 (``params.all_pairs`` false)
    the off-diagonal entries within a file are NaN, not computed."""
    out = np.empty((6, 6))
    for r in range(6):
        for c in range(6):
            cka = 1.0 if r == c else (r + c + 1) / 16
            se = (1 + abs(r - c)) / 256
            out[r, c] = {"cka": cka, "se": se, "low": cka - 2 * se, "high": cka + 2 * se}[name]
            if version >= "1_4" and r != c and FILE_OF[r] == FILE_OF[c]:
                out[r, c] = np.nan
    out[NAN, :] = out[:, NAN] = np.nan
    return out


def golden(ext: str) -> str:
    return os.path.join(DATA, f"result_v1_0.{ext}")


def test_the_golden_files_are_small():
    for ext in ("json", "h5", "csv"):
        assert os.path.getsize(golden(ext)) < 10_000
        assert os.path.getsize(make_result_golden.golden_path(ext)) < 16_000


@pytest.mark.parametrize("version", ["1_0", "1_1", "1_2", "1_3", "1_4"])
@pytest.mark.parametrize("ext", ["json", "h5", "csv"])
def test_every_released_golden_loads_with_its_values(version, ext):
    r = load_result(os.path.join(DATA, f"result_v{version}.{ext}"))
    assert [f.layers for f in r.files] == LAYERS and r.pairs == [(0, 1), (0, 2), (1, 2)]
    # 1.3 adds each layer's display alias (file A's first layer only); older results and CSVs have none
    first = "block.conv.0" if version >= "1_3" and ext != "csv" else ""
    assert [f.aliases for f in r.files] == [[first, ""], ["", "", ""], [""]]
    assert r.files[0].display_layers == [first or LAYERS[0][0], "fc"]
    np.testing.assert_array_equal(r.pair(0, 1).cka, expected("cka")[0:2, 2:5])
    np.testing.assert_array_equal(r.pair(1, 2).high, expected("high")[2:5, 5:6])
    if ext != "csv":
        assert r.params.get("shuffle") == (None if version == "1_0" else "blocks")
        # 1.4 records whether the within-file blocks were computed; older results computed every entry
        assert r.params.get("all_pairs", True) is (version < "1_4")
        for name in ("cka", "se", "low", "high"):
            np.testing.assert_array_equal(getattr(r, name), expected(name, version))


@pytest.mark.parametrize("ext", ["json", "h5"])
def test_golden_v1_0_full_formats_load_with_their_values(ext):
    r = load_result(golden(ext))
    assert [f.label for f in r.files] == ["a.h5", "b.h5", "c.h5"]
    assert [f.layers for f in r.files] == LAYERS
    assert r.pairs == [(0, 1), (0, 2), (1, 2)]
    for name in ("cka", "se", "low", "high"):
        np.testing.assert_array_equal(getattr(r, name), expected(name))
    assert r.files[1].paths == ["/data/b.0.h5", "/data/b.1.h5"] and r.files[1].sha256 == ["b" * 64, "c" * 64]
    assert r.files[0].provenance == {
        "model": "/models/net_a.onnx",
        "extractor": "onnx",
        "options": {"reduction": "mean"},
    }
    assert [f.n_examples for f in r.files] == [40, 36, 32] and r.files[2].sha256 == [""]
    assert (r.n_examples, r.n_minibatches, r.confidence, r.version) == (32, 8, 0.9, "0.1.0")
    assert r.timing == {"total": 1.5, "read_wait": 0.25, "compute": 1.0, "hash_wait": 0.125}
    assert r.params["seed"] == 7 and r.params["rbf_fraction"] is None and r.params["intersect"] is True
    assert r.warnings == ["layer 'b1, constant' of b.h5 is constant over the examples, so its CKA is undefined (NaN)"]
    np.testing.assert_array_equal(r.pair(1, 2).cka, [[0.5], [np.nan], [0.625]])


def test_golden_v1_0_csv_loads_with_its_values():
    r = load_result(golden("csv"))
    assert [f.label for f in r.files] == ["a.h5", "b.h5", "c.h5"]
    assert [f.layers for f in r.files] == LAYERS
    assert r.pairs == [(0, 1), (0, 2), (1, 2)]
    reported = np.zeros((6, 6), dtype=bool)
    reported[0:2, 2:5] = reported[0:2, 5:6] = reported[2:5, 5:6] = True  # the blocks of the three pairs
    for name in ("cka", "se", "low", "high"):
        values = getattr(r, name)
        np.testing.assert_array_equal(values[reported], expected(name)[reported])
        assert np.all(np.isnan(values[~reported]))  # blocks the CSV does not hold
    assert r.files[0].provenance == {} and r.params == {}  # numbers and names only


def test_golden_v1_0_reads_with_plain_libraries():
    """The walk-through of docs/results.md: the files hold what the spec says, without our reader."""
    doc = json.load(open(golden("json"), encoding="utf-8"))
    assert (doc["format"], doc["format_version"]) == ("cka-offline-result", "1.0")
    cka = np.array(doc["cka"], dtype=float)
    np.testing.assert_array_equal(cka, expected("cka"))
    with h5py.File(golden("h5"), "r") as f:
        assert dict(f.attrs)["format_version"] == "1.0"
        meta = json.loads(f.attrs["meta"])
        assert meta == {k: v for k, v in doc.items() if k not in ("cka", "se", "low", "high")}
        for name in ("cka", "se", "low", "high"):
            assert f[name].dtype == np.float64
            np.testing.assert_array_equal(f[name][()], expected(name))
    rows = list(csv.DictReader(open(golden("csv"), newline="", encoding="utf-8")))
    assert len(rows) == 2 * 3 + 2 * 1 + 3 * 1
    assert rows[1] == {
        "file_a": "a.h5",
        "layer_a": "/block/conv.0/Relu_output_0",
        "file_b": "b.h5",
        "layer_b": "b1, constant",
        "cka": "",
        "se": "",
        "low": "",
        "high": "",
    }
    last = rows[-1]
    assert (last["file_a"], last["layer_a"], last["file_b"], last["layer_b"]) == ("b.h5", "b2", "c.h5", "c0")
    assert float(last["cka"]) == expected("cka")[4, 5] and not math.isnan(float(last["high"]))


@pytest.mark.parametrize("ext", ["json", "csv"])
def test_the_writer_still_writes_the_golden_bytes(tmp_path, ext):
    """Saving the golden result reproduces the current version's golden text files byte for byte."""
    path = make_result_golden.golden_result().save(tmp_path / f"r.{ext}")
    assert open(path, "rb").read() == open(make_result_golden.golden_path(ext), "rb").read()


@pytest.mark.parametrize("ext", ["json", "h5"])
def test_the_current_golden_files_load_with_their_values(ext):
    r = load_result(make_result_golden.golden_path(ext))
    for name in ("cka", "se", "low", "high"):
        np.testing.assert_array_equal(getattr(r, name), expected(name, make_result_golden.VERSION))
    assert r.params["shuffle"] == "blocks" and r.params["n_groups"] == 4


def test_the_walk_through_in_docs_results_runs_on_the_golden_files(tmp_path, monkeypatch, capsys):
    doc = open(os.path.join(DATA, "..", "..", "docs", "results.md"), encoding="utf-8").read()
    code = doc.split("## Reading a result without cka-offline", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for ext in ("json", "h5", "csv"):
        (tmp_path / f"result.{ext}").write_bytes(open(golden(ext), "rb").read())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/results.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["a.h5 vs b.h5 (2, 3)", "a.h5 vs c.h5 (2, 1)", "b.h5 vs c.h5 (3, 1)"]


def test_the_v1_2_h5_opens_in_xarray_with_layer_names():
    """1.2: dimension scales, so a netCDF reader names the axes after the layers (no phony_dim_0)."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    names = [name for layers in LAYERS for name in layers]
    with xr.open_dataset(os.path.join(DATA, "result_v1_2.h5"), engine="h5netcdf") as ds:
        assert dict(ds.sizes) == {"layer_a": 6, "layer_b": 6}
        assert list(ds.layer_a.values) == names and list(ds.layer_b.values) == names
        assert list(ds.file_a.values) == ["a.h5"] * 2 + ["b.h5"] * 3 + ["c.h5"]
        assert set(ds.data_vars) == {"cka", "se", "low", "high"}
        for name in ("cka", "se", "low", "high"):
            assert ds[name].dims == ("layer_a", "layer_b")
            np.testing.assert_array_equal(ds[name].values, expected(name))
        assert float(ds.cka.sel(layer_a="fc", layer_b="c0")) == expected("cka")[1, 5]
        assert ds.attrs["format_version"] == "1.2"


def test_the_pandas_walk_through_in_docs_results_runs_on_the_golden_files(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    doc = open(os.path.join(DATA, "..", "..", "docs", "results.md"), encoding="utf-8").read()
    code = doc.split("## Reading a result with pandas or xarray", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for ext in ("json", "h5", "csv"):
        (tmp_path / f"result.{ext}").write_bytes(open(make_result_golden.golden_path(ext), "rb").read())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/results.md", "exec"), scope)
    np.testing.assert_array_equal(scope["block"].values, expected("cka")[0:2, 2:5])
    np.testing.assert_array_equal(scope["cka"].loc[("a.h5", "fc"), ("b.h5", "b2")], expected("cka")[1, 4])
    assert len(scope["frame"]) == 11 and pd.isna(scope["frame"].cka[1])
    assert list(scope["frame"].layer_a[:3]) == ["/block/conv.0/Relu_output_0"] * 3
