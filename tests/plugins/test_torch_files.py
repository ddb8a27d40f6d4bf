"""The torch extractor on model files: weights, torch.export archives, pickles, TorchScript, state dicts."""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from cka_offline.errors import InputError, ModelError  # noqa: E402
from cka_offline_torch.extractor import TorchExtractor  # noqa: E402
from cka_offline_torch.sources import is_torchscript  # noqa: E402

from .identity_reference import files_sha, identity, state_sha  # noqa: E402
from .test_torch_extractor import CNN_LAYERS, FACTORY_SOURCE, cnn_reference, images, load_reference_module  # noqa: E402

LAYER_NAMES = [name for name, _ in CNN_LAYERS]


@pytest.fixture
def torch_factory(tmp_path: Path):
    """(factory file, the same file imported independently)"""
    path = tmp_path / "file_factory.py"
    path.write_text(FACTORY_SOURCE)
    return path, load_reference_module(path, "torch_files_reference")


def eager_hooks(model: nn.Module, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Outputs of ``names`` captured with hand-written hooks on the eager model."""
    got = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone())) for n in names
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(x.astype(np.float32)))
    finally:
        for h in handles:
            h.remove()
    return {n: got[n].numpy() for n in names}


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("kind", ["safetensors", "pt", "checkpoint"])
def test_weights_are_loaded_into_the_factory_model(torch_factory, tmp_path, kind):
    path, ref = torch_factory
    trained = ref.make(width=4, seed=7)
    state = trained.state_dict()
    weights = tmp_path / f"w.{'safetensors' if kind == 'safetensors' else 'pt'}"
    if kind == "safetensors":
        save_file(state, str(weights))
    else:
        torch.save(state if kind == "pt" else {"state_dict": state, "epoch": 3}, weights)
    x = images(4)
    with TorchExtractor(f"{path}:make", options={"weights": str(weights)}) as ex:  # factory default seed=0
        got = ex.run({"x": x}, LAYER_NAMES)
        prov = ex.provenance()
    want = cnn_reference(trained, x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
    # the identity: the factory's code and the weights as loaded (the trained model's, not seed 0's)
    assert json.loads(prov["model_code_files"]) == [str(path)]
    assert prov["model_code_sha256"] == files_sha([path])
    assert prov["model_state_sha256"] == state_sha(trained)
    assert prov["model_sha256"] == identity(files_sha([path]), state_sha(trained))
    assert prov["weights"] == str(weights)
    assert prov["factory_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tied_weights_saved_once_still_fit(tmp_path):
    factory = tmp_path / "tied_factory.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "def make(seed=0):\n"
        "    torch.manual_seed(seed)\n"
        "    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))\n"
        "    model[1].weight = model[0].weight\n"
        "    return model\n"
    )
    trained = load_reference_module(factory, "torch_tied_reference").make(seed=3)
    weights = tmp_path / "tied.safetensors"
    save_file({"0.weight": trained[0].weight.detach().clone()}, str(weights))  # one copy, as save_model writes it
    with TorchExtractor(f"{factory}:make", options={"weights": str(weights)}) as ex:
        got = ex.run({"x": np.array([[1, 2], [3, 4]])}, ["0"])
    np.testing.assert_array_equal(got["0"], trained[0].weight.detach().numpy()[[[1, 2], [3, 4]]])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.pop("head.bias"), r"1 missing key\(s\): head.bias; check that -X model_args"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"1 unexpected key\(s\): extra"),
        (
            lambda sd: sd.update({"head.weight": torch.zeros(3, 5)}),
            r"1 shape mismatch\(es\): head.weight \(file \(3, 5\), model \(3, 4\)\)",
        ),
        (lambda sd: [sd.update({f"module.{k}": sd.pop(k)}) for k in list(sd)], r"DataParallel/DDP wrapper"),
    ],
)
def test_weights_that_do_not_fit(torch_factory, tmp_path, edit, match):
    path, ref = torch_factory
    state = ref.make().state_dict()
    edit(state)
    weights = tmp_path / "bad.safetensors"
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=rf"weights '.*bad.safetensors' do not fit the model of .*{match}"):
        TorchExtractor(f"{path}:make", options={"weights": str(weights)}).layers()


def test_many_missing_keys_are_summarised(torch_factory, tmp_path):
    path, _ = torch_factory
    weights = tmp_path / "empty.pt"
    torch.save({"other": torch.zeros(1)}, weights)
    with pytest.raises(ModelError, match=r"1[0-9] missing key\(s\): features.0.weight, .* and \d+ more"):
        TorchExtractor(f"{path}:make", options={"weights": str(weights)}).layers()


def test_weights_file_errors(torch_factory, tmp_path):
    path, _ = torch_factory
    pickled = tmp_path / "model.pt"
    torch.save(PickledNet(), pickled)
    with pytest.raises(ModelError, match=r"holds more than tensors .* would execute code"):
        TorchExtractor(f"{path}:make", options={"weights": str(pickled)}).layers()
    with pytest.raises(ModelError, match=r"weights file '.*nope.safetensors' does not exist"):
        TorchExtractor(f"{path}:make", options={"weights": str(tmp_path / "nope.safetensors")}).layers()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        TorchExtractor(f"{path}:make", options={"weights": str(garbage)}).layers()
    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(1), "b": 3}, mixed)
    with pytest.raises(ModelError, match=r"values are not all tensors \(keys: 'a', 'b'\)"):
        TorchExtractor(f"{path}:make", options={"weights": str(mixed)}).layers()


# ------------------------------------------------------------------------------------------ torch.export


def export(model: nn.Module, path: Path, args: tuple, kwargs: dict | None = None, dynamic: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic:
            batch = torch.export.Dim("batch", min=1)
            shapes = {name: {0: batch} for name in ["x"]}
            program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=shapes)
        else:
            program = torch.export.export(model.eval(), args, kwargs)
        torch.export.save(program, str(path))
    return path


def test_export_archive_hooks_fire_on_original_module_names(torch_factory, tmp_path):
    _, ref = torch_factory
    model = ref.make(width=4, seed=2)
    archive = export(model, tmp_path / "cnn.pt2", (torch.randn(2, 3, 6, 6),))
    x = images(5)  # another batch size than the example: the batch axis was exported as dynamic
    with TorchExtractor(str(archive)) as ex:
        assert [(i.name, i.kind) for i in ex.layers()] == CNN_LAYERS  # kinds from the original classes
        assert ex.input_names() == ["x"]
        got = ex.run({"ids": np.arange(5), "x": x}, LAYER_NAMES)
        prov = ex.provenance()
    want = eager_hooks(model, x, LAYER_NAMES)
    for name in LAYER_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
    # an archive holds its graph: its bytes are its code
    assert prov["model_code_sha256"] == files_sha([archive])
    assert prov["model_sha256"] == identity(files_sha([archive]), prov["model_state_sha256"])
    with TorchExtractor(str(archive)) as again:
        assert again.provenance()["model_sha256"] == prov["model_sha256"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_archive_on_cuda(torch_factory, tmp_path):
    _, ref = torch_factory
    archive = export(ref.make(), tmp_path / "cnn.pt2", (torch.randn(2, 3, 6, 6),))
    x = images(3)
    with TorchExtractor(str(archive)) as ex:
        want = ex.run({"x": x}, LAYER_NAMES)
    with TorchExtractor(str(archive), device="auto") as ex:
        assert ex.provenance()["device"].startswith("cuda")
        got = ex.run({"x": x}, LAYER_NAMES)
    for name in LAYER_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x, y, mask):
        return self.a(x) + self.b(y) * mask


def test_export_archive_with_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    model = TwoArgs().eval()
    x, y, mask = torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, 1)
    archive = export(model, tmp_path / "two.pt2", (x,), {"y": y, "mask": mask}, dynamic=False)
    with TorchExtractor(str(archive)) as ex:
        assert ex.input_names() == ["x", "y", "mask"]
        got = ex.run({"mask": mask.numpy(), "y": y.numpy(), "x": x.numpy()}, ["a", "b"])
        with pytest.raises(InputError, match=r"forward\(x, y, mask\) of .* requires 'mask'"):
            ex.run({"y": y.numpy(), "x": x.numpy()}, ["a"])
        with pytest.raises(ModelError, match=r"forward pass .* failed .*export with dynamic_shapes"):
            ex.run({"mask": np.ones((3, 1)), "y": np.ones((3, 4)), "x": np.ones((3, 3))}, ["a"])
    with torch.no_grad():
        np.testing.assert_array_equal(got["a"], model.a(x).numpy())
        np.testing.assert_array_equal(got["b"], model.b(y).numpy())


def test_export_archive_with_pickled_entries_needs_opt_in(torch_factory, tmp_path):
    _, ref = torch_factory
    archive = export(ref.make(), tmp_path / "cnn.pt2", (torch.randn(2, 3, 6, 6),))
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with pytest.raises(
        ModelError, match=r"contains pickled entries \(features.0.weight \(weight_0\)\).*--allow-pickle"
    ):
        TorchExtractor(str(tampered)).layers()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"plain text", r"is not a torch.export archive \(not a zip file\)"),
        (None, r"torch.export archive '.*' does not exist"),
    ],
)
def test_export_archive_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        TorchExtractor(str(path)).layers()


def test_broken_export_archive(tmp_path):
    path = tmp_path / "broken.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("broken/archive_format", "pt2")
    with pytest.raises(ModelError, match=r"torch.export.load could not read .*re-export it with this torch version"):
        TorchExtractor(str(path)).layers()


def test_options_for_factories_only(tmp_path):
    with pytest.raises(ModelError, match=r"option\(s\) weights apply only to a factory source"):
        TorchExtractor(str(tmp_path / "m.pt2"), options={"weights": "w.safetensors"})


# ------------------------------------------------------------------------------------------ pickles


class PickledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.fc(x))


class SideEffect:
    """Unpickling this object creates a file: proof of whether code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_model_needs_the_opt_in(tmp_path, legacy):
    torch.manual_seed(0)
    model = PickledNet().eval()
    path = tmp_path / "full.pth"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    refs = "" if legacy else r" \(it references .*PickledNet"
    with pytest.raises(ModelError, match=rf"is a pickled model{refs}.*--allow-pickle-code-execution"):
        TorchExtractor(str(path)).layers()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with TorchExtractor(str(path), options={"allow_pickle_code_execution": "true"}) as ex:
        assert [(i.name, i.kind) for i in ex.layers()] == [("fc", "Linear"), ("act", "Tanh")]
        got = ex.run({"x": x}, ["fc", "act"])
        prov = ex.provenance()
    # the class's own module (this test file) is its code; the state is the unpickled parameters
    assert prov["model_state_sha256"] == state_sha(model)
    assert __file__ in json.loads(prov["model_code_files"])
    with torch.no_grad():
        np.testing.assert_array_equal(got["fc"], model.fc(torch.from_numpy(x)).numpy())
        np.testing.assert_array_equal(got["act"], model(torch.from_numpy(x)).numpy())


def test_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": SideEffect(marker)}, path)
    with pytest.raises(ModelError, match=r"is a pickled model \(it references builtins.getattr, pathlib.Path"):
        TorchExtractor(str(path)).layers()
    assert not marker.exists()
    with pytest.raises(ModelError, match=r"holds a dict, not a torch.nn.Module"):
        TorchExtractor(str(path), options={"allow_pickle_code_execution": True}).layers()
    assert marker.exists()  # with the opt-in it did run: that is what the opt-in means


def test_pickled_model_whose_class_is_gone(tmp_path, monkeypatch):
    module_file = tmp_path / "vanishing_torch_model.py"
    module_file.write_text("from torch import nn\nclass Net(nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_torch_model

    path = tmp_path / "vanish.pt"
    torch.save(vanishing_torch_model.Net(nn.ReLU()), path)
    module_file.unlink()
    monkeypatch.delitem(__import__("sys").modules, "vanishing_torch_model")
    with pytest.raises(ModelError, match=r"unpickling .* failed: ModuleNotFoundError.*must be importable"):
        TorchExtractor(str(path), options={"allow_pickle_code_execution": True}).layers()


def test_state_dict_or_safetensors_as_the_model_is_explained(tmp_path):
    torch.manual_seed(0)
    state = PickledNet().state_dict()
    pt, st = tmp_path / "sd.pt", tmp_path / "sd.safetensors"
    torch.save(state, pt)
    save_file(state, str(st))
    with pytest.raises(ModelError, match=r"holds only tensors \(a state dict\), not a model.*-X weights="):
        TorchExtractor(str(pt)).layers()
    with pytest.raises(ModelError, match=r"holds only weights; give the code that builds the model as a factory"):
        TorchExtractor(str(st)).layers()
    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelError, match=r"model file '.*missing.pt' does not exist"):
        TorchExtractor(str(missing)).layers()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00junk")
    with pytest.raises(ModelError, match=r"is not a file torch.load can read"):
        TorchExtractor(str(junk)).layers()


# ------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_with_alternatives(tmp_path, how):
    model = PickledNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(2, 3))
        path = tmp_path / f"{how}.pt"
        torch.jit.save(scripted, str(path))
    assert is_torchscript(str(path))
    with pytest.raises(
        ModelError,
        match=r"TorchScript archive; TorchScript modules do not support forward hooks.*"
        r"torch.export.*factory plus weights.*onnx extractor",
    ):
        TorchExtractor(str(path)).layers()
    factory = tmp_path / "f.py"
    factory.write_text("from torch import nn\ndef make():\n    return nn.Linear(3, 2)\n")
    with pytest.raises(ModelError, match=r"weights file .* is a TorchScript archive, not a state dict"):
        TorchExtractor(f"{factory}:make", options={"weights": str(path)}).layers()


@pytest.mark.parametrize("name", ["model.jit", "model.ts", "model.bin", "model", "model.pt2"])
def test_torchscript_is_explained_whatever_its_name(tmp_path, name):
    """Recognised by content (a zip with constants.pkl / code/), not by its extension."""
    from click.testing import CliRunner

    from cka_offline.cli import extract as cli_extract

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = tmp_path / name
        torch.jit.save(torch.jit.script(PickledNet().eval()), str(path))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 3), np.float32))
    r = CliRunner().invoke(cli_extract.main, [str(path), "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "o.h5")])
    assert r.exit_code == 3, r.output
    assert f"{name}' is a TorchScript archive; TorchScript modules do not support forward hooks" in r.stderr
    assert "torch.export" in r.stderr and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------ archive scan


def test_pickle_scan_finds_globals_in_every_protocol_and_not_in_weights():
    import io
    import pickle

    from cka_offline_torch.archives import judge_bytes, pickle_globals

    for protocol in range(6):
        found, is_pickle = pickle_globals(io.BytesIO(pickle.dumps([SideEffect(Path("m"))], protocol=protocol)))
        assert is_pickle and any(g.startswith("pathlib.") for g in found), (protocol, found)
    # a global followed by garbage still counts (an unpickler has run it by then)
    found, _ = pickle_globals(io.BytesIO(b"cos\nsystem\n(S'x'\ntR\xff\xff"))
    assert found == ["os.system"]
    # two pickles in a row, the second one hostile (torch's legacy format reads several)
    found, _ = pickle_globals(io.BytesIO(pickle.dumps(1, protocol=2) + pickle.dumps(SideEffect(Path("m")), protocol=2)))
    assert any(g.startswith("pathlib.") for g in found), found
    # torch's own tensors pickle only allowlisted globals; raw weights, JSON and text are not pickles
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    buf.seek(0)
    assert judge_bytes("w.pt", buf) == []
    rng = np.random.default_rng(0)
    for _ in range(300):
        blob = rng.normal(size=int(rng.integers(1, 200))).astype(rng.choice(["f4", "f2", "f8"])).tobytes()
        assert judge_bytes("weight", io.BytesIO(blob)) == []
    assert judge_bytes("c.json", io.BytesIO(b'{"config": {}}')) == []
