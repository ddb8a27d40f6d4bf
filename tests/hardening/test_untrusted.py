"""Files from other people: nothing in an activation, result, inputs or weights file runs code or is
unpickled by default, and nothing in one makes the tool open other local files unless explicitly allowed."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from cka_offline.errors import UnsafeFileError
from cka_offline.results import load_result

from .builders import ROOT, SAMPLE, acts, digits, error_line, invoke, mutate

SOURCES = sorted([*(ROOT / "cka_offline").rglob("*.py"), *(ROOT / "plugins").glob("*/cka_offline_*/*.py")])


class _Marker:
    """Unpickling this creates ``path``: proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _calls(name: str):
    """(file, call node) of every call of ``...name(...)`` in the package and the plugins."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def _keyword(node: ast.Call, key: str):
    kw = next((k for k in node.keywords if k.arg == key), None)
    return None if kw is None else ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else kw.value


def test_no_loader_unpickles_by_default():
    loads = list(_calls("load"))
    np_loads = [
        (p, n) for p, n in loads if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "np"
    ]
    assert np_loads and all(_keyword(n, "allow_pickle") is False for _, n in np_loads), np_loads
    torch_loads = [
        (p, n) for p, n in loads if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert torch_loads
    unsafe = [(p, n.lineno) for p, n in torch_loads if _keyword(n, "weights_only") is not True]
    # the one weights_only=False load is the opt-in pickled model, reached only past the allow_pickle check
    assert [
        (p.name, _keyword(n, "weights_only")) for p, n in torch_loads if _keyword(n, "weights_only") is not True
    ] == [("sources.py", False)]
    text = unsafe[0][0].read_text()
    func = text[: text.index("weights_only=False")].rsplit("\ndef ", 1)[1]
    assert func.startswith("load_pickle(") and "if not allow_pickle:\n        refs" in func
    for banned in ("pickle.load", "pickle.loads", "eval", "exec", "yaml.load", "marshal.loads"):
        module, _, name = banned.rpartition(".")
        found = [
            (p.name, n.lineno)
            for p, n in _calls(name)
            if (
                isinstance(n.func, ast.Name)
                if not module
                else getattr(getattr(n.func, "value", None), "id", "") == module
            )
        ]
        assert found == [], (banned, found)


def test_pickled_npy_inputs_and_ids_are_refused(tmp_path):
    marker = tmp_path / "ran"
    np.save(tmp_path / "in.npy", np.array([_Marker(marker)] * 4, dtype=object), allow_pickle=True)
    r = invoke("cka-extract", [SAMPLE / "cnn_b.onnx", "-i", tmp_path / "in.npy", "-o", tmp_path / "o.h5"])
    assert r.exit_code == 3 and "in.npy" in error_line(r, "cka-extract")
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "l0.npy", np.ones((4, 3), np.float32))
    np.save(tmp_path / "ids.npy", np.array([_Marker(marker)] * 4, dtype=object), allow_pickle=True)
    r = invoke("cka-extract", [folder, "-X", f"ids={tmp_path / 'ids.npy'}", "-o", tmp_path / "o.h5"])
    assert r.exit_code == 3
    assert "cannot read it without unpickling" in error_line(r, "cka-extract")
    assert not marker.exists() and not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_malicious_pickle_weights_refused_without_running(tmp_path, layout):
    import torch

    marker = tmp_path / "ran"
    weights = tmp_path / "w.pt"
    if layout == "legacy":
        weights.write_bytes(pickle.dumps({"conv1.weight": _Marker(marker)}, protocol=2))
    else:
        torch.save({"conv1.weight": _Marker(marker)}, weights)
    assert not marker.exists()
    inputs = digits(tmp_path / "in.npz")
    r = invoke(
        "cka-extract",
        [f"{SAMPLE}/digits_cnn.py:make_model", "--weights", weights, "-i", inputs, "-o", tmp_path / "o.h5"],
    )
    assert r.exit_code == 3
    assert "holds more than tensors" in error_line(r, "cka-extract") and "would execute code" in r.stderr
    r = invoke("cka-extract", [weights, "-i", inputs, "-o", tmp_path / "o.h5"])  # as a pickled model
    assert r.exit_code == 3
    assert "--allow-pickle-code-execution" in error_line(r, "cka-extract")
    assert not marker.exists() and not (tmp_path / "o.h5").exists()


def test_result_files_load_without_running_anything(tmp_path):
    from cka_offline.analysis import analyze

    a, b = acts(tmp_path / "a.h5"), acts(tmp_path / "b.h5", seed=1)
    result = analyze([a, b], batch_size=8, device="cpu", hash_files=False)
    for ext in ("json", "h5", "csv"):
        path = result.save(tmp_path / f"r.{ext}")
        assert load_result(path).matrix(0, 1).shape == (2, 2)
    # a pickle renamed to .json / .h5 / .csv is just an unreadable file
    marker = tmp_path / "ran"
    for ext in ("json", "h5", "csv"):
        (tmp_path / f"evil.{ext}").write_bytes(pickle.dumps(_Marker(marker)))
        with pytest.raises(Exception) as info:
            load_result(tmp_path / f"evil.{ext}")
        assert type(info.value).__name__ == "FormatError"
    assert not marker.exists()
    # JSON holding "__reduce__"-like content stays data
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["files"][0]["provenance"]["command"] = "__import__('os').system('touch ran')"
    (tmp_path / "r2.json").write_text(json.dumps(doc))
    assert load_result(tmp_path / "r2.json").files[0].provenance["command"].startswith("__import__")
    assert not marker.exists()


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.h5"
    secret.parent.mkdir()
    with h5py.File(secret, "w") as h:
        h["data"] = np.ones((40, 3), np.float32)
    return secret


def test_result_h5_pointing_outside_is_refused(tmp_path):
    from cka_offline.analysis import analyze

    a = acts(tmp_path / "a.h5")
    path = analyze([a], batch_size=8, device="cpu", hash_files=False).save(tmp_path / "r.h5")
    secret = _secret(tmp_path)
    mutate(path, lambda h: h.__setitem__("notes", h5py.ExternalLink(str(secret), "data")))
    with pytest.raises(UnsafeFileError, match=r"r\.h5: /notes is an external link to .*secret\.h5"):
        load_result(path)
    assert load_result(path, allow_external=True).matrix(0).shape == (2, 2)


@pytest.mark.parametrize("kind", ["external-link", "soft-link", "external-storage", "virtual-dataset"])
def test_cli_refuses_files_pointing_outside_unless_allowed(tmp_path, kind):
    secret = _secret(tmp_path)
    raw = tmp_path / "elsewhere" / "raw.bin"
    raw.write_bytes(b"\0" * 480)

    def add(h):
        if kind == "external-link":
            h["notes"] = h5py.ExternalLink(str(secret), "data")
        elif kind == "soft-link":
            h["alias"] = h5py.SoftLink("/ids")
        elif kind == "external-storage":
            h.create_dataset("ext", shape=(40, 3), dtype=np.float32, external=[(str(raw), 0, 480)])
        else:
            layout = h5py.VirtualLayout(shape=(40, 3), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(secret), "data", shape=(40, 3))
            h.create_virtual_dataset("vds", layout)

    a = mutate(acts(tmp_path / "a.h5"), add)
    b = acts(tmp_path / "b.h5", seed=1)
    for prog, args in (("cka-inspect", [a]), ("cka-analyze", [a, b, "--device", "cpu", "-q"])):
        r = invoke(prog, args)
        assert r.exit_code == 3
        line = error_line(r, prog)
        assert "refused by default" in line and "--allow-external" in line
        r = invoke(prog, [*args, "--allow-external"])
        assert r.exit_code == 0, r.stderr


def test_onnx_external_data_outside_the_model_folder_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.bin").write_bytes(np.ones(3, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../elsewhere/secret.bin"), ("offset", "0"), ("length", "12")):
        w.external_data.add(key=key, value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "model" / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((4, 3), np.float32))
    r = invoke("cka-extract", [tmp_path / "model" / "m.onnx", "-i", tmp_path / "in.npz", "-o", tmp_path / "o.h5"])
    assert r.exit_code == 3
    assert "points to external data '../elsewhere/secret.bin', outside the model's folder" in error_line(
        r, "cka-extract"
    )


# ------------------------------------------------------------------------------------------ model archives


def _cka_extract() -> str:
    import shutil

    from .builders import BIN

    return str(BIN / "cka-extract") if (BIN / "cka-extract").exists() else str(shutil.which("cka-extract"))


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    """A legitimate archive (exported once: torch.export is slow to start)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(4, 3),)), str(path))
    return path


def _hostile_pt2(good: Path, tmp_path: Path, how: str, marker: Path) -> Path:
    """A ``.pt2`` whose bytes carry code, in the places torch's loaders read (or might read) without asking."""
    import io
    import zipfile

    import torch
    from torch._export.serde.schema import SCHEMA_VERSION

    evil = tmp_path / f"{how}.pt2"
    payload = io.BytesIO()
    torch.save({"0.weight": _Marker(marker)}, payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as out:
        entries = {info.filename: src.read(info) for info in src.infolist()}
        if how.startswith("legacy"):  # the layout of torch <= 2.7: fixed names, state dict "json" unpickled
            raw = pickle.dumps({"0.weight": _Marker(marker)}, protocol=2)
            empty = io.BytesIO()
            torch.save({}, empty)
            out.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
            out.writestr("serialized_exported_program.json", entries["good/models/model.json"])
            out.writestr("serialized_state_dict.json", payload.getvalue() if how == "legacy-zip" else raw)
            out.writestr("serialized_constants.json", empty.getvalue())
            out.writestr("serialized_example_inputs.pt", entries["good/data/sample_inputs/model.pt"])
            return evil
        for name, data in entries.items():
            if how == "sample-inputs" and name.endswith("sample_inputs/model.pt"):
                data = payload.getvalue()  # torch falls back to an unpickling load when the safe one fails
            elif how == "protocol-0" and name.endswith("weights/weight_1"):
                data = pickle.dumps(_Marker(marker), protocol=0)  # no protocol marker, any entry name
            out.writestr(name, data)
        if how == "native":
            out.writestr("good/data/aotinductor/model/model.so", b"\x7fELF\x02\x01\x01" + bytes(64))
    return evil


HOSTILE = ["legacy-zip", "legacy-raw", "sample-inputs", "protocol-0", "native"]


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_pt2_archives_run_nothing(good_pt2, tmp_path, how):
    marker = tmp_path / "ran"
    evil = _hostile_pt2(good_pt2, tmp_path, how, marker)
    r = invoke("cka-extract", [evil, "-i", _xs(tmp_path), "-o", tmp_path / "o.h5"])
    line = error_line(r, "cka-extract")
    assert r.exit_code == 3 and evil.name in line and "--allow-pickle-code-execution" in line
    assert ("compiled" in line) if how == "native" else ("pickle" in line)
    assert not marker.exists() and not (tmp_path / "o.h5").exists()


def _xs(tmp_path: Path) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    return path


def test_hostile_legacy_pt2_through_the_installed_command(good_pt2, tmp_path):
    """The reported attack, as a user meets it: the installed cka-extract on an older-layout .pt2."""
    import subprocess

    marker = tmp_path / "ran"
    evil = _hostile_pt2(good_pt2, tmp_path, "legacy-zip", marker)
    cmd = [_cka_extract(), str(evil), "-i", str(_xs(tmp_path)), "-o", str(tmp_path / "o.h5"), "-b", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("cka-extract: error: torch.export archive"), r.stderr
    assert "serialized_state_dict.json" in r.stderr and "--allow-pickle-code-execution" in r.stderr
    assert not marker.exists() and not (tmp_path / "o.h5").exists()
    # with the opt-in, a legitimate archive still loads (without it too: test_torch_files.py)
    out = tmp_path / "good.h5"
    args = [good_pt2, "-i", _xs(tmp_path), "-o", out, "-b", "4", "-q", "--allow-pickle-code-execution"]
    r = invoke("cka-extract", args)
    assert r.exit_code == 0 and out.exists(), r.stderr
    with h5py.File(out) as f:
        assert f["ids"].shape == (8,)


def test_a_loader_the_scan_misses_still_cannot_unpickle(good_pt2, tmp_path, monkeypatch):
    """The second line of defence: with the content scan switched off, torch's own fallback to an
    unpickling load is refused while the archive loads."""
    from cka_offline.errors import ModelError
    from cka_offline_torch import sources
    from cka_offline_torch.extractor import TorchExtractor

    marker = tmp_path / "ran"
    monkeypatch.setattr(sources, "pt2_pickled_entries", lambda path: [])
    for how in ("legacy-zip", "sample-inputs"):
        evil = _hostile_pt2(good_pt2, tmp_path, how, marker)
        with pytest.raises(
            ModelError, match=r"holds data that torch would unpickle with code execution.*--allow-pickle"
        ):
            TorchExtractor(str(evil)).layers()
        assert not marker.exists()
