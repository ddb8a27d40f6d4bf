"""Saving and loading results: round trips through .h5 / .json / .csv, format choice, and every refusal."""

from __future__ import annotations

import csv
import json
import re

import h5py
import numpy as np
import pytest

from cka_offline.errors import FormatError, OutputError
from cka_offline.results import CKAResult, load_result, result_format
from cka_offline.results import io as result_io

from .builders import assert_same, make_result


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
    one = CKAResult(
        files=r.files[:1], cka=r.cka[:3, :3], se=r.se[:3, :3], low=r.low[:3, :3], high=r.high[:3, :3], pairs=[(0, 0)]
    )
    back = load_result(one.save(tmp_path / "self.csv"))
    assert_same(one, back, metadata=False)


def test_csv_columns_a_later_minor_appends_are_ignored(tmp_path):
    r = make_result()
    rows = list(csv.reader(open(r.save(tmp_path / "r.csv"), newline="")))
    with open(tmp_path / "later.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0] + ["p_value"]] + [row + ["0.5"] for row in rows[1:]])
    back = load_result(tmp_path / "later.csv")
    np.testing.assert_array_equal(back.matrix(0, 1), r.matrix(0, 1))


def test_format_option_and_errors(tmp_path):
    r = make_result()
    path = r.save(tmp_path / "result.dat", format="json")
    assert load_result(path, format="json").n_examples == 100
    assert result_format("x.HDF5") == "h5" and result_format("x", "HDF5") == "h5"
    with pytest.raises(
        OutputError,
        match="cannot tell the result format of '.*x.txt' from its extension '.txt'; use .h5, .json or .csv",
    ):
        r.save(tmp_path / "x.txt")
    with pytest.raises(OutputError, match="unknown result format 'xml'"):
        r.save(tmp_path / "x.xml", format="xml")
    with pytest.raises(OutputError, match="already exists; pass --overwrite to replace it or choose another name"):
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
    with h5py.File(tmp_path / "o.h5", "w") as h:
        h.attrs["format"] = "cka-offline-activations"
    with pytest.raises(FormatError, match="HDF5 file but not a cka-offline result"):
        load_result(tmp_path / "o.h5")


def test_load_rejects_a_document_without_a_matrix(tmp_path):
    doc = make_result().to_dict()
    del doc["se"]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"r\.json is not a complete cka-offline result: matrix se missing"):
        load_result(tmp_path / "r.json")


def test_load_rejects_a_pair_outside_the_files(tmp_path):
    doc = make_result().to_dict()
    doc["pairs"] = [[0, 2]]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"pair \(0, 2\) names a file the result does not have: it has 2 file"):
        load_result(tmp_path / "r.json")


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_refuses_an_unknown_major_json(tmp_path, version):
    doc = make_result().to_dict()
    doc["format_version"] = version
    (tmp_path / "future.json").write_text(json.dumps(doc))
    major = version.split(".")[0]
    with pytest.raises(
        FormatError,
        match=rf"format version {version}; this release reads 1\.x -- upgrade "
        rf"cka-offline to a release that reads format {major}\.x",
    ):
        load_result(tmp_path / "future.json")


def test_refuses_an_unknown_major_h5(tmp_path):
    path = make_result().save(tmp_path / "r.h5")
    with h5py.File(path, "a") as h:
        h.attrs["format_version"] = "3.1"
    with pytest.raises(FormatError, match=r"format version 3\.1; this release reads 1\.x -- upgrade cka-offline"):
        load_result(path)


def test_refuses_a_version_that_is_not_major_minor(tmp_path):
    doc = make_result().to_dict()
    doc["format_version"] = "one"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"result format_version 'one' is not MAJOR\.MINOR .*damaged"):
        load_result(tmp_path / "bad.json")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def broken(result):
        raise RuntimeError("encoder died")

    monkeypatch.setitem(result_io.ENCODERS, "json", broken)
    with pytest.raises(RuntimeError, match="encoder died"):
        make_result().save(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["h5", "json", "csv"])
def test_a_failing_write_leaves_nothing_and_says_the_disk_is_full(tmp_path, monkeypatch, fmt):
    """The lowest layer of a save, the write of the file's bytes, fails as on a full disk (ENOSPC): one
    OutputError naming the file and the space needed, and nothing under the target or a temporary name.
    (A real full file system and a real file size limit: tests/hardening/test_analyze_outputs.py.)"""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return Full(fh) if "w" in mode and ".partial" in str(path) else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    target = tmp_path / f"r.{fmt}"
    with pytest.raises(OutputError, match=rf"^{re.escape(str(target))}: the disk is full \(.* free in .*, .* needed\)"):
        make_result().save(target)
    assert list(tmp_path.iterdir()) == []


def test_files_are_built_in_memory_and_read_back(tmp_path):
    """Every format's bytes are the file: written as they are, they load back to the same result."""
    r = make_result()
    for fmt, encode in result_io.ENCODERS.items():
        path = tmp_path / f"r.{fmt}"
        path.write_bytes(encode(r))
        back = load_result(path)
        if fmt == "csv":  # numbers and names of the reported pairs only
            for i, j in r.pairs:
                np.testing.assert_array_equal(back.pair(i, j).cka, r.pair(i, j).cka)
        else:
            assert_same(r, back)


def test_saving_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "r.json").mkdir()
    with pytest.raises(OutputError, match="r.json is a folder; give a file name"):
        make_result().save(tmp_path / "r.json")
