"""Plugin discovery: the example plugin by module and through a real entry point, broken plugins, clashes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cka_offline.errors import PluginError
from cka_offline.extraction import extract
from cka_offline.extractor import Extractor
from cka_offline.hookspecs import hookimpl
from cka_offline.registry import (
    broken_plugins,
    find_extractor,
    get_extractor,
    get_plugin_manager,
    list_extractors,
    list_input_readers,
)
from cka_offline.store.reader import open_activations

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "data", "example_plugin")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLE_DIR)
    import cka_offline_example

    return cka_offline_example


def write_mlp(path, rng):
    spec = {
        "layers": [
            {"name": "fc1", "weight": rng.normal(size=(4, 6)).tolist(), "bias": rng.normal(size=6).tolist()},
            {"name": "fc2", "weight": rng.normal(size=(6, 2)).tolist(), "bias": [0.0, 0.0]},
        ]
    }
    path.write_text(json.dumps(spec))
    return spec


def fake_distribution(site, name, entry_points):
    """A dist-info folder on sys.path: importlib.metadata finds it like an installed distribution."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cka_offline]\n{lines}")


def test_example_plugin_registered_as_module(tmp_path, example):
    rng = np.random.default_rng(3)
    spec = write_mlp(tmp_path / "m.mlp.json", rng)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    pm = get_plugin_manager(entry_points=False, plugins=[example])
    assert find_extractor("m.mlp.json", pm) is example.MLPExtractor
    out = extract(
        str(tmp_path / "m.mlp.json"), str(tmp_path / "in.npz"), tmp_path / "a.h5", plugin_manager=pm, batch_size=3
    )
    w1, b1 = np.array(spec["layers"][0]["weight"]), np.array(spec["layers"][0]["bias"])
    with open_activations(out) as f:
        np.testing.assert_allclose(f.read("fc1", 0, 10), np.maximum(x @ w1 + b1, 0), rtol=1e-5, atol=1e-6)
        assert f.provenance["framework"] == "numpy" and len(f.provenance["model_sha256"]) == 64


def test_entry_point_discovery_and_broken_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_distribution(site, "cka-offline-example", {"example": "cka_offline_example"})
    fake_distribution(site, "cka-offline-broken", {"zz-broken": "cka_offline_no_such_module.plugin"})
    monkeypatch.syspath_prepend(EXAMPLE_DIR)
    monkeypatch.syspath_prepend(str(site))
    pm = get_plugin_manager()
    entries = {e.name: e for e in list_extractors(pm)}
    assert entries["example-mlp"].distribution == "cka-offline-example"
    assert entries["example-mlp"].version == "0.1.0"
    broken = broken_plugins(pm)
    assert [(name, dist) for name, dist, _ in broken] == [("zz-broken", "cka-offline-broken")]
    assert "ModuleNotFoundError" in broken[0][2]
    # the others still work
    assert get_extractor("example-mlp", pm).name == "example-mlp"
    assert {"npz", "npy", "hdf5", "images"} <= {e.name for e in list_input_readers(pm)}


class Twin(Extractor):
    name = "example-mlp"
    framework = "numpy"

    @classmethod
    def can_open(cls, source):
        return False

    def layers(self):
        return []

    def run(self, inputs, layers):
        return {}


class Faulty:
    @hookimpl
    def cka_extractors(self):
        raise RuntimeError("boom")


def test_clashes_and_lookup_errors(example):
    class TwinPlugin:
        @hookimpl
        def cka_extractors(self):
            return [Twin]

    pm = get_plugin_manager(entry_points=False, plugins=[example, TwinPlugin()])
    with pytest.raises(
        PluginError, match="two plugins provide an extractor named 'example-mlp': plugin '.*' \\(.*\\) and plugin"
    ):
        list_extractors(pm)
    pm = get_plugin_manager(entry_points=False, plugins=[example, Faulty()])
    assert [e.name for e in list_extractors(pm)] == ["example-mlp"]
    assert "RuntimeError: boom" in broken_plugins(pm)[0][2]
    with pytest.raises(PluginError, match="no extractor named 'nope'; installed extractors: example-mlp"):
        get_extractor("nope", pm)
    with pytest.raises(PluginError, match="no extractor can open 'model.xyz'"):
        find_extractor("model.xyz", pm)


def test_plugin_guide_shows_the_example_plugin_in_full():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "plugins.md"), encoding="utf-8") as fh:
        guide = fh.read()
    for name in ("cka_offline_example.py", "pyproject.toml"):
        with open(os.path.join(EXAMPLE_DIR, name), encoding="utf-8") as fh:
            assert fh.read() in guide, f"docs/plugins.md must show tests/data/example_plugin/{name} as it is"
