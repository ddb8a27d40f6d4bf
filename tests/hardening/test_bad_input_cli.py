"""Bad input through the real commands: one table, one case per row, each checked for its exact outcome.

Every case asserts: a non-zero exit code (3 for a known error), exactly one line on stderr of the form
``<prog>: error: <what, where (file / layer / example), how to fix it>``, nothing on stdout, and no output
that looks complete (no activation file at the final path, no result or plot file). docs/reliability.md lists
the same cases; store-level checks of the same files are in tests/store/test_validation.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from .builders import (
    SAMPLE,
    acts,
    digits,
    error_line,
    invoke,
    mutate,
    npy_folder,
    replace_dataset,
    snapshot,
    two_input_onnx,
    write_py,
)

CNN_A = [f"{SAMPLE}/digits_cnn.py:make_model", "--weights", str(SAMPLE / "cnn_a.safetensors")]
CNN_B = str(SAMPLE / "cnn_b.onnx")


@dataclass
class Case:
    prog: str  # cka-extract, cka-analyze or cka-inspect
    build: Callable[[Path], list[str]]  # makes the inputs in tmp_path, returns the arguments (outputs are added)
    match: str  # regex the error line (after "<prog>: error: ") must fully match: what, where and the fix
    code: int = 3  # a data error; usage errors are 2 (docs/reliability.md)


def _ab(t: Path, **kw) -> list[str]:
    """A valid second file ``b.h5`` next to a case's ``a.h5``."""
    return [acts(t / "b.h5", seed=1, **kw)]


def truncated(t):
    data = Path(acts(t / "full.h5")).read_bytes()
    (t / "a.h5").write_bytes(data[: len(data) // 2])
    return [t / "a.h5", *_ab(t)]


def random_bytes(t):
    (t / "a.h5").write_bytes(np.random.default_rng(0).bytes(5000))
    return [t / "a.h5", *_ab(t)]


def not_activations(t):
    with h5py.File(t / "a.h5", "w") as h:
        h["weights"] = np.zeros((3, 3))
    return [t / "a.h5"]


def newer_major(t):
    return [mutate(acts(t / "a.h5"), lambda h: h.attrs.__setitem__("format_version", "2.0")), *_ab(t)]


def missing_ids(t):
    return [mutate(acts(t / "a.h5"), lambda h: h.__delitem__("ids")), *_ab(t)]


def duplicate_ids(t):
    def dup(h):
        h["ids"][7] = 3

    return [mutate(acts(t / "a.h5"), dup), *_ab(t)]


def short_layer(t):
    return [
        mutate(acts(t / "a.h5"), lambda h: replace_dataset(h, "layers/L0001", np.zeros((39, 3), np.float32))),
        *_ab(t),
    ]


def with_value(value, row, estimator="minibatch"):
    def build(t):
        x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
        x[row, 2] = value
        a = acts(t / "a.h5", layers={"conv1": x, "fc": np.ones((40, 3), np.float32) * np.arange(40)[:, None]})
        return [a, *_ab(t), "--estimator", estimator]

    return build


def few_examples(t):
    return [acts(t / "a.h5", n=3), acts(t / "b.h5", n=3, seed=1)]


def disjoint(t):
    return [acts(t / "a.h5"), acts(t / "b.h5", ids=np.arange(100, 140))]


def overlapping(t):
    return [acts(t / "a.h5"), acts(t / "b.h5", ids=np.arange(30, 70))]


def int_and_str_ids(t):
    return [acts(t / "a.h5"), acts(t / "b.h5", ids=np.array([f"img/{i}.png" for i in range(40)]))]


def no_such_layer(t):
    return [acts(t / "a.h5"), *_ab(t), "--layers", "relu*"]


def incomplete(t):
    return [mutate(acts(t / "a.h5"), lambda h: h.attrs.__setitem__("complete", False)), *_ab(t)]


def partial_name(t):
    os.rename(acts(t / "a.h5"), t / "a.h5.partial")
    return [t / "a.h5.partial"]


def final_missing_partial_left(t):
    os.rename(acts(t / "a.h5"), t / "a.h5.partial")
    return [t / "a.h5", *_ab(t)]


def external_link(t):
    secret = t / "secret.h5"
    with h5py.File(secret, "w") as h:
        h["data"] = np.ones((40, 3), np.float32)
    return [mutate(acts(t / "a.h5"), lambda h: h.__setitem__("notes", h5py.ExternalLink(str(secret), "data"))), *_ab(t)]


def result_exists(t):
    (t / "res.json").write_text("{}")
    return [acts(t / "a.h5"), *_ab(t)]


def factory(code):
    def build(t):
        return [write_py(t / "model_def.py", code) + ":make", "-i", digits(t / "in.npz")]

    return build


def weights_of_other_width(t):
    return [*CNN_A, "--model-arg", "width=8", "-i", digits(t / "in.npz")]


def corrupt_weights(t):
    (t / "w.safetensors").write_bytes(np.random.default_rng(1).bytes(700))
    return [CNN_A[0], "--weights", t / "w.safetensors", "-i", digits(t / "in.npz")]


def corrupt_onnx(t):
    data = (SAMPLE / "cnn_b.onnx").read_bytes()
    (t / "m.onnx").write_bytes(data[: len(data) // 2])
    return [t / "m.onnx", "-i", digits(t / "in.npz")]


def onnx_unknown_tensor(t):
    return [CNN_B, "-i", digits(t / "in.npz"), "--layers", "/conv9/Conv_output_0"]


def onnx_input_names(t):
    np.savez(t / "in.npz", x=np.ones((10, 3), np.float32), z=np.ones((10, 3), np.float32))
    return [two_input_onnx(t / "two.onnx"), "-i", t / "in.npz"]


def onnx_input_shape(t):
    return [CNN_B, "-i", digits(t / "in.npz", pixels=np.zeros((40, 64), np.float32))]


def torch_input_shape(t):
    return [*CNN_A, "-i", digits(t / "in.npz", pixels=np.zeros((40, 64), np.float32))]


def nan_inputs(t):
    with np.load(SAMPLE / "digits.npz") as d:
        pixels = d["pixels"][:40].copy()
    pixels[5, 0, 3, 3] = np.nan
    return [*CNN_A, "-i", digits(t / "in.npz", pixels=pixels), "--layers", "relu1,fc2"]


def inf_activations(t):
    with np.load(SAMPLE / "digits.npz") as d:
        pixels = d["pixels"][:40].copy()
    pixels[3] = 1e38
    return [CNN_B, "-i", digits(t / "in.npz", pixels=pixels), "--layers", "kind:Relu"]


def duplicate_input_ids(t):
    return [CNN_B, "-i", digits(t / "in.npz", n=10, ids=np.array([0, 1, 2, 3, 4, 5, 6, 7, 3, 9]))]


def too_few_input_ids(t):
    return [CNN_B, "-i", digits(t / "in.npz", n=10, ids=np.arange(8))]


def pickled_inputs(t):
    np.savez(t / "in.npz", pixels=np.array([{"a": 1}] * 4, dtype=object))
    return [CNN_B, "-i", t / "in.npz"]


def missing_inputs(t):
    return [CNN_B, "-i", t / "nope.npz"]


def output_exists(t):
    (t / "out.h5").write_bytes(b"someone else's file")
    return [CNN_B, "-i", digits(t / "in.npz")]


def unknown_model(t):
    (t / "model.xyz").write_text("?")
    return [t / "model.xyz", "-i", digits(t / "in.npz")]


def arrays_rows_differ(t):
    folder = npy_folder(t / "acts", n=30)
    np.save(t / "acts" / "l1.npy", np.zeros((29, 8), np.float32))
    return [folder]


def arrays_ids_short(t):
    folder = npy_folder(t / "acts", n=30)
    (t / "ids.txt").write_text("\n".join(f"ex{i}" for i in range(28)) + "\n")
    return [folder, "-X", f"ids={t / 'ids.txt'}"]


def resume_other_options(t):
    from .builders import invoke as run

    folder = npy_folder(t / "acts", n=30)
    partial = t / "out.h5.partial"
    r = run("cka-extract", [folder, "-o", t / "out.h5", "--layers", "l0"])
    assert r.exit_code == 0
    os.rename(t / "out.h5", partial)
    with h5py.File(partial, "r+") as h:
        h.attrs["complete"], h.attrs["rows_complete"] = False, 10
    return [folder, "--layers", "l1", "--resume"]


FACTORY_IMPORT_FAILS = "import package_that_is_not_installed\n\ndef make():\n    return None\n"
FACTORY_NOT_MODULE = "def make():\n    return {'conv': 1}\n"

CASES: dict[str, Case] = {
    # --- activation files ----------------------------------------------------------------------------
    "truncated-hdf5": Case(
        "cka-analyze",
        truncated,
        r".*/a\.h5 is truncated \(shorter than its HDF5 header says\).*copy it again or extract it again",
    ),
    "random-bytes": Case(
        "cka-analyze",
        random_bytes,
        r".*/a\.h5 is not a readable HDF5 file \(truncated, corrupt or another file type\); activation files are written by cka-extract",
    ),
    "hdf5-not-activations": Case(
        "cka-inspect",
        not_activations,
        r".*/a\.h5 is an HDF5 file but not a cka-offline activation file .*; write it with cka-extract",
    ),
    "newer-major-version": Case(
        "cka-analyze",
        newer_major,
        r".*/a\.h5 uses activation format 2\.0, but this cka-offline reads format 1\.x; install .*pip install -U cka-offline\)",
    ),
    "ids-missing": Case(
        "cka-analyze", missing_ids, r".*/a\.h5: dataset /ids \(example ids\) is missing; .*extract it again.*"
    ),
    "ids-duplicate": Case(
        "cka-analyze", duplicate_ids, r".*/a\.h5: example id 3 occurs more than once; .*extract it again.*"
    ),
    "layer-rows-differ-from-ids": Case(
        "cka-analyze",
        short_layer,
        r".*/a\.h5: layer 'fc' has 39 rows but the file has 40 example ids; .*extract it again.*",
    ),
    "nan-activations": Case(
        "cka-analyze",
        with_value(np.nan, 7),
        r".*/a\.h5: layer 'conv1' holds nan for example id 7 .*fix the model or inputs and extract again",
    ),
    "inf-activations-full-estimator": Case(
        "cka-analyze",
        with_value(np.inf, 9, "full"),
        r".*/a\.h5: layer 'conv1' holds inf for example id 9 .*fix the model or inputs and extract again",
    ),
    "fewer-than-4-examples": Case(
        "cka-analyze",
        few_examples,
        r"CKA needs at least 4 examples .*3 example\(s\) in .*/a\.h5.*; extract at least 4 examples",
    ),
    "ids-disjoint": Case(
        "cka-analyze",
        disjoint,
        r".*/a\.h5 and .*/b\.h5 hold different examples: 40 id\(s\) .*e\.g\. 0, 1, 2, .*extract both from the same inputs, or use the common examples with --intersection",
    ),
    "ids-partly-overlapping": Case(
        "cka-analyze",
        overlapping,
        r".*/a\.h5 and .*/b\.h5 hold different examples: 30 id\(s\) of .*/a\.h5 are missing .*\(e\.g\. 0, 1, 2, \.\.\.\), 30 id\(s\) .*\(e\.g\. 40, 41, 42, \.\.\.\); .*--intersection",
    ),
    "ids-int-vs-str": Case(
        "cka-analyze",
        int_and_str_ids,
        r"example ids are integers in some files and strings in others \(.*/a\.h5: integers, .*/b\.h5: strings\); extract all files from the same inputs",
    ),
    "layer-pattern-matches-nothing": Case(
        "cka-analyze",
        no_such_layer,
        r"no layer matches 'relu\*' in .*/a\.h5; 2 layers, for example conv1, fc \(list them with cka-inspect .*/a\.h5\)",
    ),
    "incomplete-file": Case(
        "cka-analyze",
        incomplete,
        r".*/a\.h5 is incomplete \(40 of 40 rows written\).*complete it with cka-extract --resume",
    ),
    "partial-file-given": Case(
        "cka-inspect",
        partial_name,
        r".*/a\.h5\.partial is incomplete: an unfinished extraction \(still being written, or its writer stopped\); wait for it to finish, or complete it with cka-extract --resume",
    ),
    "final-missing-partial-left": Case(
        "cka-analyze",
        final_missing_partial_left,
        r".*/a\.h5: no such file yet, the extraction is incomplete: only .*/a\.h5\.partial exists .*wait for it to finish, or complete it with cka-extract --resume",
    ),
    "external-link": Case(
        "cka-analyze",
        external_link,
        r".*/a\.h5: /notes is an external link to .*secret\.h5; files that point outside themselves are refused by default\. If you trust the file, .*--allow-external\)",
    ),
    "result-file-exists": Case(
        "cka-analyze",
        result_exists,
        r".*/res\.json already exists; pass --overwrite to replace it or choose another name",
    ),
    # --- models --------------------------------------------------------------------------------------
    "factory-import-fails": Case(
        "cka-extract",
        factory(FACTORY_IMPORT_FAILS),
        r"factory file '.*/model_def\.py' failed to run: ModuleNotFoundError: No module named 'package_that_is_not_installed'; fix the file or its imports",
    ),
    "factory-module-not-found": Case(
        "cka-extract",
        lambda t: ["no_such_pkg_xyz.models:make", "-i", digits(t / "in.npz")],
        r"cannot import module 'no_such_pkg_xyz\.models' .*install the package or add its folder to PYTHONPATH.*",
    ),
    "factory-returns-non-module": Case(
        "cka-extract",
        factory(FACTORY_NOT_MODULE),
        r"factory '.*/model_def\.py:make' returned a builtins\.dict, not a torch\.nn\.Module; make it return the model itself",
    ),
    "factory-name-typo": Case(
        "cka-extract",
        lambda t: [f"{SAMPLE}/digits_cnn.py:make_modle", "-i", digits(t / "in.npz")],
        r"'.*digits_cnn\.py' has no attribute 'make_modle' .*did you mean make_model\?",
    ),
    "weights-do-not-fit": Case(
        "cka-extract",
        weights_of_other_width,
        r"weights '.*cnn_a\.safetensors' do not fit the model .*13 shape mismatch\(es\): bn1\.bias \(file \(16,\), model \(8,\)\).*check that -X model_args build the same architecture.*",
    ),
    "weights-corrupt": Case(
        "cka-extract",
        corrupt_weights,
        r"weights file '.*/w\.safetensors' is not a readable safetensors file: .*; check that the file is complete.*",
    ),
    "onnx-corrupt": Case(
        "cka-extract",
        corrupt_onnx,
        r".*/m\.onnx is not a readable ONNX model \(.*\); check that the file is complete and was written by an ONNX exporter",
    ),
    "onnx-unknown-tensor": Case(
        "cka-extract",
        onnx_unknown_tensor,
        r"no layer matches '/conv9/Conv_output_0' in model .*cnn_b\.onnx; close matches: /conv3/Conv_output_0, .*\(list them with cka-extract --list-layers\)",
    ),
    "inputs-names-do-not-fit": Case(
        "cka-extract",
        onnx_input_names,
        r".*two\.onnx.* inputs x, y .*in\.npz has x, z \(missing: y\); name the arrays after the model's inputs",
    ),
    "inputs-shape-onnx": Case(
        "cka-extract",
        onnx_input_shape,
        r".*cnn_b\.onnx: input 'pixels' expects shape \[batch, 1, 8, 8\] \(rank 4\), got \(40, 64\) \(rank 2\); reshape the input array",
    ),
    "inputs-shape-torch": Case(
        "cka-extract",
        torch_input_shape,
        r"the forward pass of '.*digits_cnn\.py:make_model' failed on a batch of 40 \(pixels: \(40, 64\) float32\): RuntimeError: .*; check that the inputs fit the model",
    ),
    "nan-activations-extract": Case(
        "cka-extract",
        nan_inputs,
        r"layer 'relu1' has NaN activations for example id 5 \(1 example\(s\) in this batch\); check the inputs of that example and the model's weights\. No complete file was written",
    ),
    "inf-activations-extract": Case(
        "cka-extract",
        inf_activations,
        r"layer '/relu1/Relu_output_0' has Inf activations for example id 3 .*No complete file was written",
    ),
    # --- inputs and outputs --------------------------------------------------------------------------
    "input-ids-duplicate": Case(
        "cka-extract",
        duplicate_input_ids,
        r".*/in\.npz: example ids must be unique; 1 id\(s\) occur more than once, e\.g\. 3; give every example its own id",
    ),
    "input-ids-count": Case(
        "cka-extract",
        too_few_input_ids,
        r"'ids' in .*/in\.npz has 8 entries but the inputs have 10 examples; give exactly one id per example",
    ),
    "inputs-pickled-objects": Case(
        "cka-extract",
        pickled_inputs,
        r"array 'pixels' in .*/in\.npz: cannot read it without unpickling: it holds Python objects \(dtype object\), "
        r"which are never unpickled; save it as a numeric or fixed-width string array",
    ),
    "inputs-missing": Case("cka-extract", missing_inputs, r"inputs .*/nope\.npz not found; check the path"),
    "output-exists": Case(
        "cka-extract", output_exists, r".*/out\.h5 already exists; pass --overwrite to replace it or choose another -o"
    ),
    "model-kind-unknown": Case(
        "cka-extract", unknown_model, r"no extractor can open '.*/model\.xyz'; installed: torch .*onnx .*arrays .*"
    ),
    "arrays-row-counts-differ": Case(
        "cka-extract",
        arrays_rows_differ,
        r".*l1\.npy has 29 rows but .*l0\.npy has 30; every array must hold one row per example on axis 0",
    ),
    "arrays-ids-file-short": Case(
        "cka-extract", arrays_ids_short, r"ids from .*/ids\.txt: 28 ids for 30 rows; give exactly one id per example"
    ),
    "resume-with-other-options": Case(
        "cka-extract",
        resume_other_options,
        r".*/out\.h5\.partial was written with a different model, inputs or options; rerun with the same ones to resume, or pass --overwrite to start over",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    case = CASES[name]
    args = [str(a) for a in case.build(tmp_path)]
    if case.prog == "cka-extract":
        args += ["-o", str(tmp_path / "out.h5"), "-q"]
    elif case.prog == "cka-analyze":
        args += ["-o", str(tmp_path / "res.json"), "--plot", str(tmp_path / "plot.png"), "--device", "cpu", "-q"]
    before = snapshot(tmp_path)
    kept = {p: (tmp_path / p).read_bytes() for p in ("out.h5", "res.json") if (tmp_path / p).exists()}
    result = invoke(case.prog, args)
    assert result.exit_code == case.code, result.stderr
    line = error_line(result, case.prog)
    assert __import__("re").fullmatch(case.match, line), line
    # nothing that looks complete: no new activation, result or plot file; a file that was there is untouched
    created = snapshot(tmp_path) - before
    assert not {"out.h5", "res.json", "plot.png"} & created, created
    assert created <= {"out.h5.partial"}, created  # a .partial (for --resume) is the only thing left behind
    for p, data in kept.items():
        assert (tmp_path / p).read_bytes() == data


def test_case_count():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", ["truncated-hdf5", "hdf5-not-activations", "onnx-corrupt", "inputs-pickled-objects"])
def test_installed_scripts_exit_codes(name, tmp_path):
    """The same cases through the installed console scripts: real exit codes and stderr."""
    import re
    import subprocess

    from .builders import BIN

    case = CASES[name]
    args = [str(a) for a in case.build(tmp_path)]
    if case.prog == "cka-extract":
        args += ["-o", str(tmp_path / "out.h5")]
    r = subprocess.run([str(BIN / case.prog), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == case.code
    assert r.stdout == ""
    prefix = f"{case.prog}: error: "
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(prefix), r.stderr
    assert re.fullmatch(case.match, r.stderr[len(prefix) :].rstrip("\n"))
    assert not (tmp_path / "out.h5").exists()


def test_constant_layer_is_nan_with_a_warning_not_an_error(tmp_path):
    """The one bad input that is not an error: a constant layer has no defined CKA, but the other layers'
    values are valid, so the run succeeds, that layer's row and column are NaN, and a warning names it."""
    import json

    a = acts(
        tmp_path / "a.h5",
        layers={
            "conv1": np.ones((40, 6), np.float32),
            "fc": np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32),
        },
    )
    b = acts(tmp_path / "b.h5", seed=1)
    r = invoke("cka-analyze", [a, b, "-m", "8", "-o", tmp_path / "r.json", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.stderr
    assert f"layer 'conv1' of {a} is constant over the examples, so its CKA is undefined (NaN)" in r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert any("'conv1'" in w and "constant" in w for w in doc["warnings"])
    from cka_offline.results import load_result

    matrix = load_result(tmp_path / "r.json").matrix(0, 1)  # rows: conv1, fc of A
    assert np.isnan(matrix[0]).all() and np.isfinite(matrix[1]).all()
