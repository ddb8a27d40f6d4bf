"""extract(): a numpy toy model run through the whole pipeline, compared with direct float64 computation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cka_offline.errors import (
    ActivationValueError,
    InputError,
    LayerSelectionError,
    ModelError,
    OutputError,
    PluginError,
    ResumeError,
)
from cka_offline.extraction import extract, shard_range
from cka_offline.extractor import Extractor, LayerInfo, Option
from cka_offline.hookspecs import hookimpl
from cka_offline.inputs import NpyInputs
from cka_offline.registry import get_plugin_manager
from cka_offline.store.reader import open_activations

N, T, D, H, K = 23, 5, 4, 6, 3
RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(D, H))
W2 = RNG.normal(size=(H, K))


def forward(x: np.ndarray) -> dict[str, np.ndarray]:
    """The toy model in float64: the reference the stored activations are compared with."""
    embed = x.astype(np.float64) @ W1  # (B, T, H)
    relu = np.maximum(embed, 0.0)
    return {
        "embed": embed,
        "relu": relu,
        "conv": relu.transpose(0, 2, 1)[..., None] * np.ones(2),  # (B, H, T, 2): a "conv map"
        "head": relu.mean(axis=1) @ W2,  # (B, K)
    }


class ToyExtractor(Extractor):
    name = "toy"
    framework = "numpy"
    description = "*.toy: the test's numpy model"
    declared_options = (
        Option("scale", float, 1.0, "unused: an option that changes the resume fingerprint"),
        Option("bad", str, None, "which contract violation to commit (missing, batch, shape, early_shape)"),
        Option("default_inputs", str, None, "an .npz that default_inputs() opens"),
    )
    calls = 0  # forward passes, counted to show resume skips finished batches

    @classmethod
    def can_open(cls, source: str) -> bool:
        return source.endswith(".toy")

    def layers(self) -> list[LayerInfo]:
        return [
            LayerInfo("embed", "MatMul", (None, H), aliases=("encoder.embed",)),
            LayerInfo("relu", "Relu", (None, H)),
            LayerInfo("conv", "Conv", (H, None, 2)),
            LayerInfo("head", "MatMul", (K,)),
        ]

    def input_names(self) -> list[str]:
        return ["x"]

    def default_inputs(self):
        path = self.options.get("default_inputs")
        return NpyInputs(path) if path else None

    def run(self, inputs, layers):
        type(self).calls += 1
        out = {k: v.astype(np.float32) for k, v in forward(inputs["x"]).items() if k in layers}
        bad = self.options.get("bad")
        if bad == "missing":
            out.pop(layers[0])
        elif bad == "batch":
            out[layers[0]] = out[layers[0]][:1]
        elif bad == "shape" and type(self).calls > 1:
            out[layers[0]] = out[layers[0]][:, :, :2]
        return out

    def provenance(self):
        return {
            "framework": "numpy",
            "framework_version": np.__version__,
            "model": self.source,
            "model_sha256": "",
            "seed": "0",
        }


class OtherToyExtractor(ToyExtractor):
    name = "toy2"


class Plugin:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def cka_extractors(self):
        return list(self.classes)


@pytest.fixture
def pm():
    return get_plugin_manager(entry_points=False, plugins=[Plugin(ToyExtractor)])


@pytest.fixture
def data(tmp_path):
    x = RNG.normal(size=(N, T, D)).astype(np.float32)
    mask = np.ones((N, T), dtype=np.int64)
    lengths = RNG.integers(1, T + 1, size=N)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    ids = np.arange(100, 100 + N)
    path = tmp_path / "in.npz"
    np.savez(path, x=x, attention_mask=mask, ids=ids)
    return {"path": str(path), "x": x, "mask": mask, "ids": ids}


def read_all(path: str) -> dict[str, np.ndarray]:
    with open_activations(path) as f:
        return {name: f.read(name, 0, f.n_examples) for name in f.layer_names}


def test_flatten_matches_direct_computation(tmp_path, data, pm):
    out = extract(
        "m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, batch_size=4, command="cka-extract m.toy"
    )
    ref = forward(data["x"])
    with open_activations(out) as f:
        assert f.layer_names == ["embed", "relu", "conv", "head"]
        np.testing.assert_array_equal(f.ids, data["ids"])
        for name in f.layer_names:
            np.testing.assert_allclose(f.read(name, 0, N), ref[name].reshape(N, -1), rtol=1e-5, atol=1e-6)
        assert [m.reduction for m in f.layers] == ["flatten"] * 4
        assert f.layers[2].original_shape == (H, T, 2)
        prov = f.provenance
    assert prov["extractor"] == "toy" and prov["framework"] == "numpy"
    assert prov["command"] == "cka-extract m.toy" and prov["inputs"].startswith("npz:")
    assert len(prov["inputs_sha256"]) == 64 and prov["extra"]["seed"] == "0"


def test_reductions_per_layer_against_float64_reference(tmp_path, data, pm):
    red = {"embed": "last_token", "relu": "token_mean", "conv": "mean", "head": "none"}
    out = extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, batch_size=5, reduction=red)
    got = read_all(out)
    ref = forward(data["x"])
    m = data["mask"].astype(np.float64)
    token_mean = np.stack([ref["relu"][i][m[i] > 0].mean(axis=0) for i in range(N)])
    last = np.stack([ref["embed"][i][np.flatnonzero(m[i])[-1]] for i in range(N)])
    np.testing.assert_allclose(got["relu"], token_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["embed"], last, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["conv"], ref["conv"].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["head"], ref["head"], rtol=1e-5, atol=1e-6)


def test_token_reduction_without_mask(tmp_path, data, pm):
    with pytest.raises(InputError, match="needs the attention mask input 'mask'.*--mask-input"):
        extract(
            "m.toy",
            data["path"],
            tmp_path / "a.h5",
            plugin_manager=pm,
            layers=["relu"],
            reduction="token_mean",
            mask_input="mask",
        )
    out = extract(
        "m.toy",
        data["path"],
        tmp_path / "b.h5",
        plugin_manager=pm,
        layers=["relu"],
        reduction="token_mean",
        mask_input=None,
    )
    np.testing.assert_allclose(read_all(out)["relu"], forward(data["x"])["relu"].mean(axis=1), rtol=1e-5)


def test_layer_patterns_and_reduction_shape_error(tmp_path, data, pm):
    out = extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, layers=["head", "encoder.embed"])
    assert list(read_all(out)) == ["embed", "head"]
    with pytest.raises(LayerSelectionError, match="needs a \\(batch, features\\) output.*layer 'relu'"):
        extract("m.toy", data["path"], tmp_path / "b.h5", plugin_manager=pm, layers=["kind:Relu"], reduction="none")
    assert not (tmp_path / "b.h5.partial").exists()


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_are_disjoint_and_cover_all(tmp_path, data, pm, count):
    ranges = [shard_range(N, (i, count)) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    full = extract("m.toy", data["path"], tmp_path / "full.h5", plugin_manager=pm, layers=["head"])
    paths = [
        extract("m.toy", data["path"], tmp_path / f"s{i}.h5", plugin_manager=pm, layers=["head"], shard=(i, count))
        for i in range(count)
    ]
    with open_activations(paths[::-1]) as sharded, open_activations(full) as whole:
        np.testing.assert_array_equal(sharded.ids, whole.ids)
        np.testing.assert_array_equal(sharded.read("head", 0, N), whole.read("head", 0, N))


def test_shard_and_settings_errors(tmp_path, data, pm):
    with pytest.raises(InputError, match="shard 3/3 is not valid"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, shard=(3, 3))
    with pytest.raises(InputError, match="is empty; use at most 23 shards"):
        shard_range(N, (0, 40))
    with pytest.raises(InputError, match="batch size must be at least 1"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, batch_size=0)
    with pytest.raises(OutputError, match="unknown dtype 'float64'"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, dtype="float64")
    with pytest.raises(InputError, match="max_examples must be at least 1"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, max_examples=0)
    with pytest.raises(OutputError, match="unknown compression 'zip'"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, compression="zip")
    with pytest.raises(TypeError, match="needs an output path"):
        extract("m.toy", data["path"], plugin_manager=pm)


def test_max_examples(tmp_path, data, pm):
    out = extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, max_examples=7, layers=["head"])
    with open_activations(out) as f:
        np.testing.assert_array_equal(f.ids, data["ids"][:7])


def _file_content(path: str) -> dict[str, object]:
    content: dict[str, object] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            for key, value in obj.attrs.items():
                content[f"{name}@{key}"] = np.asarray(value).tolist()
            if isinstance(obj, h5py.Dataset):
                content[name] = obj[()].tolist()

        visit("/", f)
        f.visititems(visit)
    content.pop("/@created")
    return content


class StopAfter:
    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __call__(self, done: int, total: int) -> None:
        self.batches -= 1
        if self.batches < 0:
            raise KeyboardInterrupt


def test_resume_gives_identical_file(tmp_path, data, pm):
    kw = dict(
        plugin_manager=pm,
        batch_size=4,
        reduction={"relu": "token_mean", "*": "flatten"},
        dtype="float16",
        chunk_rows=3,
        compression="gzip",
    )
    full = extract("m.toy", data["path"], tmp_path / "full.h5", **kw)
    out = tmp_path / "b.h5"
    with pytest.raises(KeyboardInterrupt):
        extract("m.toy", data["path"], out, progress=StopAfter(2), **kw)
    assert not out.exists() and (tmp_path / "b.h5.partial").exists()
    with h5py.File(str(out) + ".partial", "r") as f:
        assert f.attrs["rows_complete"] == 12 and not f.attrs["complete"]
    ToyExtractor.calls = 0
    seen = []
    extract("m.toy", data["path"], out, resume=True, progress=lambda d, t: seen.append((d, t)), **kw)
    assert seen[0] == (12, N) and seen[-1] == (N, N)
    assert ToyExtractor.calls == 1 + 3  # one shape probe + the three missing batches
    assert _file_content(str(out)) == _file_content(full)


def test_resume_with_other_options_is_refused(tmp_path, data, pm):
    out = tmp_path / "b.h5"
    with pytest.raises(KeyboardInterrupt):
        extract("m.toy", data["path"], out, plugin_manager=pm, batch_size=4, progress=StopAfter(1))
    with pytest.raises(ResumeError, match="different model, inputs or options"):
        extract("m.toy", data["path"], out, plugin_manager=pm, batch_size=4, resume=True, options={"scale": 2})
    with pytest.raises(ResumeError, match="different model, inputs or options"):
        extract("m.toy", data["path"], out, plugin_manager=pm, batch_size=4, resume=True, max_examples=20)


def test_overwrite(tmp_path, data, pm):
    out = tmp_path / "a.h5"
    out.write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        extract("m.toy", data["path"], out, plugin_manager=pm)
    assert out.read_text() == "old"
    extract("m.toy", data["path"], out, plugin_manager=pm, overwrite=True, layers=["head"])
    assert list(read_all(str(out))) == ["head"]


def test_nan_activation_names_layer_and_example(tmp_path, data, pm):
    x = data["x"].copy()
    x[9, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, attention_mask=data["mask"], ids=data["ids"])
    with pytest.raises(ActivationValueError, match="layer 'embed' has NaN activations for example id 109"):
        extract("m.toy", str(tmp_path / "nan.npz"), tmp_path / "a.h5", plugin_manager=pm, batch_size=4)
    assert not (tmp_path / "a.h5").exists()


def test_float16_overflow(tmp_path, data, pm):
    np.savez(tmp_path / "big.npz", x=data["x"] * 1e6)
    with pytest.raises(ActivationValueError, match="overflows float16 for example id 0.*--dtype float32"):
        extract("m.toy", str(tmp_path / "big.npz"), tmp_path / "a.h5", plugin_manager=pm, dtype="float16")


def test_float16_underflow_that_destroys_a_layer_is_refused(tmp_path, data, pm):
    """A layer of scale 3e-8 keeps a handful of distinct values in float16: refused like an overflow,
    naming the layer and float32; small but representable layers are kept."""
    np.savez(tmp_path / "tiny.npz", x=data["x"] * 3e-8)
    with pytest.raises(ActivationValueError, match=r"layer '\w+' underflows float16.*relative error.*--dtype float32"):
        extract("m.toy", str(tmp_path / "tiny.npz"), tmp_path / "a.h5", plugin_manager=pm, dtype="float16")
    assert not (tmp_path / "a.h5").exists()
    np.savez(tmp_path / "small.npz", x=data["x"] * 1e-2)
    out = extract("m.toy", str(tmp_path / "small.npz"), tmp_path / "b.h5", plugin_manager=pm, dtype="float16")
    exact = extract("m.toy", str(tmp_path / "small.npz"), tmp_path / "c.h5", plugin_manager=pm)
    for name, x in read_all(out).items():
        y = read_all(exact)[name]
        assert np.linalg.norm(x.astype(np.float64) - y) <= 1e-2 * np.linalg.norm(y)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("missing", "returned no output for layer"),
        ("batch", "batch must be on axis 0"),
        ("shape", "every batch must give the same shape"),
    ],
)
def test_extractor_contract_violations(tmp_path, data, pm, bad, match):
    ToyExtractor.calls = 0
    with pytest.raises(ModelError, match=match):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm, batch_size=8, options={"bad": bad})


def test_extractor_choice(tmp_path, data):
    pm2 = get_plugin_manager(entry_points=False, plugins=[Plugin(ToyExtractor, OtherToyExtractor)])
    with pytest.raises(PluginError, match="several extractors can open 'm.toy'.*--extractor NAME"):
        extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm2)
    out = extract("m.toy", data["path"], tmp_path / "a.h5", plugin_manager=pm2, extractor="toy2", layers=["head"])
    with open_activations(out) as f:
        assert f.provenance["extractor"] == "toy2"
    with pytest.raises(ModelError, match="model missing.onnx not found"):
        extract("missing.onnx", data["path"], tmp_path / "b.h5", plugin_manager=pm2)


def test_inputs_resolution(tmp_path, data, pm):
    with pytest.raises(InputError, match="inputs .*nothere.npz not found"):
        extract("m.toy", str(tmp_path / "nothere.npz"), tmp_path / "a.h5", plugin_manager=pm)
    with pytest.raises(InputError, match="no inputs given for model m.toy"):
        extract("m.toy", None, tmp_path / "a.h5", plugin_manager=pm)
    np.savez(tmp_path / "wrong.npz", y=data["x"], z=data["x"])
    with pytest.raises(InputError, match="takes inputs x but .* has y, z"):
        extract("m.toy", str(tmp_path / "wrong.npz"), tmp_path / "a.h5", plugin_manager=pm)
    # a single array feeds a one-input model whatever its name; default_inputs() when none are given
    np.save(tmp_path / "x.npy", data["x"])
    out = extract(
        "m.toy",
        None,
        tmp_path / "a.h5",
        plugin_manager=pm,
        layers=["head"],
        options={"default_inputs": str(tmp_path / "x.npy")},
    )
    np.testing.assert_allclose(read_all(out)["head"], forward(data["x"])["head"], rtol=1e-5, atol=1e-6)


class LyingReader(NpyInputs):
    def ids(self):
        return np.arange(len(self) + 1)


def test_inconsistent_or_empty_inputs(tmp_path, data, pm):
    np.save(tmp_path / "x.npy", data["x"])
    with pytest.raises(InputError, match="24 example ids for 23 examples"):
        extract("m.toy", LyingReader(str(tmp_path / "x.npy")), tmp_path / "a.h5", plugin_manager=pm)
    np.savez(tmp_path / "empty.npz", x=data["x"][:0])
    with pytest.raises(InputError, match="the inputs hold no examples"):
        extract("m.toy", str(tmp_path / "empty.npz"), tmp_path / "a.h5", plugin_manager=pm)


class EarlyToyExtractor(ToyExtractor):
    """The toy model, taking the spatial mean itself once the core asks (Extractor.reduce_early)."""

    name = "toy-early"
    early_reductions = frozenset({"mean"})
    asked: list = []

    def reduce_early(self, reductions):
        type(self).asked.append(dict(reductions))
        self._early = dict(reductions)
        return list(reductions)

    def run(self, inputs, layers):
        out = super().run(inputs, layers)
        for name in getattr(self, "_early", {}):
            if self.options.get("bad") == "early_shape":
                continue  # a buggy plugin: says it reduces, returns the full output
            full = out[name].astype(np.float64)
            out[name] = full.reshape(full.shape[0], full.shape[1], -1).mean(axis=2)
        return out


def test_early_reduction_gives_the_core_s_numbers(tmp_path, data):
    """An extractor that reduces in its own run: same stored values as the core's reduction, every batch
    (the first one is run again after the extractor is asked), and only reductions it declared."""
    EarlyToyExtractor.asked = []
    pm = get_plugin_manager(entry_points=False, plugins=[Plugin(ToyExtractor, EarlyToyExtractor)])
    red = {"conv": "mean", "*": "flatten"}
    core = extract(
        "m.toy", data["path"], tmp_path / "core.h5", plugin_manager=pm, batch_size=5, reduction=red, extractor="toy"
    )
    early = extract(
        "m.toy",
        data["path"],
        tmp_path / "early.h5",
        plugin_manager=pm,
        batch_size=5,
        reduction=red,
        extractor="toy-early",
    )
    assert EarlyToyExtractor.asked == [{"conv": "mean"}]  # asked once, for the mean layer only
    a, b = read_all(core), read_all(early)
    want = forward(data["x"])["conv"].mean(axis=(2, 3))
    np.testing.assert_allclose(b["conv"], want, rtol=1e-6)
    np.testing.assert_allclose(b["conv"], a["conv"], rtol=1e-6)
    for name in ("embed", "relu", "head"):
        np.testing.assert_array_equal(b[name], a[name])
    with open_activations(early) as f:
        assert f.layer("conv").original_shape == (H, T, 2) and f.layer("conv").reduction == "mean"


def test_early_reduction_with_a_wrong_shape_is_the_plugin_s_error(tmp_path, data):
    pm = get_plugin_manager(entry_points=False, plugins=[Plugin(EarlyToyExtractor)])
    with pytest.raises(
        ModelError,
        match=r"returned shape \(5, 6, 5, 2\) for layer 'conv', which it reduces itself "
        r"with 'mean'; expected \(5, 6\) \(a bug in the extractor plugin\)",
    ):
        extract(
            "m.toy",
            data["path"],
            tmp_path / "bad.h5",
            plugin_manager=pm,
            batch_size=5,
            reduction={"conv": "mean", "*": "flatten"},
            options={"bad": "early_shape"},
        )
    assert not (tmp_path / "bad.h5").exists()
