"""Models that call a module several times per forward pass (a torchvision-style ResNet-18, whose blocks
call ``relu`` twice; a shared activation and a weight-tied block), layouts and ``mean``, and
``--list-layers`` with inputs: through ``cka-extract`` and ``extract()``, every stored call checked
against a float64 forward with hooks written here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

from cka_offline.cli.extract import main  # noqa: E402
from cka_offline.errors import LayerSelectionError, ModelError  # noqa: E402
from cka_offline.extraction import extract  # noqa: E402
from cka_offline.store.reader import open_activations  # noqa: E402
from cka_offline_torch.extractor import TorchExtractor  # noqa: E402

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
sys.path.insert(0, str(SAMPLE_DATA))
import resnet18 as resnet18_factory  # noqa: E402

FACTORY = f"{SAMPLE_DATA / 'resnet18.py'}"
N = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one thread is faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def hooked_forward(model: nn.Module, x: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """Every submodule's output on every call, copied as it is returned (float64 model: float64 values)."""
    calls: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, out, name=name: calls.setdefault(name, []).append(out.detach().clone().numpy())
                )
            )
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {name: calls[name] for name, _ in model.named_modules() if name in calls}  # in model order


def reference_layers(calls: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The layer names the docs promise: NAME for a module run once, NAME:1 ... NAME:k for k calls."""
    out = {}
    for name, outputs in calls.items():
        if len(outputs) == 1:
            out[name] = outputs[0]
        else:
            out.update({f"{name}:{i}": o for i, o in enumerate(outputs, 1)})
    return out


@pytest.fixture(scope="module")
def resnet_ref():
    x = images()
    model = resnet18_factory.resnet18(width=8, num_classes=5, double=True)
    return x, reference_layers(hooked_forward(model, torch.from_numpy(x.astype(np.float64))))


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, images=images())
    return str(path)


ARGS = [f"{FACTORY}:resnet18", "--model-arg", "width=8", "--model-arg", "num_classes=5", "--model-arg", "double=true"]


def test_default_selection_of_a_resnet_stores_each_relu_call_as_the_float64_forward_gives_it(
    tmp_path, inputs, resnet_ref
):
    """No --layers: every module and every call, each equal to the hooked forward."""
    out = tmp_path / "r18.h5"
    res = CliRunner().invoke(main, [*ARGS, "-i", inputs, "-o", str(out), "-b", "4", "-q"])
    assert res.exit_code == 0, res.output
    _, ref = resnet_ref
    with open_activations(out) as f:
        names = list(f.layer_names)
        assert names == list(ref)  # model order, the root left out, each call in its place
        assert "layer1.0.relu" not in names and {"layer1.0.relu:1", "layer4.1.relu:2", "relu"} <= set(names)
        for name in names:
            want = ref[name].reshape(N, -1)
            got = f.read(name, 0, N)
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
            assert f.layer(name).original_shape == ref[name].shape[1:]
    # the two calls of one relu are different tensors (after bn1, and after the residual sum)
    assert not np.allclose(ref["layer1.0.relu:1"], ref["layer1.0.relu:2"])


def test_layer_star_is_the_four_stages_and_the_module_name_selects_its_calls(tmp_path, inputs, resnet_ref):
    _, ref = resnet_ref
    res = CliRunner().invoke(main, [*ARGS, "-i", inputs, "-o", str(tmp_path / "a.h5"), "--layers", "layer*", "-q"])
    assert res.exit_code == 0, res.output
    with open_activations(tmp_path / "a.h5") as f:
        assert list(f.layer_names) == ["layer1", "layer2", "layer3", "layer4"]
        np.testing.assert_allclose(f.read("layer4", 0, N), ref["layer4"].reshape(N, -1), rtol=1e-6, atol=1e-6)
    out = extract(
        f"{FACTORY}:resnet18",
        inputs,
        tmp_path / "b.h5",
        layers=["layer2.*.relu"],
        options={"model_args": {"width": 8, "num_classes": 5, "double": True}},
        reduction={"layer2.0.relu": "mean", "*": "flatten"},
        batch_size=3,
    )
    with open_activations(out) as f:
        assert list(f.layer_names) == ["layer2.0.relu:1", "layer2.0.relu:2", "layer2.1.relu:1", "layer2.1.relu:2"]
        assert [f.layer(n).reduction for n in f.layer_names] == ["mean", "mean", "flatten", "flatten"]
        np.testing.assert_allclose(
            f.read("layer2.0.relu:2", 0, N), ref["layer2.0.relu:2"].mean(axis=(2, 3)), rtol=1e-6, atol=1e-7
        )


def test_reduction_mean_on_a_whole_cnn_keeps_the_vectors(tmp_path, inputs, resnet_ref):
    """--reduction mean, no --layers: conv maps averaged (the hook's mean), avgpool/fc vectors kept as they are."""
    _, ref = resnet_ref
    res = CliRunner().invoke(main, [*ARGS, "-i", inputs, "-o", str(tmp_path / "m.h5"), "--reduction", "mean", "-q"])
    assert res.exit_code == 0, res.output
    with open_activations(tmp_path / "m.h5") as f:
        reductions = {n: f.layer(n).reduction for n in f.layer_names}
        assert reductions["fc"] == "none" and reductions["layer3.1.relu:2"] == "mean"
        assert reductions["avgpool"] == "mean"  # (C, 1, 1): a map with one position
        for name in f.layer_names:
            r = ref[name]
            want = r.reshape(N, -1) if r.ndim == 2 else r.mean(axis=tuple(range(2, r.ndim)))
            np.testing.assert_allclose(f.read(name, 0, N), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_list_layers_with_inputs_shows_shapes_runs_and_the_default(inputs):
    res = CliRunner().invoke(main, [*ARGS, "--list-layers", "-i", inputs])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()}
    assert rows["LAYER"] == ["LAYER", "KIND", "SHAPE", "RUNS", "DEFAULT", "ALIASES"]
    assert rows["layer1.0.relu:1"][:6] == ["layer1.0.relu:1", "ReLU", "(8,", "8,", "8)", "1"]
    assert " ".join(rows["layer1.0.relu:2"][5:]) == "2 of 2 *"
    assert " ".join(rows["fc"][1:]) == "Linear (5) 1 *"
    assert "layer1.0.relu" not in rows
    assert "probe batch of 10 inputs" in res.stderr
    bare = CliRunner().invoke(main, [*ARGS, "--list-layers"])
    assert bare.exit_code == 0
    assert bare.stdout.splitlines()[0].split() == ["LAYER", "KIND", "SHAPE", "ALIASES"]
    assert "layer1.0.relu " in bare.stdout and "?" in bare.stdout  # today's listing, no probe
    assert "give --inputs to see each layer's shape" in bare.stderr


# ------------------------------------------------------------------------ shared and tied modules


def test_a_shared_activation_and_a_tied_block_give_each_call(tmp_path):
    x = np.random.default_rng(3).normal(size=(9, 5)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    ref = reference_layers(hooked_forward(resnet18_factory.shared(double=True), torch.from_numpy(x.astype(np.float64))))
    opts = {"model_args": {"double": True}}
    out = extract(f"{FACTORY}:shared", tmp_path / "x.npz", tmp_path / "s.h5", options=opts, batch_size=4)
    with open_activations(out) as f:
        assert list(f.layer_names) == list(ref)
        assert set(ref) == {"inp", "act:1", "act:2", "act:3", "tied:1", "tied:2"} | {
            f"tied.{i}:{c}" for i in (0, 1) for c in (1, 2)
        } | {"out"}
        for name in f.layer_names:
            np.testing.assert_allclose(f.read(name, 0, 9), ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    out = extract(
        f"{FACTORY}:shared", tmp_path / "x.npz", tmp_path / "t.h5", options=opts, layers=["act"], reduction="mean"
    )
    with open_activations(out) as f:
        assert list(f.layer_names) == ["act:1", "act:2", "act:3"]
        assert {f.layer(n).reduction for n in f.layer_names} == {"none"}  # vectors: nothing to average
        np.testing.assert_allclose(f.read("act:3", 0, 9), ref["act:3"], rtol=1e-6, atol=1e-7)


def test_conformance_with_per_call_layers():
    """check_extractor runs the probed layers: every call of the shared GELU and of the tied block."""
    from cka_offline.testing import check_extractor

    x = {"x": np.random.default_rng(4).normal(size=(4, 5)).astype(np.float32)}
    checked = check_extractor(TorchExtractor, f"{FACTORY}:shared", x)
    assert {"act:1", "act:2", "act:3", "tied:2", "tied.0:1"} <= set(checked)


class Looped(nn.Module):
    """Runs ``step`` once per nonzero in the first input's first value: calls that depend on the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(2, 2)

    def forward(self, x):
        for _ in range(int(x[0, 0].item())):
            x = self.step(x)
        return x


def test_calls_that_change_from_batch_to_batch_are_an_error(tmp_path):
    with TorchExtractor(Looped()) as ex:
        infos = {i.name: i for i in ex.probe({"x": np.full((2, 2), 2.0, np.float32)})}
        assert infos["step:2"].runs == 2 and infos["step:2"].group == "step"
        with pytest.raises(
            ModelError, match=r"'step:1' .* call 1 of module 'step', which ran 3 time\(s\) .* but 2 times in the first"
        ):
            ex.run({"x": np.full((2, 2), 3.0, np.float32)}, ["step:1", "step:2"])
    with TorchExtractor(Looped()) as ex:
        infos = {i.name: i for i in ex.probe({"x": np.zeros((2, 2), np.float32)})}
        assert not infos["step"].exposable and "did not run" in infos["step"].reason and infos["step"].runs == 0


def test_a_call_name_that_is_a_real_module_name_is_refused():
    model = nn.Module()
    model.act = nn.ReLU()
    model.add_module("act:2", nn.Identity())
    model.forward = lambda x: model.act(model.act(x))
    with TorchExtractor(model) as ex, pytest.raises(ModelError, match=r"its call 2 would be the layer 'act:2'"):
        ex.probe({"x": np.ones((2, 3), np.float32)})


# ------------------------------------------------------------------------ layouts decide 'mean'


class Mixed(nn.Module):
    """(B, C, L) from Conv1d, (B, T, D) from an embedding + transformer layer, and a custom 2-D output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.embed = nn.Embedding(11, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.post = nn.Sequential(nn.LayerNorm(8), nn.GELU())
        self.odd = Outer()

    def forward(self, signal, input_ids, attention_mask):
        c = self.bn(self.conv(signal))
        h = self.post(self.block(self.embed(input_ids), src_key_padding_mask=attention_mask == 0))
        return c.sum() + h.sum() + self.odd(c).sum()


class Outer(nn.Module):
    def forward(self, c):
        return torch.cat([c, c], dim=1)  # a 2-D per-example output that no module class explains


def test_mean_follows_each_layer_s_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    n, t = 7, 6
    mask = np.ones((n, t), np.int64)
    mask[:, 4:] = 0
    mask[0, 2:] = 0
    data = {
        "signal": rng.normal(size=(n, 2, 9)).astype(np.float32),
        "input_ids": rng.integers(1, 11, size=(n, t)),
        "attention_mask": mask,
    }
    np.savez(tmp_path / "in.npz", **data)
    model = Mixed().eval()
    with TorchExtractor(model) as ex:
        layouts = {i.name: i.layout for i in ex.layers()}
    assert layouts["conv"] == layouts["bn"] == "channels_first"
    assert layouts["embed"] == layouts["block"] == layouts["post.1"] == "tokens_first"  # the GELU by its parent
    assert layouts["odd"] == ""
    layers = ["conv", "bn", "block", "post.1", "post"]
    out = extract(model, tmp_path / "in.npz", tmp_path / "a.h5", layers=layers, reduction="mean", batch_size=3)
    ref = {}
    handles = [
        dict(model.named_modules())[name].register_forward_hook(
            lambda m, a, o, name=name: ref.__setitem__(name, o.detach().double().numpy())
        )
        for name in layers
    ]
    with torch.no_grad():
        model(*(torch.from_numpy(data[k]) for k in ("signal", "input_ids", "attention_mask")))
    for h in handles:
        h.remove()
    with open_activations(out) as f:
        assert {n: f.layer(n).reduction for n in layers} == {
            "conv": "mean",
            "bn": "mean",
            "block": "token_mean",
            "post.1": "token_mean",
            "post": "token_mean",
        }
        for name in ("conv", "bn"):  # (C, L): the mean over L
            np.testing.assert_allclose(f.read(name, 0, n), ref[name].mean(axis=2), rtol=1e-5, atol=1e-6)
        for name in ("block", "post.1", "post"):  # (T, D): the mean over the real tokens
            want = np.stack([ref[name][i][mask[i] == 1].mean(axis=0) for i in range(n)])
            np.testing.assert_allclose(f.read(name, 0, n), want, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(LayerSelectionError, match=r"'mean' is ambiguous for layer 'odd'.*'odd=token_mean'"):
        extract(model, tmp_path / "in.npz", tmp_path / "b.h5", layers=["odd"], reduction="mean")
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "b.h5.partial").exists()
