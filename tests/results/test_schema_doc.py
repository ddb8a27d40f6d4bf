"""docs/results.md and results/schema.py must name the same keys, and the writers write exactly those."""

from __future__ import annotations

import os
import re

import h5py

from cka_offline.results import io as result_io
from cka_offline.results import schema

from ..data import make_result_golden

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results.md")


def _section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading of any level."""
    text = open(DOC, encoding="utf-8").read()
    assert title in text, f"docs/results.md has no heading {title!r}"
    return re.split(r"\n#{2,3} ", text.split(title + "\n", 1)[1], maxsplit=1)[0]


def _rows(title: str) -> list[list[str]]:
    """The table rows under ``title`` whose first cell is a `key`: the cells, the key without backticks."""
    out = []
    for line in _section(title).splitlines():
        match = re.match(r"^\| `/?([a-z_0-9]+)` \|(.*)\|$", line)
        if match:
            out.append([match.group(1), *(cell.strip() for cell in match.group(2).split("|"))])
    return out


def _keys(title: str, column: int | None = None, value: str | None = None) -> set[str]:
    return {row[0] for row in _rows(title) if column is None or row[column] == value}


def test_document_keys_match():
    title = "## The result document"
    assert _keys(title) == set(schema.REQUIRED_KEYS) | set(schema.OPTIONAL_KEYS) | set(schema.MATRICES)
    assert _keys(title, 2, "MUST") == set(schema.REQUIRED_KEYS)
    assert _keys(title, 2, "MUST in JSON") == set(schema.MATRICES)
    assert _keys(title, 2, "SHOULD") == set(schema.OPTIONAL_KEYS)


def test_file_keys_match():
    title = "### An entry of `files`"
    assert _keys(title) == set(schema.REQUIRED_FILE_KEYS) | set(schema.OPTIONAL_FILE_KEYS)
    assert _keys(title, 2, "MUST") == set(schema.REQUIRED_FILE_KEYS)


def test_params_timing_and_matrices_match():
    assert _keys("### `params`") == set(schema.PARAM_KEYS)
    assert _keys("### `timing`") == set(schema.TIMING_KEYS)
    assert [row[0] for row in _rows("## Numbers and NaN")] == list(schema.MATRICES)


def test_hdf5_and_csv_match():
    assert _keys("## HDF5", 1, "root attribute") == set(schema.H5_ROOT_ATTRS)
    assert [row[0] for row in _rows("## HDF5") if row[1] == "dataset"] == list(schema.H5_DATASETS)
    coordinates = [row[0] for row in _rows("## HDF5") if row[1] in ("dimension scale", "coordinate")]
    assert coordinates == list(schema.H5_COORDINATES)
    assert [row[0] for row in _rows("## HDF5") if row[1] == "matrix attribute"] == [schema.H5_ATTR_COORDINATES]
    assert tuple(row[0] for row in _rows("## CSV")) == schema.CSV_COLUMNS  # order matters: it is the header


def test_names_version_and_extensions_match():
    text = open(DOC, encoding="utf-8").read()
    assert f"# The result format, version {schema.FORMAT_VERSION}\n" in text
    assert text.count(f"exactly `{schema.FORMAT_NAME}`") == 2  # the document and the HDF5 attribute
    assert f"this document: `{schema.FORMAT_VERSION}`" in text
    for ext in schema.EXTENSIONS:
        assert f"`{ext}`" in text
    version = schema.FORMAT_VERSION.replace(".", "_")
    for fmt in schema.FORMATS:
        assert f"`result_v{version}.{fmt}`" in text


def test_the_writers_write_the_schema_keys(tmp_path):
    result = make_result_golden.golden_result()
    doc = result_io.result_document(result)
    assert set(doc) == set(schema.REQUIRED_KEYS) | set(schema.OPTIONAL_KEYS) | set(schema.MATRICES)
    for entry in doc[schema.KEY_FILES]:
        assert set(entry) == set(schema.REQUIRED_FILE_KEYS) | set(schema.OPTIONAL_FILE_KEYS)
    assert set(doc[schema.KEY_PARAMS]) <= set(schema.PARAM_KEYS)
    assert set(doc[schema.KEY_TIMING]) == set(schema.TIMING_KEYS)
    with h5py.File(result.save(tmp_path / "r.h5"), "r") as h5:
        assert set(h5.attrs) == set(schema.H5_ROOT_ATTRS)
        assert set(h5) == set(schema.H5_DATASETS) | set(schema.H5_COORDINATES)
        for name in schema.H5_DATASETS:
            assert set(h5[name].attrs) == {schema.H5_ATTR_COORDINATES, "DIMENSION_LIST"}


def test_an_analysis_records_only_documented_params_and_timings(tmp_path):
    """What analyze() records is in the spec (the golden activation file against itself, both estimators)."""
    from cka_offline.analysis import analyze

    from ..data import make_golden

    acts = os.path.join(os.path.dirname(make_golden.__file__), "golden_v1_0.h5")
    for choices in ({"batch_size": 8, "kernel": "rbf"}, {"estimator": "full"}):
        result = analyze([acts], device="cpu", **choices)
        doc = result_io.result_document(result)
        assert set(doc[schema.KEY_PARAMS]) <= set(schema.PARAM_KEYS), choices
        assert set(doc[schema.KEY_TIMING]) <= set(schema.TIMING_KEYS), choices
        assert isinstance(doc[schema.KEY_PARAMS]["device"], str)
        result.save(tmp_path / "r.json")  # strict JSON: every recorded value is JSON-able
