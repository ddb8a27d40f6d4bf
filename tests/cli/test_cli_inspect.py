import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from cka_offline.cli.inspect import inspect
from cka_offline.errors import FormatError
from cka_offline.results import schema as result_schema
from cka_offline.store import schema

from ..store.conftest import make_layers, write_file


def test_inspect_prints_version_provenance_and_layers(tmp_path):
    arrays = make_layers(12)
    path = write_file(
        tmp_path / "a.h5", arrays, provenance={"model": "pkg.mod:make", "extractor": "torch", "model_sha256": "ab" * 32}
    )
    result = CliRunner().invoke(inspect, [path])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"cka-offline-activations {schema.FORMAT_VERSION}" in out
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
    assert result.exit_code == FormatError.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-inspect: error: ") and "bad.h5" in lines[0]


def test_help_does_not_import_heavy_modules():
    code = "import sys, cka_offline.cli.inspect as m; assert not {'torch','h5py','onnxruntime'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _golden(ext: str) -> str:
    from ..data import make_result_golden

    return make_result_golden.golden_path(ext)


def test_inspect_shows_a_saved_result():
    for ext in ("h5", "json"):
        result = CliRunner().invoke(inspect, [_golden(ext)])
        assert result.exit_code == 0, result.output
        out = result.output
        assert f"cka-offline-result {result_schema.FORMAT_VERSION} (computed by cka-offline 0.1.0)" in out
        assert "0  a.h5: 2 layers, 40 examples stored  model /models/net_a.onnx" in out
        assert "pairs:      0-1, 0-2, 1-2" in out
        assert "    seed           7" in out and "    shuffle        blocks" in out
        assert "CKA (linear kernel, minibatch estimator), 32 examples" in out  # the summary
        assert "A = a.h5 (net_a.onnx)" in out
        assert "  block.conv.0  b2" in out  # 1.3: file A's first layer shows as its display alias
    out = CliRunner().invoke(inspect, [_golden("csv")]).output
    assert "cka-offline-result (csv: not recorded)" in out and "b1, constant" in out
    info = json.loads(CliRunner().invoke(inspect, [_golden("json"), "--json"]).output)
    assert info["format_version"] == result_schema.FORMAT_VERSION and info["params"]["batch_size"] == 8
    assert [f["layers"] for f in info["files"]][1] == ["b0", "b1, constant", "b2"] and "cka" not in info


def test_inspect_a_damaged_result_is_one_line_error(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"format": "cka-offline-result", "format_version": "9.0"}')
    result = CliRunner().invoke(inspect, [str(bad)])
    assert result.exit_code == FormatError.exit_code != 0  # a data error's exit code (docs/reliability.md)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-inspect: error: ") and "format version 9.0" in lines[0]


def test_a_per_layer_reduction_map_is_summarised_and_json_keeps_it(tmp_path):
    arrays = make_layers(6)
    reductions = {f"block{k}": "token_mean" for k in range(100)} | {"pooler": "none"}
    options = json.dumps({"dtype": "float32", "reduction": reductions})
    path = write_file(tmp_path / "a.h5", arrays, provenance={"options": options})
    text = CliRunner().invoke(inspect, [path]).output
    line = next(l for l in text.splitlines() if l.strip().startswith("options"))
    assert '"reduction": "per layer (below): token_mean x100, none x1"' in line and len(line) < 200
    info = json.loads(CliRunner().invoke(inspect, [path, "--json"]).output)
    assert json.loads(info["provenance"]["options"])["reduction"] == reductions
