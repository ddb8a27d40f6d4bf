import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from cka_offline.cli.inspect import inspect

from ..store.conftest import make_layers, write_file


def test_inspect_prints_version_provenance_and_layers(tmp_path):
    arrays = make_layers(12)
    path = write_file(
        tmp_path / "a.h5", arrays, provenance={"model": "pkg.mod:make", "extractor": "torch", "model_sha256": "ab" * 32}
    )
    result = CliRunner().invoke(inspect, [path])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cka-offline-activations 1.0" in out
    assert "12 (ids: int64, 0 .. 11)" in out
    assert "pkg.mod:make  (sha256 abababababababab...)" in out
    assert "layers (3):" in out
    line = next(l for l in out.splitlines() if "/conv1/Conv_output_0" in l)
    assert line.split()[2:] == ["12x12", "12", "float32", "none"]


def test_inspect_json(tmp_path):
    arrays = make_layers(6)
    path = write_file(tmp_path / "a.h5", arrays, ids=np.array(list("abcdef")))
    result = CliRunner().invoke(inspect, [path, "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["n_examples"] == 6 and info["ids"] == {"dtype": "str", "first": "a", "last": "f"}
    assert [layer["name"] for layer in info["layers"]] == list(arrays)
    assert info["layers"][1]["stored_shape"] == [6, 8]


def test_inspect_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    result = CliRunner().invoke(inspect, [str(bad)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-inspect: error: ") and "bad.h5" in lines[0]


def test_help_does_not_import_heavy_modules():
    code = "import sys, cka_offline.cli.inspect as m; assert not {'torch','h5py','onnxruntime'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
