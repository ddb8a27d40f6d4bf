"""CKAResult as pandas DataFrames and xarray Datasets; the CSV keeps file order; a clear error without pandas."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cka_offline.results import CKAResult, FileInfo, load_result

pd = pytest.importorskip("pandas")
xr = pytest.importorskip("xarray")

#: layer names out of alphabetical order, so a sort anywhere would show
LAYERS_A = ["z.conv", "a.relu", "m.fc"]
LAYERS_B = ["y0", "b1"]


def value(r: int, c: int) -> float:
    """The stacked element [r, c] of the test result: every element different."""
    return 1.0 if r == c else (r + 10 * c + 1) / 128


def make() -> CKAResult:
    size = 5
    cka = np.array([[value(r, c) for c in range(size)] for r in range(size)])
    cka[4, 0] = np.nan
    files = [
        FileInfo("a.h5", layers=list(LAYERS_A), provenance={"model": "/m/net_a.onnx"}),
        FileInfo("b.h5", layers=list(LAYERS_B)),
    ]
    params = {
        "kernel": "rbf",
        "estimator": "minibatch",
        "batch_size": 8,
        "intersect": True,
        "rbf_fraction": 0.5,
        "bandwidths": {"a.h5": {"z.conv": 1.0}},
    }
    return CKAResult(
        files=files,
        cka=cka,
        se=cka / 10,
        low=cka - 1,
        high=cka + 1,
        pairs=[(0, 1)],
        params=params,
        n_examples=40,
        n_minibatches=5,
    )


def test_to_pandas_wide_rows_of_a_columns_of_b_in_file_order():
    df = make().to_pandas(0, 1)
    assert list(df.index) == LAYERS_A and list(df.columns) == LAYERS_B
    assert (df.index.name, df.columns.name) == ("a.h5", "b.h5")
    assert df.loc["a.relu", "b1"] == value(1, 4)
    assert df.loc["z.conv", "y0"] == value(0, 3)
    se = make().to_pandas(0, 1, matrix="se")
    assert se.loc["m.fc", "y0"] == value(2, 3) / 10
    back = make().to_pandas(1, 0)  # the transpose block
    assert list(back.index) == LAYERS_B and list(back.columns) == LAYERS_A
    assert np.isnan(back.loc["b1", "z.conv"])
    with pytest.raises(ValueError, match="unknown matrix 'p'; expected one of cka, se, low, high"):
        make().to_pandas(0, 1, matrix="p")


def test_to_pandas_long_and_to_frame_match_the_csv(tmp_path):
    r = make()
    long = r.to_pandas(0, 1, long=True)
    assert list(long.columns) == ["file_a", "layer_a", "file_b", "layer_b", "cka", "se", "low", "high"]
    assert list(zip(long.layer_a, long.layer_b)) == [(a, b) for a in LAYERS_A for b in LAYERS_B]
    row = long.iloc[3]  # a.relu x b1
    assert (row.file_a, row.layer_a, row.file_b, row.layer_b) == ("a.h5", "a.relu", "b.h5", "b1")
    assert (row.cka, row.se, row.low, row.high) == (value(1, 4), value(1, 4) / 10, value(1, 4) - 1, value(1, 4) + 1)
    path = r.save(tmp_path / "r.csv")
    from_csv = pd.read_csv(path, keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(from_csv, r.to_frame())
    pd.testing.assert_frame_equal(long, r.to_frame())  # one reported pair


def test_the_csv_keeps_file_order(tmp_path):
    path = make().save(tmp_path / "r.csv")
    lines = open(path, encoding="utf-8").read().splitlines()[1:]
    assert [line.split(",")[1] for line in lines] == [a for a in LAYERS_A for _ in LAYERS_B]
    assert [line.split(",")[3] for line in lines] == LAYERS_B * 3
    back = load_result(path)
    assert [f.layers for f in back.files] == [LAYERS_A, LAYERS_B]
    assert list(back.to_pandas(0, 1).index) == LAYERS_A


def test_to_xarray_pair_and_stacked(tmp_path):
    r = make()
    ds = r.to_xarray(0, 1)
    assert ds.cka.dims == ("layer_a", "layer_b")
    assert list(ds.layer_a.values) == LAYERS_A and list(ds.layer_b.values) == LAYERS_B
    assert float(ds.cka.sel(layer_a="a.relu", layer_b="b1")) == value(1, 4)
    assert float(ds.high.sel(layer_a="m.fc", layer_b="y0")) == value(2, 3) + 1
    assert ds.attrs["file_a"] == "a.h5" and ds.attrs["model_a"] == "net_a.onnx" and ds.attrs["model_b"] == "b.h5"
    assert ds.attrs["kernel"] == "rbf" and ds.attrs["intersect"] == 1 and ds.attrs["n_examples"] == 40
    assert ds.attrs["bandwidths"] == '{"a.h5": {"z.conv": 1.0}}'
    stacked = r.to_xarray(stacked=True)
    assert list(stacked.layer_a.values) == LAYERS_A + LAYERS_B
    assert list(stacked.file_b.values) == ["a.h5"] * 3 + ["b.h5"] * 2
    np.testing.assert_array_equal(stacked.cka.values, r.cka)
    pytest.importorskip("h5netcdf")
    with xr.open_dataset(r.save(tmp_path / "r.h5"), engine="h5netcdf") as saved:  # the file shows the same
        for name in ("layer_a", "layer_b", "file_a", "file_b", "cka", "se", "low", "high"):
            np.testing.assert_array_equal(saved[name].values, stacked[name].values)


def test_a_missing_pandas_or_xarray_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match=r"to_pandas needs pandas, which is not installed: pip install pandas"):
        make().to_pandas(0, 1)
    with pytest.raises(ImportError, match=r"to_frame needs pandas.*cka-offline\[frames\]"):
        make().to_frame()
    with pytest.raises(ImportError, match=r"to_xarray needs xarray, which is not installed: pip install xarray"):
        make().to_xarray()


def test_importing_the_package_does_not_import_pandas():
    import subprocess

    code = "import sys, cka_offline.results; assert not {'pandas', 'xarray'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
