"""CKAResult: blocks, summary, layer identification, and round trips through .h5 / .json / .csv."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cka_offline.errors import FormatError, OutputError
from cka_offline.results import CKAResult, FileInfo, layer_identification, load_result, result_format


def make_result(layers_a=("conv1", "layer/1.relu", "fc"), layers_b=("c1", "c2", "c3"), seed=0) -> CKAResult:
    rng = np.random.default_rng(seed)
    size = len(layers_a) + len(layers_b)
    cka = rng.uniform(0.1, 0.9, size=(size, size))
    cka = (cka + cka.T) / 2
    np.fill_diagonal(cka, 1.0)
    se = np.full((size, size), 0.01)
    cka[1, :] = cka[:, 1] = np.nan  # a constant layer
    se[1, :] = se[:, 1] = np.nan
    files = [
        FileInfo("a.h5", ["/data/a.h5"], list(layers_a), {"model": "/models/resnet_a.onnx", "framework": "onnx"},
                 ["0" * 64], 100),
        FileInfo("b.h5", ["/data/b.h5"], list(layers_b), {"model": "resnet_b"}, ["1" * 64], 120),
    ]
    return CKAResult(
        files=files, cka=cka, se=se, low=cka - 0.02, high=cka + 0.02, pairs=[(0, 1)],
        params={"batch_size": 32, "epochs": 1, "seed": 0, "kernel": "linear", "estimator": "minibatch",
                "bandwidths": None, "ratio": float("nan")},
        n_examples=100, n_minibatches=4, timing={"total": 1.5}, warnings=["layer 'layer/1.relu' of a.h5 is constant"],
        version="0.1.0",
    )


def assert_same(r1: CKAResult, r2: CKAResult, *, metadata: bool = True) -> None:
    for name in ("cka", "se", "low", "high"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name))
    assert [f.label for f in r1.files] == [f.label for f in r2.files]
    assert [f.layers for f in r1.files] == [f.layers for f in r2.files]
    assert r1.pairs == r2.pairs
    if metadata:
        assert r1.files == r2.files
        assert r1.warnings == r2.warnings and r1.version == r2.version and r1.timing == r2.timing
        assert r1.n_examples == r2.n_examples and r1.n_minibatches == r2.n_minibatches
        assert r1.params["batch_size"] == r2.params["batch_size"]


@pytest.mark.parametrize("ext", [".h5", ".json"])
def test_round_trip_full_formats(tmp_path, ext):
    r = make_result()
    path = r.save(tmp_path / f"result{ext}")
    back = load_result(path)
    assert_same(r, back)
    assert back.params["ratio"] is None  # NaN parameters become null


def test_json_writes_nan_as_null(tmp_path):
    path = make_result().save(tmp_path / "r.json")
    doc = json.loads(open(path).read())  # strict JSON: would fail on a bare NaN
    assert doc["cka"][1][0] is None and doc["cka"][0][0] == 1.0
    assert doc["files"][0]["provenance"]["model"] == "/models/resnet_a.onnx"
    assert doc["format"] == "cka-offline-result"


def test_csv_long_format_and_round_trip(tmp_path):
    r = make_result()
    path = r.save(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 9
    assert list(rows[0]) == ["file_a", "layer_a", "file_b", "layer_b", "cka", "se", "low", "high"]
    assert rows[1]["layer_a"] == "conv1" and rows[1]["layer_b"] == "c2"
    assert float(rows[1]["cka"]) == r.cka[0, 4]
    assert rows[3]["layer_a"] == "layer/1.relu" and rows[3]["cka"] == ""  # NaN is an empty field
    back = load_result(path)
    np.testing.assert_array_equal(back.matrix(0, 1), r.matrix(0, 1))
    np.testing.assert_array_equal(back.pair(0, 1).se, r.pair(0, 1).se)
    assert [f.layers for f in back.files] == [f.layers for f in r.files]
    assert np.all(np.isnan(back.matrix(0, 0)))  # the CSV holds only the reported pair


def test_self_comparison_csv_round_trip(tmp_path):
    r = make_result()
    one = CKAResult(files=r.files[:1], cka=r.cka[:3, :3], se=r.se[:3, :3], low=r.low[:3, :3], high=r.high[:3, :3],
                    pairs=[(0, 0)])
    back = load_result(one.save(tmp_path / "self.csv"))
    assert_same(one, back, metadata=False)


def test_format_option_and_errors(tmp_path):
    r = make_result()
    path = r.save(tmp_path / "result.dat", format="json")
    assert load_result(path, format="json").n_examples == 100
    assert result_format("x.HDF5") == "h5"
    with pytest.raises(OutputError, match="cannot tell the result format of '.*x.txt' from its extension '.txt'; use .h5, .json or .csv"):
        r.save(tmp_path / "x.txt")
    with pytest.raises(OutputError, match="unknown result format 'xml'"):
        r.save(tmp_path / "x.xml", format="xml")
    with pytest.raises(OutputError, match="already exists"):
        r.save(path, format="json", overwrite=False)
    with pytest.raises(OutputError, match="folder .* does not exist"):
        r.save(tmp_path / "missing" / "r.json")
    with pytest.raises(FormatError, match="not found"):
        load_result(tmp_path / "nope.json")
    with pytest.raises(FormatError, match="cannot tell the result format"):
        load_result(tmp_path / "nope.txt")


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something"}')
    with pytest.raises(FormatError, match="not a cka-offline result"):
        load_result(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a readable cka-offline result"):
        load_result(tmp_path / "y.json")
    (tmp_path / "z.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FormatError, match="expected the header"):
        load_result(tmp_path / "z.csv")
    header = "file_a,layer_a,file_b,layer_b,cka,se,low,high\n"
    (tmp_path / "w.csv").write_text(header + "a,x,b,y,0.5\n")
    with pytest.raises(FormatError, match="line 2: expected 8 fields, got 5"):
        load_result(tmp_path / "w.csv")
    (tmp_path / "v.csv").write_text(header + "a,x,b,y,high,,,\n")
    with pytest.raises(FormatError, match="line 2: cka is not a number: 'high'"):
        load_result(tmp_path / "v.csv")
    import h5py

    with h5py.File(tmp_path / "o.h5", "w") as h:
        h.attrs["format"] = "cka-offline-activations"
    with pytest.raises(FormatError, match="HDF5 file but not a cka-offline result"):
        load_result(tmp_path / "o.h5")
    doc = make_result().to_dict()
    doc["format_version"] = "2.0"
    (tmp_path / "future.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="format version 2.0.*upgrade"):
        load_result(tmp_path / "future.json")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    r = make_result()

    def broken(path):
        with open(path, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk died")

    monkeypatch.setattr(r, "_write_json", broken)
    with pytest.raises(RuntimeError, match="disk died"):
        r.save(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_shape_check_and_pair_range():
    r = make_result()
    with pytest.raises(ValueError, match=r"cka must have shape \(6, 6\)"):
        CKAResult(files=r.files, cka=np.zeros((5, 5)), se=r.se, low=r.low, high=r.high, pairs=[(0, 1)])
    with pytest.raises(IndexError, match=r"file pair \(0, 2\) out of range"):
        r.pair(0, 2)
    assert r.pair(1).i == 1 and r.pair(1).j == 0
    np.testing.assert_array_equal(r.matrix(1, 0), r.matrix(0, 1).T)


def test_summary_best_match_and_layer_identification():
    names = ["l0", "l1", "l2", "l3"]
    block = np.array(
        [[0.9, 0.2, 0.1, 0.0],
         [0.3, 0.4, 0.8, 0.1],   # best at depth 2: within one, not same
         [0.1, 0.2, 0.7, 0.3],
         [0.9, 0.1, 0.2, 0.3]],  # best at depth 0: neither
    )
    size = 8
    cka = np.eye(size)
    cka[:4, 4:] = block
    cka[4:, :4] = block.T
    files = [FileInfo("a.h5", layers=names, provenance={"model": "net_a"}), FileInfo("b.h5", layers=list(names))]
    r = CKAResult(files=files, cka=cka, se=np.zeros((size, size)), low=cka - 0.05, high=cka + 0.05, pairs=[(0, 1)],
                  params={"kernel": "linear", "estimator": "minibatch", "batch_size": 8, "epochs": 1, "seed": 0},
                  n_examples=40, n_minibatches=5)
    assert layer_identification(r.pair(0, 1)) == (2, 3, 4)
    text = r.summary()
    assert "A = a.h5 (net_a)" in text and "B = b.h5" in text
    assert "l1          l2                0.800  [0.750, 0.850]" in text
    assert "2/4 layers of A match the B layer at the same depth, 3/4 within one layer" in text
    assert "5 minibatches of 8 examples (batch size 8)" in text
    assert layer_identification(r.pair(0, 0)) is None  # a file against itself


def test_summary_many_pairs_and_nan_rows():
    r = make_result()
    text = r.summary()
    assert "layer/1.relu" in text and "undefined: constant layer" in text
    assert "warnings:\n  - layer 'layer/1.relu' of a.h5 is constant" in text
    assert "1/2 layers of A" not in text  # the NaN row is left out: 2 defined layers
    files = [FileInfo(f"c{k}.h5", layers=["x", "y"]) for k in range(4)]
    size = 8
    many = CKAResult(files=files, cka=np.eye(size), se=np.zeros((size, size)), low=np.eye(size), high=np.eye(size),
                     pairs=[(i, j) for i in range(4) for j in range(i + 1, 4)])
    text = many.summary(max_detailed_pairs=2)
    assert text.count("A = ") == 2
    assert "c1.h5 vs c3.h5: 0.000; 1/2 same depth, 2/2 within one" in text
