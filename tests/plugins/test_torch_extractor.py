"""The torch extractor on tiny models built here: factories, layers, hooks, outputs, inputs, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import cka_offline_torch  # noqa: E402
from cka_offline.errors import DeviceError, InputError, ModelError, OptionError  # noqa: E402
from cka_offline.registry import find_extractor, get_extractor  # noqa: E402
from cka_offline_torch.extractor import TorchExtractor  # noqa: E402
from cka_offline_torch.sources import parse_literal, parse_model_args  # noqa: E402

FACTORY_SOURCE = """
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, width=4, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.9)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.drop(self.pool(self.features(x)).flatten(1)))


def make(width=4, seed=0, classes=3):
    torch.manual_seed(seed)
    model = TinyCNN(width, classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def broken():
    raise ValueError("no weights for this width")


def not_a_model():
    return {"weights": 1}


NUMBER = 3
"""

CNN_LAYERS = [
    ("features", "Sequential"),
    ("features.0", "Conv2d"),
    ("features.1", "BatchNorm2d"),
    ("features.2", "ReLU"),
    ("features.3", "Conv2d"),
    ("features.4", "BatchNorm2d"),
    ("features.5", "ReLU"),
    ("pool", "AdaptiveAvgPool2d"),
    ("drop", "Dropout"),
    ("head", "Linear"),
]


@pytest.fixture
def torch_factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_factory.py"
    path.write_text(FACTORY_SOURCE)
    return path


def load_reference_module(path: Path, name: str = "torch_reference_factory"):
    """The factory file imported independently of the extractor."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cnn_reference(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Eval-mode outputs of the TinyCNN written out with torch.nn.functional (no hooks, no modules)."""
    f = model.features
    with torch.no_grad():
        t = torch.from_numpy(x.astype(np.float32))
        out = {}
        c0 = F.conv2d(t, f[0].weight, f[0].bias, padding=1)
        b1 = F.batch_norm(c0, f[1].running_mean, f[1].running_var, f[1].weight, f[1].bias, False, 0.0, f[1].eps)
        r2 = b1.clamp_min(0)
        c3 = F.conv2d(r2, f[3].weight, f[3].bias)
        b4 = F.batch_norm(c3, f[4].running_mean, f[4].running_var, f[4].weight, f[4].bias, False, 0.0, f[4].eps)
        r5 = b4.clamp_min(0)
        pool = r5.mean(dim=(2, 3), keepdim=True)
        head = pool.flatten(1) @ model.head.weight.T + model.head.bias
        for name, value in [
            ("features.0", c0),
            ("features.1", b1),
            ("features.2", r2),
            ("features.3", c3),
            ("features.4", b4),
            ("features.5", r5),
            ("features", r5),
            ("pool", pool),
            ("head", head),
        ]:
            out[name] = value.numpy()
    return out


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 6, 6))  # float64 on purpose


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def extractor_for(model: nn.Module, monkeypatch: pytest.MonkeyPatch, **options) -> TorchExtractor:
    """An extractor over an in-memory model, through a factory in a throwaway module."""
    module = type(sys)("torch_inline_models")
    module.make = lambda: model
    monkeypatch.setitem(sys.modules, "torch_inline_models", module)
    return TorchExtractor("torch_inline_models:make", options=options)


# ------------------------------------------------------------------------------------------ registration


def test_registered_through_the_entry_point():
    assert get_extractor("torch") is TorchExtractor
    assert find_extractor("model.pt2") is TorchExtractor
    assert find_extractor("models/net.py:make") is TorchExtractor
    assert TorchExtractor.framework == "torch" and TorchExtractor.description
    assert {"model_args", "weights", "output_index", "allow_pickle_code_execution", "keep_dtype", "copy_outputs"} <= {
        o.name for o in TorchExtractor.declared_options
    }
    assert cka_offline_torch.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("model.pt2", True),
        ("net.PT", True),
        ("net.pth", True),
        ("dir/file.py:make", True),
        ("my_pkg.models:resnet18", True),
        ("pkg.mod:Class.build", True),
        ("w.safetensors", True),
        ("model.onnx", False),
        ("inputs.npz", False),
        ("acts.h5", False),
        ("file.py", False),
        ("pkg.mod", False),
    ],
)
def test_can_open_judges_by_spelling(source, expected):
    assert TorchExtractor.can_open(source) is expected


def test_plugin_import_does_not_import_torch():
    code = (
        "import sys, cka_offline_torch.plugin as p\n"
        "cls = p.cka_extractors()[0]\n"
        "assert cls.can_open('m.pt2') and cls.can_open('a.py:make')\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ factories, layers


def test_factory_file_layers_in_model_order(torch_factory_file):
    with TorchExtractor(f"{torch_factory_file}:make") as ex:
        layers = ex.layers()
        assert [(info.name, info.kind) for info in layers] == CNN_LAYERS
        assert all(info.shape is None and info.aliases == () and info.exposable for info in layers)
        assert ex.input_names() == ["x"]


def test_run_matches_functional_reference(torch_factory_file):
    x = images(5)
    reference = cnn_reference(load_reference_module(torch_factory_file).make(width=4, seed=1), x)
    with TorchExtractor(f"{torch_factory_file}:make", options={"model_args": {"seed": "1"}}) as ex:
        got = ex.run({"ids": np.arange(5), "images": x}, list(reference))
    assert list(got) == list(reference)
    for name, want in reference.items():
        assert got[name].dtype == np.float32
        assert_close(got[name], want)
    # BatchNorm output is captured before the in-place ReLU overwrote it
    assert (got["features.1"] < 0).any()


def test_only_outputs_changed_in_place_are_copied(torch_factory_file):
    x = images(5)
    with TorchExtractor(f"{torch_factory_file}:make") as ex:
        names = [name for name, _ in CNN_LAYERS]
        got = ex.run({"x": x}, names)
        # the BatchNorm outputs are what the in-place ReLUs overwrite; nothing else needed a copy
        assert ex._copied == {"features.1", "features.4"}
        again = ex.run({"x": x}, names)  # now copied at hook time, no second pass
    with TorchExtractor(f"{torch_factory_file}:make", options={"copy_outputs": "true"}) as ex:
        copied = ex.run({"x": x}, names)
        assert ex._copied == set()
    for name in names:
        np.testing.assert_array_equal(got[name], copied[name], err_msg=name)
        np.testing.assert_array_equal(again[name], copied[name], err_msg=name)


def test_mean_taken_in_the_hook_matches_the_functional_reference(torch_factory_file):
    """reduce_early("mean"): the spatial mean is taken in the forward hook, before the in-place ReLU that
    follows a BatchNorm overwrites its output, so no copy and no rerun are needed; other layers unchanged."""
    x = images(5)
    reference = cnn_reference(load_reference_module(torch_factory_file).make(width=4, seed=1), x)
    maps = [name for name, want in reference.items() if want.ndim == 4]
    with TorchExtractor(f"{torch_factory_file}:make", options={"model_args": {"seed": "1"}}) as ex:
        assert "mean" in ex.early_reductions
        assert sorted(ex.reduce_early({name: "mean" for name in maps})) == sorted(maps)
        got = ex.run({"images": x}, list(reference))
        assert ex._copied == set()  # nothing to copy: the means were taken in the hooks
    for name, want in reference.items():
        if name in maps:
            assert got[name].shape == want.shape[:2] and got[name].dtype == np.float32
            np.testing.assert_allclose(
                got[name], want.astype(np.float64).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6, err_msg=name
            )
        else:
            assert_close(got[name], want)
    # the BatchNorm's mean was taken before the in-place ReLU: it differs from the ReLU's mean
    assert np.abs(got["features.1"] - got["features.2"]).max() > 1e-2


def test_cka_extract_takes_torch_means_in_the_hooks_with_the_core_s_numbers(torch_factory_file, tmp_path):
    """Through extract() (which asks the plugin to reduce after the first batch and runs that batch again):
    every stored row is the functional reference's spatial mean, to float32 rounding, including the rows of
    the first batch and of a last, shorter batch; the file records the unreduced per-example shape."""
    from cka_offline.extraction import extract
    from cka_offline.store.reader import open_activations

    x = images(23, seed=4)
    np.savez(tmp_path / "in.npz", images=x)
    out = extract(
        f"{torch_factory_file}:make",
        tmp_path / "in.npz",
        tmp_path / "a.h5",
        batch_size=4,
        reduction="mean",
        layers=["features.0", "features.1", "features.2"],
    )
    reference = cnn_reference(load_reference_module(torch_factory_file).make(), x)
    with open_activations(out) as f:
        for name in f.layer_names:
            assert f.layer(name).original_shape == reference[name].shape[1:]
            np.testing.assert_allclose(
                f.read(name, 0, 23),
                reference[name].astype(np.float64).mean(axis=(2, 3)),
                rtol=1e-5,
                atol=1e-6,
                err_msg=name,
            )


class InPlaceAfterwards(nn.Module):
    """Outputs that later ops change in place: a residual ``+=``, a write into a slice (a view), ``out=``,
    and a module that runs under inference_mode inside the forward (its tensors have no version counter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Linear(4, 4)
        self.shortcut = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4)
        self.last = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)

    def forward(self, x):
        out = self.block(x)
        out += self.shortcut(x)  # changes block's output
        p = self.proj(out)
        p[:, :2].mul_(-3.0)  # changes proj's output through a view
        q = self.last(p)
        torch.add(q, 1.0, out=q)  # changes last's output through out=
        with torch.inference_mode():
            f = self.frozen(q.clone())
            f.relu_()
        return f.clone()


def test_outputs_changed_in_place_match_a_functional_reference(monkeypatch):
    model = InPlaceAfterwards().eval()
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x)
        block = F.linear(t, model.block.weight, model.block.bias)
        shortcut = F.linear(t, model.shortcut.weight, model.shortcut.bias)
        proj = F.linear(block + shortcut, model.proj.weight, model.proj.bias)
        scaled = proj * torch.tensor([-3.0, -3.0, 1.0, 1.0])
        last = F.linear(scaled, model.last.weight, model.last.bias)
        frozen = F.linear(last + 1.0, model.frozen.weight, model.frozen.bias)
    expected = {"block": block, "shortcut": shortcut, "proj": proj, "last": last, "frozen": frozen}
    with extractor_for(model, monkeypatch) as ex:
        for _ in range(2):  # the first batch finds the overwritten outputs, the second copies them at once
            got = ex.run({"x": x}, list(expected))
            for name, want in expected.items():
                np.testing.assert_allclose(got[name], want.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
        assert ex._copied == {"block", "proj", "last"}


def test_copy_outputs_covers_writes_that_bypass_the_version_counter(monkeypatch):
    class WritesThroughData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            y = self.fc(x)
            y.data.zero_()  # .data has its own version counter: the change is invisible to torch
            return y

    model = WritesThroughData().eval()
    x = np.ones((2, 3), np.float32)
    with torch.no_grad():
        want = model.fc(torch.from_numpy(x)).numpy()
    with extractor_for(model, monkeypatch, copy_outputs=True) as ex:
        np.testing.assert_allclose(ex.run({"x": x}, ["fc"])["fc"], want, rtol=1e-6)


def test_dropout_is_off_in_eval_mode(torch_factory_file):
    with TorchExtractor(f"{torch_factory_file}:make") as ex:
        first = ex.run({"x": images(4)}, ["drop", "head"])
        second = ex.run({"x": images(4)}, ["drop", "head"])
        pooled = ex.run({"x": images(4)}, ["pool"])["pool"]
    np.testing.assert_array_equal(first["head"], second["head"])
    np.testing.assert_array_equal(first["drop"], pooled.reshape(4, -1))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e-3", 1e-3),
        ("True", True),
        ("false", False),
        ("None", None),
        ("null", None),
        ("(1, 2)", (1, 2)),
        ("[3]", [3]),
        ("'q'", "q"),
        ("relu", "relu"),
        ("a b", "a b"),
        ("", ""),
    ],
)
def test_model_args_literal_parser(text, value):
    assert parse_literal(text) == value and type(parse_literal(text)) is type(value)


def test_model_args_forms():
    assert parse_model_args({"width": "8", "name": "x"}) == {"width": 8, "name": "x"}
    assert parse_model_args("width=8, act=gelu") == {"width": 8, "act": "gelu"}
    assert parse_model_args('{"width": 8}') == {"width": 8}
    with pytest.raises(ModelError, match="is not key=value"):
        parse_model_args("width")


def test_model_args_reach_the_factory(torch_factory_file):
    options = {"model_args": {"width": "6", "classes": "2"}}
    with TorchExtractor(f"{torch_factory_file}:make", options=options) as ex:
        out = ex.run({"x": images(3)}, ["features.0", "head"])
        provenance = ex.provenance()
    assert out["features.0"].shape == (3, 6, 6, 6) and out["head"].shape == (3, 2)
    assert json.loads(provenance["model_args"]) == {"width": 6, "classes": 2}


def test_module_factory_and_provenance(torch_factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(torch_factory_file.parent))
    monkeypatch.delitem(sys.modules, "tiny_factory", raising=False)
    with TorchExtractor("tiny_factory:make") as ex:
        assert [info.name for info in ex.layers()][:2] == ["features", "features.0"]
        prov = ex.provenance()
    assert prov["framework"] == "torch" and prov["framework_version"] == torch.__version__
    assert prov["model"] == "tiny_factory:make"
    # the identity covers the factory's code (docs: identity.py) and the model's parameters and buffers
    assert (
        prov["model_code_sha256"]
        == hashlib.sha256(hashlib.sha256(torch_factory_file.read_bytes()).hexdigest().encode()).hexdigest()
    )
    assert len(prov["model_sha256"]) == 64 and len(prov["model_state_sha256"]) == 64
    assert prov["factory_file"] == str(torch_factory_file)
    assert all(isinstance(v, str) for v in prov.values())


# ------------------------------------------------------------------------------------------ outputs


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class Keyed(nn.Module):
    def forward(self, x):
        return {"first": x - 1, "second": x * 3}


class WithModelOutput(nn.Module):
    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=x * 5, attentions=(x * 7,))


class MultiOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.keyed, self.out = Pair(), Keyed(), WithModelOutput()

    def forward(self, x):
        a, _ = self.pair(x)
        self.keyed(x)
        return self.out(a)


def test_tuple_dict_and_model_output_take_the_first_tensor(monkeypatch):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with extractor_for(MultiOutput(), monkeypatch) as ex:
        got = ex.run({"x": x}, ["pair", "keyed", "out"])
    np.testing.assert_array_equal(got["pair"], x * 2)
    np.testing.assert_array_equal(got["keyed"], x - 1)
    np.testing.assert_array_equal(got["out"], x * 2 * 5)


def test_output_index_picks_another_element(monkeypatch):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with extractor_for(MultiOutput(), monkeypatch, output_index="1") as ex:
        got = ex.run({"x": x}, ["pair", "keyed"])
    np.testing.assert_array_equal(got["pair"], x + 1)
    np.testing.assert_array_equal(got["keyed"], x * 3)
    with extractor_for(MultiOutput(), monkeypatch, output_index="second") as ex:
        np.testing.assert_array_equal(ex.run({"x": x}, ["keyed"])["keyed"], x * 3)
    with extractor_for(MultiOutput(), monkeypatch, output_index="last_hidden_state") as ex:
        np.testing.assert_array_equal(ex.run({"x": x}, ["out"])["out"], x * 10)


@pytest.mark.parametrize(
    ("index", "layer", "match"),
    [
        (5, "pair", r"output_index=5 does not fit the output of layer 'pair', which is tuple of 2"),
        ("third", "keyed", r"output_index='third' does not fit .*keys \['first', 'second'\]"),
        ("second", "pair", r"output_index='second' does not fit"),
        (1, "out", r"picks a tuple from layer 'out'"),
    ],
)
def test_output_index_errors(monkeypatch, index, layer, match):
    with extractor_for(MultiOutput(), monkeypatch, output_index=index) as ex:
        with pytest.raises(ModelError, match=match):
            ex.run({"x": np.ones((2, 4), np.float32)}, [layer])


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.also_act = self.act  # the same module under a second name
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.unused = nn.Linear(4, 4)
        self.total = Summed()

    def forward(self, x):
        for block in self.blocks:
            x = self.act(block(x))
        self.total(x)
        return x


class Summed(nn.Module):
    def forward(self, x):
        return x.sum(0)


def test_aliases_and_containers_in_layers(monkeypatch):
    with extractor_for(Shared(), monkeypatch) as ex:
        infos = {info.name: info for info in ex.layers()}
    assert list(infos) == ["act", "blocks", "blocks.0", "blocks.1", "unused", "total"]
    assert infos["act"].aliases == ("also_act",)
    assert not infos["blocks"].exposable and "ModuleList" in infos["blocks"].reason
    assert infos["blocks.0"].exposable


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (["act"], r"layer 'act' .* ran 2 times in one forward pass.*a layer of its own: 'act:1', 'act:2'"),
        (["act:3"], r"layer 'act:3' .* is call 3 of module 'act', which ran 2 time\(s\)"),
        (["blocks.0:1"], r"layer 'blocks.0:1' .* is call 1 of module 'blocks.0', which ran 1 time\(s\)"),
        (["blocks"], r"layer\(s\) 'blocks' .* produced no output"),
        (["unused", "blocks.0"], r"layer\(s\) 'unused' .* produced no output"),
        (["total"], r"layer 'total' .* returned shape \(4,\), whose first axis is not the batch \(3 examples\)"),
        (["blocks.7"], r"unknown layer\(s\) 'blocks.7' .*'blocks.1'\?.*--list-layers"),
        ([""], r"unknown layer\(s\) ''"),
    ],
)
def test_layer_errors(monkeypatch, layers, match):
    model = Shared()
    with extractor_for(model, monkeypatch) as ex:
        with pytest.raises(ModelError, match=match):
            ex.run({"x": np.ones((3, 4), np.float32)}, layers)
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_after_success_and_failure(torch_factory_file):
    with TorchExtractor(f"{torch_factory_file}:make") as ex:
        model = ex._load()
        ex.run({"x": images(2)}, ["features.0", "head"])
        assert all(not m._forward_hooks for m in model.modules())
        with pytest.raises(
            ModelError, match=r"forward pass of .* failed on a batch of 2 \(x: \(2, 5, 6, 6\) float64\)"
        ):
            ex.run({"x": np.zeros((2, 5, 6, 6))}, ["features.0", "head"])
        assert all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------ inputs


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.mix = nn.Identity()
        self.seen: list = []

    def forward(self, input_ids, attention_mask, scale=1.0):
        self.seen.append((input_ids.dtype, attention_mask.dtype))
        return self.mix(self.embed(input_ids) * attention_mask[..., None] * scale)


def test_named_inputs_go_by_keyword_and_ids_is_dropped(monkeypatch):
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int32)
    model = TwoInputs()
    with extractor_for(model, monkeypatch) as ex:
        assert ex.input_names() is None  # optional parameters: run() matches arrays by name
        got = ex.run({"attention_mask": mask, "ids": np.array(["a", "b"]), "input_ids": ids}, ["embed", "mix"])
    assert model.seen == [(torch.int64, torch.int32)]  # integer inputs keep their dtype
    with torch.no_grad():
        want = model.embed(torch.from_numpy(ids)).numpy()
    np.testing.assert_array_equal(got["embed"], want)
    np.testing.assert_array_equal(got["mix"], want * mask[..., None])


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (
            {"input_ids": 1, "mask": 1},
            r"input\(s\) 'mask' are not accepted by forward\(input_ids, attention_mask, scale=\.\.\.\)",
        ),
        (
            {"input_ids": 1},
            r"forward\(input_ids, attention_mask, scale=\.\.\.\) of .* requires 'attention_mask' but the inputs are 'input_ids'",
        ),
        ({"tokens": 1}, r"requires 'attention_mask'"),
        ({"ids": 1}, r"holds no model input \(only 'ids'\)"),
    ],
)
def test_input_mismatch_errors(monkeypatch, inputs, match):
    arrays = {name: np.ones((2, 3), np.int64) for name in inputs}
    with extractor_for(TwoInputs(), monkeypatch) as ex:
        with pytest.raises(InputError, match=match):
            ex.run(arrays, ["embed"])


class Required(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Identity()

    def forward(self, a, b):
        return self.out(a - b)


def test_input_names_only_when_every_parameter_is_required(monkeypatch):
    with extractor_for(Required(), monkeypatch) as ex:
        assert ex.input_names() == ["a", "b"]
        got = ex.run({"b": np.ones((2, 1)), "a": np.zeros((2, 1))}, ["out"])
    np.testing.assert_array_equal(got["out"], -np.ones((2, 1), np.float32))
    with extractor_for(nn.Sequential(nn.Identity()), monkeypatch) as ex:
        assert ex.input_names() == ["input"]


class KeywordOnly(nn.Module):
    def forward(self, *, pixels):
        return pixels


def test_single_input_is_positional_unless_forward_takes_none(monkeypatch):
    with extractor_for(nn.Sequential(nn.Identity()), monkeypatch) as ex:
        got = ex.run({"arr_0": np.ones((2, 3), np.float64)}, ["0"])
    assert got["0"].dtype == np.float32
    with extractor_for(nn.Sequential(KeywordOnly()), monkeypatch) as ex:
        with pytest.raises(ModelError, match="forward pass"):
            ex.run({"arr_0": np.ones((2, 3))}, ["0"])
    with extractor_for(KeywordOnly(), monkeypatch) as ex:
        with pytest.raises(InputError, match=r"'arr_0' does not match forward\(pixels\).*takes no positional"):
            ex.run({"arr_0": np.ones((2, 3))}, [])


def test_input_dtypes(monkeypatch):
    with extractor_for(nn.Sequential(nn.Identity()), monkeypatch, keep_dtype="true") as ex:
        assert ex.run({"x": np.ones((2, 3))}, ["0"])["0"].dtype == np.float64
        with pytest.raises(InputError, match=r"input 'x' has dtype <U1"):
            ex.run({"x": np.array([["a"], ["b"]])}, ["0"])
    with extractor_for(nn.Sequential(nn.Linear(3, 2)).double(), monkeypatch) as ex:
        assert ex.run({"x": np.ones((2, 3), np.float16)}, ["0"])["0"].dtype == np.float64  # the model's dtype
    with extractor_for(nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16), monkeypatch) as ex:
        assert ex.run({"x": np.ones((2, 3))}, ["0"])["0"].dtype == np.float32  # numpy has no bfloat16


def test_keep_dtype_float64_into_float32_model_fails_clearly(torch_factory_file):
    with TorchExtractor(f"{torch_factory_file}:make", options={"keep_dtype": True}) as ex:
        with pytest.raises(ModelError, match="forward pass .* failed"):
            ex.run({"x": images(2)}, ["head"])


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_device_error(torch_factory_file):
    with pytest.raises(DeviceError, match=r"device 'cuda:1' requested but CUDA is not available.*--device cpu"):
        TorchExtractor(f"{torch_factory_file}:make", device="cuda:1")
    with TorchExtractor(f"{torch_factory_file}:make", device="auto") as ex:
        assert ex.provenance()["device"] == "cpu"


def test_unknown_device(torch_factory_file):
    with pytest.raises(DeviceError, match=r"unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        TorchExtractor(f"{torch_factory_file}:make", device="tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(torch_factory_file):
    x = images(4)
    layers = [name for name, _ in CNN_LAYERS]
    with TorchExtractor(f"{torch_factory_file}:make") as ex:
        want = ex.run({"x": x}, layers)
    with TorchExtractor(f"{torch_factory_file}:make", device="cuda") as ex:
        got = ex.run({"x": x}, layers)
        assert ex.provenance()["device"].startswith("cuda")
    for name in layers:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    with pytest.raises(DeviceError, match="does not exist"):
        TorchExtractor(f"{torch_factory_file}:make", device=f"cuda:{torch.cuda.device_count()}")


# ------------------------------------------------------------------------------------------ factory errors


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("no_such_pkg_xyz.models:make", {}, r"cannot import module 'no_such_pkg_xyz.models' .*PYTHONPATH"),
        ("{dir}/missing.py:make", {}, r"factory file '.*missing.py' .* does not exist"),
        ("{file}:mak", {}, r"has no attribute 'mak' .*did you mean make"),
        ("{file}:NUMBER", {}, r"'NUMBER' in .* is a int, not a callable factory"),
        ("{file}:broken", {}, r"factory '.*:broken' raised ValueError: no weights for this width"),
        (
            "{file}:make",
            {"model_args": {"depth": "3"}},
            r"raised TypeError: .*'depth'.*called with model_args: depth=3",
        ),
        ("{file}:not_a_model", {}, r"returned a builtins.dict, not a torch.nn.Module"),
    ],
)
def test_factory_errors(torch_factory_file, spec, options, match):
    source = spec.format(dir=torch_factory_file.parent, file=torch_factory_file)
    with pytest.raises(ModelError, match=match):
        TorchExtractor(source, options=options).layers()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"weight": "w.pt"}, r"unknown option\(s\) weight for the torch extractor; known: model_args, weights"),
        ({"allow_pickle_code_execution": "maybe"}, r"allow_pickle_code_execution='maybe' is not a boolean"),
    ],
)
def test_option_errors(torch_factory_file, options, match):
    with pytest.raises(OptionError, match=match):
        TorchExtractor(f"{torch_factory_file}:make", options=options)


def test_factory_file_that_fails_to_import(tmp_path):
    path = tmp_path / "bad_factory.py"
    path.write_text("import no_such_module_for_cka_tests\n")
    with pytest.raises(ModelError, match=r"factory file '.*bad_factory.py' failed to run: ModuleNotFoundError"):
        TorchExtractor(f"{path}:make").layers()


def test_factory_file_imports_its_siblings(tmp_path):
    (tmp_path / "sibling_blocks_for_cka.py").write_text("from torch import nn\nBlock = nn.Tanh\n")
    (tmp_path / "uses_sibling.py").write_text(
        "from torch import nn\nfrom sibling_blocks_for_cka import Block\n"
        "def make():\n    return nn.Sequential(Block())\n"
    )
    with TorchExtractor(f"{tmp_path / 'uses_sibling.py'}:make") as ex:
        assert [(i.name, i.kind) for i in ex.layers()] == [("0", "Tanh")]
    assert str(tmp_path) not in sys.path


def test_conformance(torch_factory_file):
    from cka_offline.testing import check_extractor

    checked = check_extractor(TorchExtractor, f"{torch_factory_file}:make", {"x": images(4).astype(np.float32)})
    assert checked == [name for name, _ in CNN_LAYERS]


def test_module_factory_in_the_current_folder(tmp_path, monkeypatch):
    package = tmp_path / "cwd_torch_factory_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from torch import nn\ndef make():\n    return nn.Sequential(nn.GELU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_torch_factory_pkg", raising=False)
    with TorchExtractor("cwd_torch_factory_pkg:make") as ex:  # as `python -m` would find it
        assert [(i.name, i.kind) for i in ex.layers()] == [("0", "GELU")]
    assert str(tmp_path) not in sys.path
