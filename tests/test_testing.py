"""check_extractor: passes a conforming extractor, and names what is wrong with broken ones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cka_offline.errors import LayerSelectionError
from cka_offline.extractor import Extractor, LayerInfo, Option
from cka_offline.testing import check_extractor

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "data", "example_plugin")
X = {"input": np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)}
W = np.random.default_rng(5).normal(size=(3, 4))


class Good(Extractor):
    name = "good"
    framework = "numpy"
    description = "*.good"

    @classmethod
    def can_open(cls, source):
        return source.endswith(".good")

    def layers(self):
        return [LayerInfo("a", "MatMul", (4,)), LayerInfo("b", "Relu", (4,))]

    def outputs(self, x):
        a = x.astype(np.float64) @ W
        return {"a": a, "b": np.maximum(a, 0)}

    def run(self, inputs, layers):
        unknown = [n for n in layers if n not in ("a", "b")]
        if unknown:
            raise LayerSelectionError(f"no layer {unknown[0]!r}")
        out = self.outputs(inputs["input"])
        return {n: out[n] for n in layers}


def variant(**attrs):
    return type("Bad", (Good,), attrs)


def test_passes_good_and_example_plugin(tmp_path, monkeypatch):
    assert check_extractor(Good, "m.good", X) == ["a", "b"]
    assert check_extractor(Good, "m.good", X, layers=["b"]) == ["b"]
    monkeypatch.syspath_prepend(EXAMPLE_DIR)
    import cka_offline_example

    spec = {"layers": [{"name": "fc", "weight": W.tolist(), "bias": [0.0] * 4}]}
    (tmp_path / "m.mlp.json").write_text(json.dumps(spec))
    assert check_extractor(cka_offline_example.MLPExtractor, str(tmp_path / "m.mlp.json"), X) == ["fc"]


class Closes(Good):
    closed = False

    def close(self):
        if self.closed:
            raise RuntimeError("already closed")
        self.closed = True


BROKEN = [
    (variant(framework=""), "m.good", "class attribute 'framework' must be a non-empty string"),
    (variant(declared_options=["x"]), "m.good", "declared_options must be a tuple of cka_offline.extractor.Option"),
    (variant(declared_options=(Option("a"), Option("a"))), "m.good", r"options \['a'\] are declared twice"),
    (Good, "m.onnx", "can_open\\('m.onnx'\\) returned False; expected True"),
    (variant(layers=lambda self: [LayerInfo("a"), LayerInfo("a")]), "m.good", "duplicate names \\['a'\\]"),
    (variant(layers=lambda self: ["a"]), "m.good", "layers\\(\\) must return a non-empty list of LayerInfo"),
    (
        variant(run=lambda self, i, l: {"a": Good.outputs(self, i["input"])["a"]}),
        "m.good",
        "did not return requested layer\\(s\\) \\['b'\\]",
    ),
    (
        variant(
            run=lambda self, i, l: (
                {**Good.outputs(self, i["input"]), "c": np.zeros(len(i["input"]))} if l != ["x"] else {}
            )
        ),
        "m.good",
        "returned layer\\(s\\) \\['c'\\] that were not requested",
    ),
    (
        variant(run=lambda self, i, l: {n: Good.outputs(self, i["input"])[n].T for n in l}),
        "m.good",
        "the batch must be on axis 0",
    ),
    (
        variant(run=lambda self, i, l: {n: Good.outputs(self, i["input"])[n].tolist() for n in l}),
        "m.good",
        "must return numpy arrays",
    ),
    (
        variant(run=lambda self, i, l: {n: Good.outputs(self, i["input"])[n][:, : len(i["input"])] for n in l}),
        "m.good",
        "per-example shape .* must not depend on the batch size",
    ),
    (
        variant(
            run=lambda self, i, l: {n: v - v.mean(axis=0) for n, v in Good.outputs(self, i["input"]).items() if n in l}
        ),
        "m.good",
        "different values in a batch of 1 .* training mode",
    ),
    (
        variant(
            run=lambda self, i, l: (
                Good.outputs(self, i["input"]) if l != ["cka-offline-conformance-no-such-layer"] else {}
            )
        ),
        "m.good",
        "unknown layer returned normally",
    ),
    (
        variant(run=lambda self, i, l: {n: Good.outputs(self, i["input"])[n] for n in l}),
        "m.good",
        "unknown layer raised KeyError",
    ),
    (
        variant(provenance=lambda self: {"model_sha256": None}),
        "m.good",
        "provenance\\(\\) must return a dict of strings",
    ),
    (Closes, "m.good", "close\\(\\) called a second time raised RuntimeError"),
]


@pytest.mark.parametrize("cls, source, match", BROKEN)
def test_reports_broken_extractors(cls, source, match):
    with pytest.raises(AssertionError, match=match):
        check_extractor(cls, source, X)


def test_bad_arguments():
    with pytest.raises(AssertionError, match="is not a subclass of cka_offline.extractor.Extractor"):
        check_extractor(dict, "m.good", X)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="needs inputs with the same number \\(>= 2\\) of examples"):
        check_extractor(Good, "m.good", {"input": X["input"][:1]})
    with pytest.raises(AssertionError, match="layers \\['zz'\\] given to check_extractor are not in layers"):
        check_extractor(Good, "m.good", X, layers=["zz"])


class Maps(Good):
    """A layer with a (batch, channels, positions) output, and the spatial mean taken by the extractor."""

    early_reductions = frozenset({"mean"})
    early: dict = {}
    scale = 1.0  # != 1: a broken early mean

    def layers(self):
        return [*super().layers(), LayerInfo("m", "Conv", (4, 2))]

    def outputs(self, x):
        out = super().outputs(x)
        out["m"] = np.stack([out["a"], 2 * out["a"]], axis=2)  # (B, 4, 2)
        return out

    def reduce_early(self, reductions):
        self.early = dict(reductions)
        return list(reductions)

    def run(self, inputs, layers):
        unknown = [n for n in layers if n not in ("a", "b", "m")]
        if unknown:
            raise LayerSelectionError(f"no layer {unknown[0]!r}")
        out = self.outputs(inputs["input"])
        out = {n: out[n] for n in layers}
        if "m" in self.early and "m" in out:
            out["m"] = out["m"].mean(axis=2) * self.scale
        return out


def test_early_reductions_must_give_the_core_s_numbers():
    assert check_extractor(Maps, "m.good", X) == ["a", "b", "m"]
    with pytest.raises(
        AssertionError,
        match=r"layer 'm': reduce_early\('mean'\) returned shape \(5, 4\), max "
        r"difference .* against the core's reduction",
    ):
        check_extractor(type("BadMaps", (Maps,), {"scale": 1.5}), "m.good", X)


def test_declared_options_are_checked_and_converted():
    from cka_offline.errors import OptionError
    from cka_offline.extractor import parse_options

    declared = (
        Option("n", int, 1, "", minimum=0),
        Option("on", bool, False),
        Option("level", str, "all", choices=("all", "none")),
    )
    assert parse_options(declared, {"n": "3", "on": "yes", "level": "NONE"}, owner="x") == {
        "n": 3,
        "on": True,
        "level": "none",
    }
    assert parse_options(declared, None, owner="x") == {"n": 1, "on": False, "level": "all"}
    with pytest.raises(OptionError, match=r"unknown option\(s\) m for x; known: n, on, level"):
        parse_options(declared, {"m": 1}, owner="x")
    with pytest.raises(OptionError, match="x: option n=-1 must be >= 0"):
        parse_options(declared, {"n": -1}, owner="x")
    with pytest.raises(OptionError, match="x: option n=1.5 is not an integer"):
        parse_options(declared, {"n": 1.5}, owner="x")
    with pytest.raises(OptionError, match="option level='max' is not one of all, none"):
        parse_options(declared, {"level": "max"}, owner="x")
