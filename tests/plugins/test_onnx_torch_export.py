"""ONNX exports of PyTorch models: layers selected by module name agree with PyTorch forward hooks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

from cka_offline.errors import InputError  # noqa: E402
from cka_offline_onnx.extractor import OnnxExtractor  # noqa: E402

MODULES = ["features.0", "features.1", "features.2", "features.3", "features.4", "features.5", "features", "pool", "fc"]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that BN outputs differ from their inputs
        for bn in (model.features[1], model.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export(model: nn.Module, path: str, example: torch.Tensor, *, dynamo: bool, dynamic_batch: bool = True) -> None:
    kwargs: dict = {"input_names": ["x"], "output_names": ["y"], "dynamo": dynamo}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
    if dynamo:
        kwargs["optimize"] = False  # keep BatchNorm as its own node
    else:
        kwargs.update(do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), path, **kwargs)
        except Exception as exc:  # an exporter this torch no longer ships
            if not dynamo and "dynamo" in str(exc).lower():
                pytest.skip(f"TorchScript exporter unavailable: {exc}")
            raise


def hooked(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """Module outputs through plain forward hooks (independent of the torch plugin)."""
    found: dict[str, np.ndarray] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: found.__setitem__(name, out.detach().numpy()))
        for name, module in model.named_modules()
        if name in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def exported(request, tmp_path_factory):
    model = make_cnn()
    path = str(tmp_path_factory.mktemp("export") / "cnn.onnx")
    export(model, path, torch.randn(2, 3, 8, 8), dynamo=request.param)
    return model, path


def test_module_aliases(exported):
    _, path = exported
    infos = OnnxExtractor(path).layers()
    aliases = {a: i for i in infos for a in i.aliases}
    assert set(MODULES) <= set(aliases)
    assert aliases["features.0"].kind == "Conv" and aliases["features.1"].kind == "BatchNormalization"
    assert aliases["features.5"] is aliases["features"]  # a Sequential's output is its last child's
    assert aliases["fc"].kind == "Gemm" and aliases["fc"].shape == (5,)
    assert aliases["features.3"].shape == (6, 6, 6)


def test_agreement_with_pytorch_hooks(exported):
    model, path = exported
    x = torch.randn(5, 3, 8, 8)
    expected = hooked(model, x, MODULES)
    ex = OnnxExtractor(path)
    by_alias = {a: i.name for i in ex.layers() for a in i.aliases}
    out = ex.run({"x": x.numpy()}, [by_alias[m] for m in MODULES])
    for module in MODULES:
        got = out[by_alias[module]]
        assert got.shape == expected[module].shape, module
        assert np.max(np.abs(got - expected[module])) < 1e-4, module
    # BatchNorm really ran: its output differs from the Conv output it normalises
    assert np.max(np.abs(out[by_alias["features.1"]] - out[by_alias["features.0"]])) > 1e-2


def test_alias_accepted_by_run(exported):
    model, path = exported
    x = torch.randn(2, 3, 8, 8)
    out = OnnxExtractor(path).run({"x": x.numpy()}, ["features.3"])
    np.testing.assert_allclose(out["features.3"], hooked(model, x, ["features.3"])["features.3"], atol=1e-4)


def test_model_exported_with_fixed_batch_of_one(tmp_path):
    model = make_cnn()
    path = str(tmp_path / "b1.onnx")
    export(model, path, torch.randn(1, 3, 8, 8), dynamo=False, dynamic_batch=False)
    ex = OnnxExtractor(path)
    assert ex.fixed_batch_one
    x = torch.randn(4, 3, 8, 8)
    by_alias = {a: i.name for i in ex.layers() for a in i.aliases}
    out = ex.run({"x": x.numpy()}, [by_alias["features.2"], by_alias["fc"]])
    ref = hooked(model, x, ["features.2", "fc"])
    np.testing.assert_allclose(out[by_alias["fc"]], ref["fc"], atol=1e-4)
    np.testing.assert_allclose(out[by_alias["features.2"]], ref["features.2"], atol=1e-4)
    with pytest.raises(
        InputError, match=r"input 'x' expects shape \[1, 3, 8, 8\], got \(4, 3, 9, 8\): needs 8 on axis 2"
    ):
        ex.run({"x": np.zeros((4, 3, 9, 8), np.float32)}, [by_alias["fc"]])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv1(x)) + x


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_nested_module_aliases(tmp_path, dynamo):
    torch.manual_seed(1)
    model = nn.Sequential(Block(), Block()).eval()
    path = str(tmp_path / "nested.onnx")
    export(model, path, torch.randn(2, 3, 4, 4), dynamo=dynamo)
    ex = OnnxExtractor(path)
    aliases = {a: i for i in ex.layers() for a in i.aliases}
    # the TorchScript exporter writes the child's local name (/0/conv1/Conv): the full path is rebuilt
    assert {"0", "0.conv1", "0.act", "1", "1.conv1", "1.act"} <= set(aliases)
    assert aliases["0"].kind == "Add" and aliases["1.conv1"].kind == "Conv"
    x = torch.randn(3, 3, 4, 4)
    names = ["0", "0.conv1", "1.act", "1"]
    out = ex.run({"x": x.numpy()}, [aliases[n].name for n in names])
    ref = hooked(model, x, names)
    for n in names:
        np.testing.assert_allclose(out[aliases[n].name], ref[n], atol=1e-5)


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.act(self.dense(x)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([EncoderLayer(), EncoderLayer()])  # a list, never called itself

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class TwoEncoders(nn.Module):
    """Two encoders with the same inner names (encoder.layer.0 and decoder.layer.0), as in an encoder-decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Encoder()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.decoder(self.encoder(x)))


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def two_encoders(request, tmp_path_factory):
    torch.manual_seed(3)
    model = TwoEncoders().eval()
    path = str(tmp_path_factory.mktemp("enc") / "two.onnx")
    export(model, path, torch.randn(2, 4, 8), dynamo=request.param)
    return model, path


def test_aliases_of_two_encoders_are_full_paths(two_encoders):
    model, path = two_encoders
    ex = OnnxExtractor(path)
    aliases = {a: i.name for i in ex.layers() for a in i.aliases}
    blocks = [f"{e}.layer.{k}" for e in ("encoder", "decoder") for k in (0, 1)]
    children = [f"{b}.{c}" for b in blocks for c in ("dense", "act", "norm")]
    assert set(blocks + children + ["encoder", "decoder", "fc"]) <= set(aliases)
    # no partial path is offered (the TorchScript exporter writes layer.0 for encoder.layer.0)
    assert not [a for a in aliases if a.startswith("layer")]
    modules = {name for name, _ in model.named_modules()}
    assert set(aliases) <= modules, set(aliases) - modules
    assert len({aliases[b] for b in blocks}) == 4  # four blocks, four tensors
    x = torch.randn(3, 4, 8)
    names = blocks + ["encoder.layer.0.dense", "decoder.layer.1.act", "fc"]
    out = ex.run({"x": x.numpy()}, [aliases[n] for n in names])
    ref = hooked(model, x, names)
    for n in names:
        np.testing.assert_allclose(out[aliases[n]], ref[n], atol=1e-5, err_msg=n)


def test_layers_and_reductions_by_alias_through_the_command(exported, tmp_path):
    """`--layers` and `-r PATTERN=...` accept the same names: `-r fc=none` names the layer selected as `fc`."""
    from cka_offline.store.reader import open_activations

    from ..hardening.builders import invoke

    model, path = exported
    x = torch.randn(6, 3, 8, 8)
    np.savez(tmp_path / "in.npz", x=x.numpy())
    out = tmp_path / "a.h5"
    args = ["-i", tmp_path / "in.npz", "-o", out, "-l", "features.3,fc", "-r", "mean", "-r", "fc=none"]
    result = invoke("cka-extract", [path, *args])
    assert result.exit_code == 0, result.stderr
    ref = hooked(model, x, ["features.3", "fc"])
    by_alias = {a: i.name for i in OnnxExtractor(path).layers() for a in i.aliases}
    with open_activations(str(out)) as f:
        assert f.layer(by_alias["fc"]).reduction == "none"
        np.testing.assert_allclose(f.read(by_alias["fc"], 0, 6), ref["fc"], atol=1e-4)
        conv = ref["features.3"].astype(np.float64).mean(axis=(2, 3))
        np.testing.assert_allclose(f.read(by_alias["features.3"], 0, 6), conv, atol=1e-4)
    result = invoke("cka-extract", [path, *args[:-2], "-r", "fcc=none", "--overwrite"])
    assert result.exit_code == 3 and "reduction given for 'fcc', which matches no selected layer" in result.stderr


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 4), nn.ReLU())})

    def forward(self, x):
        return self.blocks["b"](self.blocks["a"](x))


def test_torchscript_names_inside_a_module_dict_are_completed_from_the_weights(tmp_path):
    """The TorchScript exporter names modules of an uncalled ModuleDict without it (/a/Gemm for blocks.a);
    the weights' names (blocks.a.weight) complete the path."""
    torch.manual_seed(2)
    model = Blocks().eval()
    path = str(tmp_path / "dict.onnx")
    export(model, path, torch.randn(2, 4), dynamo=False)
    aliases = {a: i.name for i in OnnxExtractor(path).layers() for a in i.aliases}
    assert {"blocks.a", "blocks.b", "blocks.b.0", "blocks.b.1"} <= set(aliases)
    assert not {"a", "b", "b.0"} & set(aliases)
    x = torch.randn(3, 4)
    names = ["blocks.a", "blocks.b.0", "blocks.b"]
    out = OnnxExtractor(path).run({"x": x.numpy()}, [aliases[n] for n in names])
    ref = hooked(model, x, names)
    for n in names:
        np.testing.assert_allclose(out[aliases[n]], ref[n], atol=1e-5, err_msg=n)
