"""cka-extract through click's CliRunner with the example plugin; one subprocess test of the real script."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cka_offline.cli.common import ProgressBar, parse_key_values, parse_value, split_list
from cka_offline.cli.extract import _extractor_options, _reduction, main
from cka_offline.errors import ModelError
from cka_offline.hookspecs import hookimpl
from cka_offline.registry import get_plugin_manager
from cka_offline.store.reader import open_activations

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "example_plugin")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLE_DIR)
    import cka_offline_example

    return cka_offline_example


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(6)
    w1, w2 = rng.normal(size=(3, 5)), rng.normal(size=(5, 2))
    spec = {
        "layers": [
            {"name": "fc1", "weight": w1.tolist(), "bias": [0.0] * 5},
            {"name": "fc2", "weight": w2.tolist(), "bias": [0.0] * 2},
        ]
    }
    (tmp_path / "m.mlp.json").write_text(json.dumps(spec))
    x = rng.normal(size=(9, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    return {
        "model": str(tmp_path / "m.mlp.json"),
        "inputs": str(tmp_path / "in.npz"),
        "x": x,
        "w1": w1,
        "out": str(tmp_path / "out.h5"),
    }


def invoke(pm, args):
    return CliRunner().invoke(main, args, obj={"plugin_manager": pm})


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_extraction(example, files):
    pm = get_plugin_manager(entry_points=False, plugins=[example])
    r = invoke(
        pm,
        [
            files["model"],
            "-i",
            files["inputs"],
            "-o",
            files["out"],
            "--layers",
            "fc1",
            "-b",
            "4",
            "-X",
            "dtype=float64",
            "--dtype",
            "float16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {files['out']}" in r.stderr
    with open_activations(files["out"]) as f:
        assert f.layer_names == ["fc1"]
        ref = np.maximum(files["x"] @ files["w1"], 0)
        np.testing.assert_allclose(f.read("fc1", 0, 9), ref, rtol=1e-3, atol=1e-3)
        assert json.loads(f.provenance["options"])["extractor_options"] == {"dtype": "float64"}
        assert f.provenance["command"] == "cka-extract " + " ".join(
            [
                files["model"],
                "-i",
                files["inputs"],
                "-o",
                files["out"],
                "--layers",
                "fc1",
                "-b",
                "4",
                "-X",
                "dtype=float64",
                "--dtype",
                "float16",
            ]
        )
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["out"]])
    assert r.exit_code == 3
    assert (
        error_line(r)
        == f"cka-extract: error: {files['out']} already exists; pass --overwrite to replace it or choose another -o"
    )


def test_bad_input_is_one_line_and_debug_shows_traceback(example, files, tmp_path):
    pm = get_plugin_manager(entry_points=False, plugins=[example])
    args = [files["model"], "-i", str(tmp_path / "missing.npz"), "-o", files["out"]]
    r = invoke(pm, args)
    assert r.exit_code == 3
    assert error_line(r).startswith("cka-extract: error: inputs ") and "missing.npz not found" in r.stderr
    r = invoke(pm, [*args, "--debug"])
    assert r.exit_code == 3 and "Traceback" in r.stderr
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["out"], "--layers", "fc3"])
    assert r.exit_code == 3 and "close matches: fc2, fc1 (list them with cka-extract --list-layers)" in error_line(r)
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["out"], "--shard", "4/4"])
    assert r.exit_code == 2 and "I must be 0..K-1" in r.stderr
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["out"], "--shard", "2of4"])
    assert r.exit_code == 2 and "'2of4' is not I/K" in r.stderr
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["out"], "--shard", "1/2", "-q"])
    assert r.exit_code == 0
    with open_activations(files["out"], allow_lone_shard=True) as f:
        np.testing.assert_array_equal(f.ids, np.arange(4, 9))
    r = invoke(pm, [files["model"], "-i", files["inputs"]])
    assert r.exit_code == 2 and "give the output file with -o" in r.stderr
    r = invoke(pm, [files["model"], "--device", "gpu", "-o", files["out"]])
    assert r.exit_code == 2 and "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps" in r.stderr


class Broken:
    @hookimpl
    def cka_extractors(self):
        raise ImportError("needs libfoo")


def test_list_extractors(example):
    pm = get_plugin_manager(entry_points=False, plugins=[example, Broken()])
    r = invoke(pm, ["--list-extractors"])
    assert r.exit_code == 0, r.output
    assert "example-mlp" in r.stdout and "*.mlp.json" in r.stdout and "npz" in r.stdout
    assert "broken plugins (not loaded):" in r.stdout and "ImportError: needs libfoo" in r.stdout

    class Twin(example.MLPExtractor):
        pass

    class TwinPlugin:
        @hookimpl
        def cka_extractors(self):
            return [Twin]

    r = invoke(get_plugin_manager(entry_points=False, plugins=[example, TwinPlugin()]), ["--list-extractors"])
    assert r.exit_code == 3 and "named 'example-mlp'" in error_line(r)


def test_list_layers(example, files, tmp_path):
    pm = get_plugin_manager(entry_points=False, plugins=[example])
    r = invoke(pm, [files["model"], "--list-layers"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split() == ["LAYER", "KIND", "SHAPE", "ALIASES"]
    assert r.stdout.splitlines()[1].split() == ["fc1", "Linear", "(5)"]
    r = invoke(pm, [str(tmp_path / "nothing.mlp.json"), "--list-layers"])
    assert r.exit_code == ModelError.exit_code and "cannot load MLP" in error_line(r)
    r = invoke(pm, [])
    assert r.exit_code == 2 and "give a MODEL" in r.stderr


def test_interrupt_keeps_partial_file(example, files):
    class Interrupting(example.MLPExtractor):
        name = "interrupting"
        calls = 0

        def run(self, inputs, layers):
            type(self).calls += 1
            if type(self).calls == 3:
                raise KeyboardInterrupt
            return super().run(inputs, layers)

    class Plugin:
        @hookimpl
        def cka_extractors(self):
            return [Interrupting]

    pm = get_plugin_manager(entry_points=False, plugins=[Plugin()])
    args = [files["model"], "-i", files["inputs"], "-o", files["out"], "-b", "2", "-q"]
    r = invoke(pm, args)
    assert r.exit_code == 130
    assert (
        error_line(r)
        == f"cka-extract: interrupted; the partial file {files['out']}.partial was kept: run the same command with --resume to continue"
    )
    partial = files["out"] + ".partial"
    with open(partial, "rb") as fh:
        kept = fh.read()
    r = invoke(pm, args)  # the same command again, without --resume: the interrupted rows are not thrown away
    assert r.exit_code == 3
    assert error_line(r) == (
        f"cka-extract: error: {partial} holds an interrupted extraction (4 of 9 rows written); run the same "
        "command with --resume to continue it, or with --overwrite to delete it and start over"
    )
    with open(partial, "rb") as fh:
        assert fh.read() == kept
    r = invoke(pm, [*args, "--resume"])
    assert r.exit_code == 0 and r.stderr == ""
    with open_activations(files["out"]) as f:
        assert f.n_examples == 9
    assert sorted(os.listdir(os.path.dirname(files["out"]))) == ["in.npz", "m.mlp.json", "out.h5"]


def test_unusable_outputs_are_refused_before_any_work(example, files, tmp_path):
    """Reserved names, a folder, a missing folder: one line before the model is even looked at (the model
    here does not exist), and nothing is created."""
    pm = get_plugin_manager(entry_points=False, plugins=[example])
    before = sorted(os.listdir(tmp_path))
    cases = {
        str(tmp_path / "x.h5.partial"): "x.h5.partial: output names may not end in '.partial', which names "
        "unfinished activation files; choose another -o",
        str(tmp_path / "x.h5.lock"): "x.h5.lock: output names may not end in '.lock', which names the lock file "
        "of a running writer; choose another -o",
        str(tmp_path): f"{tmp_path} is a folder; give a file name inside it, such as {tmp_path / 'acts.h5'}",
        str(tmp_path / "no" / "x.h5"): f"x.h5: folder {tmp_path / 'no'} does not exist; create it first",
    }
    for out, message in cases.items():
        r = invoke(pm, [str(tmp_path / "missing.mlp.json"), "-i", files["inputs"], "-o", out])
        assert r.exit_code == 3, r.stderr
        line = error_line(r)
        assert line.startswith("cka-extract: error: ") and line.endswith(message), line
    assert sorted(os.listdir(tmp_path)) == before
    with open(files["inputs"], "rb") as fh:
        inputs = fh.read()
    r = invoke(pm, [files["model"], "-i", files["inputs"], "-o", files["inputs"], "--overwrite"])
    assert r.exit_code == 3
    assert error_line(r) == (
        f"cka-extract: error: {files['inputs']} is this run's inputs ({files['inputs']}); writing the activations "
        "there would replace it: choose another -o"
    )
    with open(files["inputs"], "rb") as fh:
        assert fh.read() == inputs


def test_option_parsing():
    assert parse_key_values(["a=1", "b=x", "c=[1, 2]", "d=true", "e=1.5e3", "f=-2", "g=a=b"], "-X") == {
        "a": 1,
        "b": "x",
        "c": [1, 2],
        "d": True,
        "e": 1500.0,
        "f": -2,
        "g": "a=b",
    }
    assert parse_value("1x") == "1x" and parse_value("") == ""
    assert split_list(["a,b", " c ", ""]) == ["a", "b", "c"]
    assert _reduction(()) == "flatten" and _reduction(("mean",)) == "mean"
    assert _reduction(("token_mean", "enc.*=mean")) == {"enc.*": "mean", "*": "token_mean"}

    def flags(
        option=(),
        model_arg=(),
        weights=None,
        output_index=None,
        allow_pickle_code_execution=False,
        batch_axis=None,
        onnx_optimization=None,
    ):
        return _extractor_options(dict(locals()))

    opts = flags(("weights=old",), ("num_classes=10",), "w.pt", "1", True, 0, "basic")
    assert opts == {
        "weights": "w.pt",
        "model_args": {"num_classes": 10},
        "output_index": 1,
        "allow_pickle_code_execution": True,
        "batch_axis": 0,
        "optimization_level": "basic",
    }
    assert flags(output_index="logits") == {"output_index": "logits"}
    r = CliRunner().invoke(main, ["m.onnx", "-X", "novalue"], obj={})
    assert r.exit_code == 2 and "'novalue' is not KEY=VALUE" in r.stderr


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar():
    stream = TTY()
    bar = ProgressBar("extracting", stream=stream)
    bar(0, 10)
    bar(10, 10)
    text = stream.getvalue()
    assert "extracting" in text and "10/10" in text and "ex/s" in text and text.endswith("\n")
    bar(10, 10)  # after the end: nothing more
    assert stream.getvalue() == text
    log = io.StringIO()  # not a terminal: whole lines, no carriage returns
    bar = ProgressBar("x", stream=log)
    bar(5, 10)
    bar.finish()
    assert log.getvalue().startswith("x:") and "5/10" in log.getvalue() and "\r" not in log.getvalue()
    off = io.StringIO()
    ProgressBar("x", stream=off, enabled=False)(5, 10)
    assert off.getvalue() == ""


def test_help_is_fast_and_light():
    code = (
        "import sys, cka_offline.cli.extract; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'h5py', 'onnx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    script = os.path.join(os.path.dirname(sys.executable), "cka-extract")
    if not os.path.exists(script):
        pytest.skip("cka-extract is not installed in this environment")
    out = subprocess.run([script, "--help"], check=True, capture_output=True, text=True).stdout
    assert "Example:" in out and "--allow-pickle-code-execution" in out and "RUNS CODE FROM THE FILE" in out
